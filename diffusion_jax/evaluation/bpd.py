"""Bits/dim: the full variational bound L_0 + Σ_t L_t + L_T of a split (Ho et al. 2020, eq. 5),
with its standard error over examples, the split of the terms and the per-t curves."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import input_pipeline, models, objectives, ode, reporting, sampling, sharding
from diffusion_jax import vdm as vdm_lib
from diffusion_jax.evaluation import plots
from diffusion_jax.evaluation.context import EvalContext


def bpd_of_split(ctx: EvalContext, split: str, num_examples: int) -> dict[str, Any]:
    """Bits/dim of the first ``num_examples`` of ``split`` (0: all): the full bound
    (``ctx.bound_sums``, every t, with the per-t curves) or, with ``eval.bound_num_t`` = K > 0,
    its unbiased estimate from K timesteps per example (``ctx.bound_estimate_sums``); the key
    ``bound_estimate`` says which."""
    e = ctx.config.eval
    if ctx.config.training.objective == "vdm":
        return _continuous_bpd(ctx, split, num_examples)
    if e.bound_num_t:
        total = ctx.bound_estimate_sums(split, num_examples)
        estimate = {"kind": e.bound_t_sampler, "num_t": int(e.bound_num_t)}
    else:
        total = ctx.bound_sums(split, num_examples)
        estimate = {"kind": "full", "num_t": ctx.diffusion.num_timesteps}
    n = float(total["count"])
    bpd, stderr = _mean_stderr(total)
    out = {
        "bpd": bpd,
        "bpd_stderr": stderr,
        "bpd_terms": {
            "decoder_L0": float(total["decoder_bpd"]) / n,
            "sum_Lt": float(total["kl_bpd"]) / n,
            "prior_LT": float(total["prior_bpd"]) / n,
        },
        "num_examples": int(n),
        "split": split,
        "clip_denoised": bool(ctx.config.eval.clip_denoised),
        "bound": _bound_name(ctx),
        "bound_estimate": estimate,
    }
    if not e.bound_num_t:
        out["terms_bpd_per_t"] = (total["terms_bpd"] / n).tolist()
        out["mse_per_t"] = (total["mse"] / n).tolist()
    t = out["bpd_terms"]
    logging.info(
        "bits/dim %.4f ± %.4f on %d %s examples (L_0 %.3g, sum L_t %.4f%s, L_T %.3g)",
        bpd,
        out["bpd_stderr"],
        n,
        split,
        t["decoder_L0"],
        t["sum_Lt"],
        f" from {e.bound_num_t} {e.bound_t_sampler} t per example" if e.bound_num_t else "",
        t["prior_LT"],
    )
    return out


def _mean_stderr(total: dict, suffix: str = "") -> tuple[float, float]:
    n = float(total["count"])
    mean = float(total["bpd" + suffix]) / n
    var = max(float(total["bpd_sq" + suffix]) / n - mean**2, 0.0)
    return mean, (var / max(n - 1, 1)) ** 0.5


def _continuous_bpd(ctx: EvalContext, split: str, num_examples: int) -> dict[str, Any]:
    """A vdm model's bits/dim (``ctx.continuous_bound_sums``): ``bpd`` the continuous bound,
    ``bpd_finite`` the ``vdm.eval_num_steps``-step chain's from the same t and noise."""
    config = ctx.config
    total = ctx.continuous_bound_sums(split, num_examples)
    n = float(total["count"])
    bpd, stderr = _mean_stderr(total)
    num_t = max(int(config.eval.bound_num_t), 1)
    out = {
        "bpd": bpd,
        "bpd_stderr": stderr,
        "bpd_terms": {
            "decoder_L0": float(total["decoder_bpd"]) / n,
            "diffusion": float(total["kl_bpd"]) / n,
            "prior_L1": float(total["prior_bpd"]) / n,
        },
        "num_examples": int(n),
        "split": split,
        "bound": _bound_name(ctx),
        "bound_estimate": {"kind": "continuous", "num_t": num_t},
    }
    steps = int(config.vdm.eval_num_steps)
    if steps:
        bpd_t, stderr_t = _mean_stderr(total, "_finite")
        out["bpd_finite"] = {
            "num_steps": steps,
            "bpd": bpd_t,
            "bpd_stderr": stderr_t,
            "diffusion": float(total["kl_bpd_finite"]) / n,
        }
    t = out["bpd_terms"]
    logging.info(
        "bits/dim %.4f ± %.4f on %d %s examples, continuous time (L_0 %.3g, diffusion %.4f from "
        "%d t per example, L_1 %.3g)%s",
        bpd,
        stderr,
        n,
        split,
        t["decoder_L0"],
        t["diffusion"],
        num_t,
        t["prior_L1"],
        f"; {steps} steps: {out['bpd_finite']['bpd']:.4f}" if steps else "",
    )
    return out


def _bound_name(ctx: EvalContext) -> str:
    """What the bound bounds: -log p(x), or for a conditional model -log p(x | c)."""
    return "-log p(x | c), c the true labels" if ctx.conditional else "-log p(x)"


def bpd(ctx: EvalContext) -> dict[str, Any]:
    """``bpd`` of ``eval.split`` (its first ``eval.num_examples``), and the keys beside it."""
    return bpd_of_split(ctx, ctx.config.eval.split, ctx.config.eval.num_examples)


def bpd_splits(ctx: EvalContext) -> dict[str, Any]:
    """``bpd_by_split``: bits/dim of each split of ``eval.bpd_splits`` (and of ``eval.split``
    when its ``bpd`` is known), on ``eval.bpd_splits_num_examples`` examples (-1: as
    ``eval.num_examples``)."""
    e = ctx.config.eval
    n = e.num_examples if e.bpd_splits_num_examples < 0 else e.bpd_splits_num_examples
    keys = (
        "bpd",
        "bpd_stderr",
        "bpd_terms",
        "num_examples",
        "split",
        "clip_denoised",
        "bound",
        "bound_estimate",
    )
    out = {}
    for split in e.bpd_splits:
        if split != ctx.metrics.get("split"):
            out[split] = {k: v for k, v in bpd_of_split(ctx, split, n).items() if k in keys}
    if "bpd" in ctx.metrics:  # the main split too, so the table is in one place
        out[ctx.metrics["split"]] = {k: ctx.metrics[k] for k in keys if k in ctx.metrics}
    return {"bpd_by_split": out}


def evaluate_bpd(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    split: str,
    num_examples: int | None = None,
) -> dict[str, Any]:
    """Bits/dim of ``split`` (its first ``num_examples``, default ``eval.num_examples``; 0: all)
    for a model and parameters in hand, e.g. in a notebook; writes nothing."""
    ctx = EvalContext(config, model, params, mesh, workdir="")
    n = config.eval.num_examples if num_examples is None else num_examples
    return bpd_of_split(ctx, split, n)


def lt_curve(ctx: EvalContext) -> dict[str, Any]:
    """The figure of L_t and the ε-MSE against t: the ``bpd`` evaluator's per-t terms when it ran
    the full bound; when bits/dim was estimated from K t per example (``eval.bound_num_t`` > 0)
    or not asked for, the full per-t pass over the first ``eval.rate_distortion.num_examples``
    of ``eval.split``, the same pass (cached) the rate–distortion curve sums."""
    m = ctx.metrics
    if "terms_bpd_per_t" in m:
        terms, mse = m["terms_bpd_per_t"], m.get("mse_per_t")
        n, split, sum_lt = m["num_examples"], m["split"], m["bpd_terms"]["sum_Lt"]
    else:
        split = ctx.config.eval.split
        total = ctx.bound_sums(split, ctx.config.eval.rate_distortion.num_examples)
        n = int(total["count"])
        terms, mse = total["terms_bpd"] / n, total["mse"] / n  # [T] each
        sum_lt = float(total["kl_bpd"]) / n
    path = ctx.figure_path("lt_curve")
    if jax.process_index() == 0:
        plots.plot_lt_curve(
            terms, path, mse, title=f"L_t on {n} {split} examples, sum {sum_lt:.4f} bits/dim"
        )
    return {"figures": {**m.get("figures", {}), "lt_curve": path}}


def bpd_ode(ctx: EvalContext) -> dict[str, Any]:
    """``bpd_ode``: bits/dim by the probability-flow ODE (``ode.ode_bpd``: Dopri5 at
    ``eval.bpd_ode.rtol`` / ``eval.bpd_ode.atol``, Hutchinson's trace, uniform dequantization) on
    the first ``eval.bpd_ode.num_examples`` of ``eval.split`` (0: all), with its standard error
    over examples and the network calls per batch; batch i's dequantization and probe from
    fold_in(fold_in(run eval key, 0x0DE), i)."""
    config, mesh = ctx.config, ctx.mesh
    e = config.eval
    d, num_bins = ctx.diffusion, config.data.num_bins

    def fn(params, batch, key):
        x0 = input_pipeline.to_model_space(batch["image"], num_bins)  # [B, ...]
        net = models.model_fn(ctx.model, params, labels=batch.get("label"))
        return ode.ode_bpd(d, net, x0, key, num_bins, e.bpd_ode.rtol, e.bpd_ode.atol)

    jitted = jax.jit(fn)
    source = input_pipeline.load_split(config, e.split)
    n = (
        source.num_examples
        if e.bpd_ode.num_examples <= 0
        else min(e.bpd_ode.num_examples, source.num_examples)
    )
    batches = input_pipeline.eval_batches(
        source, e.batch_size, n, jax.process_index(), jax.process_count(), ctx.conditional
    )
    key = jax.random.fold_in(objectives.run_keys(config.seed)["eval"], 0x0DE)
    values, nfes = [], []
    with reporting.progress_bar(-(-n // e.batch_size), f"bpd_ode ({e.split})", "batch") as bar:
        for i, (batch, mask) in enumerate(batches):
            batch_key = jax.random.fold_in(key, i)
            out = jitted(ctx.params, sharding.global_batch(mesh, batch), batch_key)
            keep = sampling.to_host(sharding.global_batch(mesh, mask)) > 0  # [B] of the padding
            values.append(sampling.to_host(out["bpd"])[keep])
            nfes.append(int(out["nfe"]))
            bar.update(1)
    values = np.concatenate(values).astype(np.float64)  # [n]
    out = {
        "bpd_ode": float(values.mean()),
        "bpd_ode_stderr": float(values.std(ddof=1) / np.sqrt(len(values)))
        if len(values) > 1
        else 0.0,
        "bpd_ode_num_examples": len(values),
        "bpd_ode_nfe_per_batch": nfes,
        "bpd_ode_settings": {"rtol": e.bpd_ode.rtol, "atol": e.bpd_ode.atol, "trace": "hutchinson"},
        "bpd_ode_bound": _bound_name(ctx),
    }
    logging.info(
        "bits/dim by the ODE %.4f ± %.4f on %d %s examples (%s network calls per batch)",
        out["bpd_ode"],
        out["bpd_ode_stderr"],
        len(values),
        e.split,
        ", ".join(map(str, nfes)),
    )
    return out


def gamma_schedule(ctx: EvalContext) -> dict[str, Any]:
    """The figure of the model's γ(t) beside the fixed schedules (``vdm`` linear and cosine at
    the configured endpoints, DDPM's linear β), and ``gamma_endpoints`` [γ(0), γ(1)]."""
    config = ctx.config
    c, d = config.vdm, config.diffusion
    t = np.linspace(0.0, 1.0, 201)
    gamma = np.asarray(objectives.gamma_fn(ctx.model, ctx.params)(jnp.asarray(t, jnp.float32)))
    curves = {
        f"{c.gamma} (this model)": (t, gamma),
        "linear": (t, np.asarray(vdm_lib.gamma_linear(t, c.gamma_min, c.gamma_max))),
        "cosine": (t, np.asarray(vdm_lib.gamma_cosine(t, c.gamma_min, c.gamma_max))),
        "DDPM linear beta": (
            t,
            np.asarray(vdm_lib.gamma_beta_linear(t, d.beta_start, d.beta_end, d.num_timesteps)),
        ),
    }
    path = ctx.figure_path("gamma_schedule")
    if jax.process_index() == 0:
        plots.plot_gamma_schedules(
            curves, path, f"gamma(0) = {gamma[0]:.3f}, gamma(1) = {gamma[-1]:.3f}"
        )
    return {
        "figures": {**ctx.metrics.get("figures", {}), "gamma_schedule": path},
        "gamma_endpoints": [float(gamma[0]), float(gamma[-1])],
    }
