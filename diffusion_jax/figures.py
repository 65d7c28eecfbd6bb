"""The DDPM paper's figures from a trained run: the L_t curve, rate-distortion, progressive x0_hat.

Time is zero-based (t = 0 is the paper's t = 1). The latents are x_t, t = 0..T-1, and the terms of
the bound in bits/dim are

    L_T = KL(q(x_{T-1} | x0) || N(0, I))                    (the cost of sending x_{T-1})
    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), t > 0  (the cost of x_{t-1} given x_t)
    L_0 = -log p(x0 | x_0-latent)                           (the cost of the data itself)

Progressive lossy compression (Ho et al. 2020, section 4.3, Table 4, Figure 5) sends x_{T-1},
then x_{T-2}, ..., so a receiver holding x_t has received

    rate(t) = L_T + sum_{s = t+1}^{T-1} L_s   bits/dim

(in the paper's one-based indices: L_T + sum_{s >= t} L_s at its step t), and reconstructs
x0_hat(x_t, t) with distortion

    RMSE(t) = sqrt(mean_dims (255/2 (x0_hat - x0))^2)   on the [0, 255] scale,

x0_hat clipped to [-1, 1]. After the last term L_0 the data are sent losslessly (rate = the whole
bound, distortion 0).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import builders, evaluate, input_pipeline, likelihood, reporting, sharding
from diffusion_jax import diffusion as diffusion_lib

# Config keys of the ``eval`` section used here, with their defaults (for configs without them).
DEFAULTS = {
    "figures": ("lt_curve", "rate_distortion", "progressive"),
    "bpd_splits": (),  # more splits to evaluate bits/dim on, besides eval.split
    "bpd_splits_num_examples": -1,  # -1: eval.num_examples; 0: the whole split
    "rd_num_examples": 256,  # examples of eval.split for the rate-distortion curve; 0: all
    "progressive_num_samples": 8,
    "progressive_num_frames": 10,
}
FIGURES = ("lt_curve", "rate_distortion", "progressive")


def eval_option(config: ml_collections.ConfigDict, name: str) -> Any:
    """``config.eval.<name>``, or its default where the config predates the key."""
    return config.eval.get(name, DEFAULTS[name])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    _pyplot().close(fig)


# ----------------------------------------------------------------------------- (a) L_t curve


def plot_lt_curve(
    terms_bpd_per_t: list[float] | np.ndarray,
    path: str,
    mse_per_t: list[float] | np.ndarray | None = None,
    title: str = "",
) -> None:
    """PNG of L_t (bits/dim, log scale) against t; with ``mse_per_t`` a second panel of
    E||eps_hat - eps||^2 / D against t."""
    plt = _pyplot()
    terms = np.asarray(terms_bpd_per_t, np.float64)  # [T]
    t = np.arange(len(terms))
    panels = 1 if mse_per_t is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), dpi=100, squeeze=False)
    ax = axes[0, 0]
    ax.semilogy(t, np.maximum(terms, 1e-12), lw=1)
    ax.set_xlabel("t (0 = the decoder term L_0)")
    ax.set_ylabel("L_t (bits/dim)")
    ax.set_title(title or f"L_t, sum {terms.sum():.4f} bits/dim", fontsize=9)
    ax.grid(alpha=0.3)
    if mse_per_t is not None:
        ax = axes[0, 1]
        ax.semilogy(t, np.asarray(mse_per_t), lw=1, color="C1")
        ax.set_xlabel("t")
        ax.set_ylabel("eps MSE per dim")
        ax.grid(alpha=0.3)
    _save(fig, path)


# ----------------------------------------------------------------------------- (b) rate-distortion


def rate_distortion_terms(
    d: diffusion_lib.GaussianDiffusion,
    model_fn: diffusion_lib.ModelFn,
    x0: jax.Array,
    key: jax.Array,
    num_bins: int = 256,
) -> dict[str, jax.Array]:
    """Every term of the bound and the distortion of x0_hat(x_t) for every t, in one ``lax.scan``.

    x_t = q_sample(x0, t, eps_t) with eps_t drawn from fold_in(key, t) as in
    ``diffusion.calc_bpd_loop`` (the same key gives the same terms); one model call per t gives
    both L_t (unclipped x0_hat, as for bits/dim) and the squared error on the [0, 255] scale of
    the clipped x0_hat. Returns dict(terms_bpd [B, T], prior_bpd [B], sq_err [B, T]) with
    sq_err = mean_dims((127.5 (clip(x0_hat) - x0))^2).
    """

    def step(_, t_i):
        t = jnp.full(x0.shape[:1], t_i, jnp.int32)  # [B]
        noise = jax.random.normal(jax.random.fold_in(key, t_i), x0.shape, jnp.float32)
        x_t = diffusion_lib.q_sample(d, x0, t, noise.astype(x0.dtype))
        p = diffusion_lib.p_mean_variance(d, model_fn, x_t, t, clip_denoised=False)
        vb = diffusion_lib.vb_terms_bpd_from_p(d, p, x0, x_t, t, num_bins)  # [B]
        err = 127.5 * (jnp.clip(p["pred_x0"], -1.0, 1.0) - x0)
        return None, (vb, likelihood.mean_flat(jnp.square(err)))

    _, (vb, sq) = jax.lax.scan(step, None, jnp.arange(d.num_timesteps))  # [T, B] each
    return dict(terms_bpd=vb.T, prior_bpd=diffusion_lib.prior_bpd(d, x0), sq_err=sq.T)


def rate_distortion_curve(
    terms_bpd: np.ndarray, prior_bpd: float, rmse: np.ndarray, mse: np.ndarray | None = None
) -> dict[str, Any]:
    """Cumulative rate and distortion per t from mean terms [T], L_T and RMSE [T] (the mean over
    examples of the per-example RMSE; ``mse`` [T] the mean squared error, optional).

    rate[t] = L_T + sum_{s > t} L_s; lists are indexed by t (0..T-1); the reverse process visits
    them from t = T-1 down to 0.
    """
    terms = np.asarray(terms_bpd, np.float64)  # [T]
    after = np.concatenate([np.cumsum(terms[::-1])[::-1][1:], [0.0]])  # sum_{s > t} L_s
    rate = float(prior_bpd) + after
    out = {
        "t": list(range(len(terms))),
        "rate_bpd": rate.tolist(),
        "distortion_rmse": np.asarray(rmse, np.float64).tolist(),
        "lossless_bpd": float(prior_bpd + terms.sum()),
        "prior_LT_bpd": float(prior_bpd),
        "terms_bpd": terms.tolist(),
        "rate_definition": "rate[t] = L_T + sum_{s>t} L_s (bits/dim received when x_t is held)",
        "distortion_definition": "mean over examples of sqrt(mean_dims((x0_hat(x_t)-x0)^2)), "
        "[0,255] scale, x0_hat clipped to [-1,1]",
    }
    if mse is not None:
        out["distortion_rmse_of_mean_mse"] = np.sqrt(np.asarray(mse, np.float64)).tolist()
    return out


def evaluate_rate_distortion(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    split: str | None = None,
    num_examples: int | None = None,
) -> dict[str, Any]:
    """``rate_distortion_curve`` over the first ``num_examples`` of ``split`` (defaults
    ``eval.rd_num_examples`` of ``eval.split``), batches of ``eval.batch_size`` sharded over the
    mesh with masked sums, EMA ``params`` as given. Batches and keys are those of
    ``evaluate.evaluate_bpd``, so on the same examples ``lossless_bpd`` is its ``bpd``."""
    split = split or config.eval.split
    n = eval_option(config, "rd_num_examples") if num_examples is None else num_examples
    d = builders.make_diffusion(config)
    num_bins = config.data.num_bins

    def fn(params, batch, mask, key):
        x0 = input_pipeline.to_model_space(batch, num_bins)  # [B, H, W, C]
        out = rate_distortion_terms(d, builders.model_fn(model, params), x0, key, num_bins)
        m = mask[:, None]  # [B, 1]
        return dict(
            terms_bpd=jnp.sum(out["terms_bpd"] * m, axis=0),  # [T]
            mse=jnp.sum(out["sq_err"] * m, axis=0),  # [T]
            rmse=jnp.sum(jnp.sqrt(out["sq_err"]) * m, axis=0),  # [T]
            prior_bpd=jnp.sum(out["prior_bpd"] * mask),
            count=jnp.sum(mask),
        )

    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    jitted = jax.jit(fn, in_shardings=(repl, data, data, repl), out_shardings=repl)
    key = builders.run_keys(config.seed)["eval"]  # evaluate_bpd's: the same x_t, the same terms
    source = input_pipeline.load_split(config, split)
    batches = input_pipeline.eval_batches(
        source, config.eval.batch_size, n, jax.process_index(), jax.process_count()
    )
    total = evaluate.sum_batches(jitted, params, mesh, batches, key, "rate-distortion")
    count = float(total["count"])
    out = rate_distortion_curve(
        np.asarray(total["terms_bpd"]) / count,
        float(total["prior_bpd"]) / count,
        np.asarray(total["rmse"]) / count,
        np.asarray(total["mse"]) / count,
    )
    out.update(split=split, num_examples=int(count))
    return out


def plot_rate_distortion(rd: dict[str, Any], path: str) -> None:
    """Two panels: rate (bits/dim) against t, and distortion (RMSE, [0, 255]) against rate."""
    plt = _pyplot()
    t = np.asarray(rd["t"])
    rate = np.asarray(rd["rate_bpd"])
    dist = np.asarray(rd["distortion_rmse"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.3), dpi=100)
    a.plot(t, rate, lw=1.2)
    a.invert_xaxis()  # the reverse process runs from t = T-1 to 0
    a.set_xlabel("t (reverse process: T-1 → 0)")
    a.set_ylabel("rate (bits/dim)")
    a.set_title(f"cumulative rate; lossless {rd['lossless_bpd']:.3f} bits/dim", fontsize=9)
    a.grid(alpha=0.3)
    b.plot(rate, dist, lw=1.2, color="C3")
    b.plot([rd["lossless_bpd"]], [0.0], "o", color="C3", ms=3)
    b.set_xlabel("rate (bits/dim)")
    b.set_ylabel("distortion (RMSE, [0, 255])")
    b.set_title(f"rate-distortion, {rd.get('num_examples', '?')} examples", fontsize=9)
    b.grid(alpha=0.3)
    _save(fig, path)


# ----------------------------------------------------------------------------- (c) progressive


def progressive_samples(
    d: diffusion_lib.GaussianDiffusion,
    model_fn: diffusion_lib.ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    num_frames: int = 10,
    num_steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ancestral samples and x0_hat at ``num_frames`` steps along the chain (paper Figure 6).

    Returns (x0 [N, ...], frames [F, N, ...] from the noisiest kept step to t = 0, t_of_frame
    [F]): x0_hat every k = ceil(K / num_frames) steps of the K-step chain, as
    ``p_sample_loop(pred_x0_every=k)`` keeps it (chain steps i with i % k == 0).
    """
    num = d.num_timesteps if not num_steps else num_steps
    every = max(1, -(-num // num_frames))
    fn = jax.jit(
        lambda key: diffusion_lib.p_sample_loop(
            d, model_fn, shape, key, num_steps=num_steps, pred_x0_every=every
        )
    )
    x0, frames = fn(key)  # [N, ...], [ceil(K / k), N, ...]
    steps = np.arange(0, num, every)[::-1]  # chain indices, noisiest first
    if num_steps and num_steps != d.num_timesteps:
        steps = diffusion_lib.space_timesteps(d.num_timesteps, num_steps)[steps]
    return np.asarray(x0), np.asarray(frames), np.asarray(steps)


def progressive_strip(frames: np.ndarray, num_bins: int) -> np.ndarray:
    """frames [F, N, H, W, C] model space -> uint8 grid, one row per sample, one column per
    frame (noisiest left): [N (H+1) + 1, F (W+1) + 1, C]."""
    f, n = frames.shape[:2]
    rows = np.swapaxes(frames, 0, 1).reshape(n * f, *frames.shape[2:])  # sample-major
    return reporting.image_grid(reporting.to_display_uint8(rows, num_bins), ncols=f)


def save_progressive(
    config: ml_collections.ConfigDict, model, params: Any, path: str
) -> dict[str, Any]:
    """The progressive strip of ``eval.progressive_num_samples`` samples, fixed seed, as PNG.

    Uses the key fold_in(run sample key, 6) and the config's chain length (``sampling.num_steps``).
    """
    n = eval_option(config, "progressive_num_samples")
    shape = (n, *input_pipeline.example_shape(config))
    key = jax.random.fold_in(builders.run_keys(config.seed)["sample"], 6)
    d = builders.make_diffusion(config)
    _, frames, steps = progressive_samples(
        d,
        builders.model_fn(model, params),
        shape,
        key,
        eval_option(config, "progressive_num_frames"),
        config.sampling.num_steps or None,
    )
    grid = progressive_strip(frames, config.data.num_bins)
    if jax.process_index() == 0:
        reporting.save_png(path, grid, scale=max(1, 320 // grid.shape[0]))
    return {"path": path, "t_of_columns": steps.tolist(), "num_samples": n, "shape": grid.shape}


# ----------------------------------------------------------------------------- (d) split bpd


def split_bpd(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    split: str,
    num_examples: int | None = None,
) -> dict[str, Any]:
    """``evaluate.evaluate_bpd`` on ``split``: its first ``num_examples`` (default
    ``eval.num_examples``; 0 = all)."""
    from diffusion_jax import evaluate

    cfg = config
    if num_examples is not None and num_examples >= 0:
        cfg = copy.deepcopy(config)
        with cfg.unlocked():
            cfg.eval.num_examples = num_examples
    return evaluate.evaluate_bpd(cfg, model, params, mesh, split)
