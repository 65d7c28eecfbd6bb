"""Evaluation of a trained run: the evaluators of ``eval.metrics`` and ``eval.figures`` by name.

``evaluate(config, workdir)`` runs, in the order of EVALUATORS, every evaluator the config asks
for, over one ``EvalContext`` (the run's config, model, EMA parameters, mesh and workdir, and the
results so far: an evaluator may read what an earlier one computed, e.g. the L_t curve the
bound's terms, IS the FID samples). ``WORKDIR/eval/metrics.json`` is rewritten after each one, so
every number is on disk as soon as it is known. An evaluator that fails is named in one line with
the reason (a traceback only for an unexpected error); the others still run, and ``evaluate``
then raises ``EvaluationError``: the command exits non-zero with every number computed kept.

A new evaluator is one entry in EVALUATORS (its kind, the function ``run(ctx) -> dict`` whose
keys are merged into metrics.json, and when it does not apply) plus its module.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import checkpoints, models, objectives, reporting, sampling, sharding, timesteps
from diffusion_jax import config as config_lib
from diffusion_jax.evaluation import bpd as bpd_lib
from diffusion_jax.evaluation import classifier as classifier_lib
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import judge
from diffusion_jax.evaluation import progressive as progressive_lib
from diffusion_jax.evaluation import rate_distortion as rd_lib
from diffusion_jax.evaluation.bpd import evaluate_bpd
from diffusion_jax.evaluation.context import EvalContext

__all__ = [
    "EVALUATORS",
    "EvalContext",
    "EvaluationError",
    "check_config",
    "evaluate",
    "evaluate_bpd",
    "load_ema_params",
    "load_ema_params_and_step",
    "load_run_params",
    "run_evaluators",
    "sample",
]


class EvaluationError(RuntimeError):
    """One or more evaluators failed; the numbers of the others are in metrics.json."""


def _needs_bound(ctx: EvalContext) -> str | None:
    if ctx.config.training.objective == "distill":
        return (
            "has no meaning for a distilled student: a deterministic DDIM sampler of "
            f"{ctx.config.sampling.num_steps} steps is no Markov chain with an ELBO (its "
            "teacher's bound: --mode eval on the teacher's workdir)"
        )
    if not objectives.get_objective(ctx.config).has_bound or not ctx.config.data.image_size:
        return "needs a model with a likelihood bound (DDPM) on discrete image data"
    return None


def _needs_chain(ctx: EvalContext) -> str | None:
    """The figures and the ODE likelihood built on the discrete chain (``ctx.diffusion``)."""
    if ctx.config.training.objective != "ddpm":
        return "works on the discrete chain of the ddpm objective"
    return _needs_bound(ctx)


def _needs_vdm(ctx: EvalContext) -> str | None:
    return None if ctx.config.training.objective == "vdm" else "needs training.objective='vdm'"


def _needs_images(ctx: EvalContext) -> str | None:
    return None if ctx.config.data.image_size else "needs image data"


@dataclasses.dataclass(frozen=True)
class Evaluator:
    kind: str  # "metric" (named in eval.metrics) | "figure" (eval.figures) | "splits"
    run: Callable[[EvalContext], dict[str, Any]]
    skip: Callable[[EvalContext], str | None] = lambda ctx: None  # why it does not apply


EVALUATORS: dict[str, Evaluator] = {
    "bpd": Evaluator("metric", bpd_lib.bpd, _needs_bound),
    "bpd_splits": Evaluator("splits", bpd_lib.bpd_splits, _needs_bound),
    "bpd_ode": Evaluator("metric", bpd_lib.bpd_ode, _needs_chain),
    "lt_curve": Evaluator("figure", bpd_lib.lt_curve, _needs_chain),
    "rate_distortion": Evaluator("figure", rd_lib.rate_distortion, _needs_chain),
    "progressive": Evaluator("figure", progressive_lib.progressive, _needs_chain),
    "gamma_schedule": Evaluator("figure", bpd_lib.gamma_schedule, _needs_vdm),
    "fid": Evaluator("metric", fid_lib.fid, _needs_images),
    "is": Evaluator("metric", fid_lib.inception_score_metric, _needs_images),
    "fd_classifier": Evaluator("metric", classifier_lib.fd_classifier, classifier_lib.needs_labels),
    "is_classifier": Evaluator("metric", classifier_lib.is_classifier, classifier_lib.needs_labels),
    "kid_classifier": Evaluator(
        "metric", classifier_lib.kid_classifier, classifier_lib.needs_labels
    ),
    "precision_recall_classifier": Evaluator(
        "metric", classifier_lib.precision_recall_classifier, classifier_lib.needs_labels
    ),
    "class_match": Evaluator(
        "metric", classifier_lib.class_match_classifier, classifier_lib.needs_conditional
    ),
}


def _names(kind: str) -> tuple[str, ...]:
    return tuple(n for n, e in EVALUATORS.items() if e.kind == kind)


def wanted(config: ml_collections.ConfigDict) -> list[str]:
    """The evaluators ``config.eval`` asks for, in the order they run."""
    e = config.eval
    asked = {"metric": set(e.metrics), "figure": set(e.figures), "splits": set()}
    if e.bpd_splits:
        asked["splits"].add("bpd_splits")
    return [n for n, ev in EVALUATORS.items() if n in asked[ev.kind]]


def _check_bound_estimate(config: ml_collections.ConfigDict) -> None:
    e, num_t = config.eval, config.diffusion.num_timesteps
    k = e.bound_num_t
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= num_t - 1:
        raise ValueError(
            f"config.eval.bound_num_t={k!r} must be 0 (every t) or an integer in [1, T - 1 = "
            f"{num_t - 1}] (timesteps per example of the bound's estimate)."
        )
    if e.bound_t_sampler not in timesteps.BOUND_T_SAMPLERS:
        raise ValueError(
            f"config.eval.bound_t_sampler={e.bound_t_sampler!r} is not one of "
            f"{timesteps.BOUND_T_SAMPLERS}."
        )
    if k and e.bound_t_sampler == "importance" and not objectives.loss_aware(config):
        raise ValueError(
            "config.eval.bound_t_sampler='importance' draws t from the run's loss history, "
            f"which only a loss-aware run keeps (diffusion.t_sampler={config.diffusion.t_sampler!r}"
            "): use 'stratified'."
        )


def _get(config: ml_collections.ConfigDict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a bad key of ``config.eval``; compiles and reads nothing."""
    e = config.eval
    for key, kind in (("metrics", "metric"), ("figures", "figure")):
        bad = [n for n in e[key] if n not in _names(kind)]
        if isinstance(e[key], str) or bad:
            raise ValueError(f"config.eval.{key} has {bad or e[key]!r}; allowed: {_names(kind)}.")
    if isinstance(e.bpd_splits, str) or not all(isinstance(s, str) for s in e.bpd_splits):
        raise ValueError(
            f"config.eval.bpd_splits must be a tuple of split names, got {e.bpd_splits!r}."
        )
    _check_bound_estimate(config)
    for key, least in (
        ("num_examples", 0),
        ("bpd_ode.num_examples", 0),
        ("rate_distortion.num_examples", 0),
        ("bpd_splits_num_examples", -1),
    ):
        v = _get(e, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            meaning = "0: the whole split" + (", -1: as eval.num_examples" if least < 0 else "")
            raise ValueError(f"config.eval.{key}={v!r} must be an integer >= {least} ({meaning}).")
    for key in ("rtol", "atol"):
        if not 0 < e.bpd_ode[key] < float("inf"):
            raise ValueError(
                f"config.eval.bpd_ode.{key}={e.bpd_ode[key]!r} must be > 0 (the solver's "
                "tolerance; 1e-5 by default): at 0 no step is ever accepted."
            )
    if {*classifier_lib.METRICS, "class_match"} & set(e.metrics):
        judge.check_config(config)
    if "fid" in e.metrics or "is" in e.metrics:
        sharding.check_batch_size(e.inception.batch_size, "eval.inception.batch_size")
        sha = e.inception.sha256
        if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha.strip()):
            raise ValueError(f"config.eval.inception.sha256={sha!r} is not 64 hex digits.")
        for key in ("chunk_size", "num_samples"):
            if e.inception[key] <= 0:
                raise ValueError(
                    f"config.eval.inception.{key} must be positive, got {e.inception[key]}."
                )
        if e.inception.num_samples < e.inception.is_num_splits:
            raise ValueError(
                f"config.eval.inception.num_samples={e.inception.num_samples} must be >= "
                f"eval.inception.is_num_splits={e.inception.is_num_splits}."
            )


def prepare(
    config: ml_collections.ConfigDict, check_data: bool = True
) -> ml_collections.ConfigDict:
    """The config with its defaults filled in, checked whole (``config.validate`` and the
    evaluators' keys), ``model.conv_impl`` "auto" resolved for this platform (so a run's
    config.json names the formulation it ran): what every mode starts from.
    ``check_data=False``: see ``validate``."""
    config = config_lib.with_defaults(config)
    config_lib.validate(config, check_data)
    check_config(config)
    config.model.conv_impl = models.resolve_conv_impl(config.model.conv_impl)
    return config


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"


def run_evaluators(ctx: EvalContext) -> dict[str, Any]:
    """Run the wanted evaluators over ``ctx`` (a checked config), rewriting metrics.json after
    each; raise EvaluationError at the end if any failed."""
    path = os.path.join(sampling.output_folder(ctx.config, ctx.workdir, "eval"), "metrics.json")
    failed: dict[str, str] = {}
    for name in wanted(ctx.config):
        evaluator = EVALUATORS[name]
        reason = evaluator.skip(ctx)
        if reason:
            logging.warning("eval %s: skipped, it %s.", name, reason)
            continue
        try:
            out = evaluator.run(ctx)
        except (ImportError, OSError, ValueError) as e:  # expected: one line, no traceback
            failed[name] = _one_line(e)
            logging.error("eval %s failed: %s", name, failed[name])
            continue
        except Exception as e:  # a bug: its traceback goes to the log
            failed[name] = _one_line(e)
            logging.exception("eval %s failed: %s", name, failed[name])
            continue
        bad = _nonfinite_result(out)
        if bad:
            failed[name] = (
                f"{bad} = {out[bad]} is not finite, not reported as the result; likely cause: "
                + sampling.nonfinite_cause(
                    ctx.params, "the parameters are finite: the computation overflowed"
                )
            )
            logging.error("eval %s failed: %s", name, failed[name])
            continue
        ctx.metrics.update(out)
        reporting.write_json(path, _with_failures(ctx.metrics, failed))
    reporting.write_json(path, _with_failures(ctx.metrics, failed))
    logging.info("Wrote %s.", path)
    if failed:
        raise EvaluationError(
            f"{len(failed)} evaluation step(s) failed: "
            + "; ".join(f"{n} ({r})" for n, r in failed.items())
            + f". Every number computed is in {path}."
        )
    return ctx.metrics


def _nonfinite_result(out: dict[str, Any]) -> str | None:
    """The first top-level number of an evaluator's output that is not finite (its spreads,
    ``*_std`` / ``*_stderr``, aside: one example has none), or None."""
    for key, value in out.items():
        if key.endswith(("_std", "_stderr")) or isinstance(value, bool):
            continue
        if isinstance(value, int | float | np.floating) and not math.isfinite(value):
            return key
    return None


def _with_failures(metrics: dict[str, Any], failed: dict[str, str]) -> dict[str, Any]:
    return {**metrics, "failed": dict(failed)} if failed else dict(metrics)


def load_ema_params(workdir: str, mesh: jax.sharding.Mesh) -> Any:
    """The newest checkpoint's EMA parameters, replicated over the mesh."""
    return load_ema_params_and_step(workdir, mesh)[0]


def load_ema_params_and_step(workdir: str, mesh: jax.sharding.Mesh) -> tuple[Any, int]:
    """(the newest restorable checkpoint's EMA parameters replicated over the mesh, its step);
    logged, so that a reader knows which step was evaluated or sampled."""
    params, step = checkpoints.load_state_item_and_step(workdir, "ema_params")
    logging.info("Read the EMA parameters of the checkpoint of step %d in %s.", step, workdir)
    return jax.device_put(params, sharding.replicated(mesh)), step


def load_run_params(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh
) -> tuple[Any, dict[str, Any]]:
    """(the parameters ``--mode eval|sample`` read, replicated over the mesh; what to record of
    them): the newest checkpoint's EMA parameters and its step, or for a distilled run
    (``training.objective="distill"``) the student of ``sampling.num_steps`` steps."""
    if config.training.objective != "distill":
        params, step = load_ema_params_and_step(workdir, mesh)
        return params, {"checkpoint_step": step}
    n = config.sampling.num_steps
    params, meta = checkpoints.load_student(workdir, n)
    logging.info(
        "Read the student of %d steps (round %d of the distillation, step %d) in %s.",
        n,
        meta["round"] + 1,
        meta["step"],
        workdir,
    )
    record = {"checkpoint_step": meta["step"], "student_steps": n}
    return jax.device_put(params, sharding.replicated(mesh)), record


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    params: Any = None,
    model=None,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """``--mode eval``: the metrics and figures of ``config.eval`` for the run in ``workdir``
    (its newest checkpoint's EMA parameters unless ``params`` are given) -> eval/metrics.json."""
    config = prepare(config)
    model = model or models.get_model(config)
    mesh = mesh or sharding.make_mesh()
    ctx_metrics = {}
    if params is None:
        config_lib.check_workdir(config, workdir, mode="eval")  # before a mismatched restore
        params, ctx_metrics = load_run_params(config, workdir, mesh)
    return run_evaluators(EvalContext(config, model, params, mesh, workdir, metrics=ctx_metrics))


def sample(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
    """``--mode sample``: samples of the newest checkpoint's EMA parameters -> samples/."""
    config = prepare(config)
    config_lib.check_workdir(config, workdir, mode="sample")  # before a mismatched restore
    model = models.get_model(config)
    mesh = sharding.make_mesh()
    params, _ = load_run_params(config, workdir, mesh)
    sampler = sampling.make_sample_fn(config, model, mesh)
    return sampling.sample_and_save(config, sampler, params, workdir)
