"""From a config to the objects of a run: the checked config, the diffusion, the model function.

Every check here runs before anything is compiled or written, so a bad config costs a second
and leaves the workdir untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline, models, runtime, schedules, sharding
from diffusion_jax import score as score_lib

# Enumerated keys of the system's own sections (data and model keys are checked by
# input_pipeline.validate_dataset and models.check_config).
CHOICES = {
    "cpu_conv_library": tuple(runtime.CPU_CONV_LIBRARIES),
    "diffusion.beta_schedule": ("linear", "cosine", "quadratic", "const"),
    "diffusion.mean_type": ("eps", "x0", "v"),
    "diffusion.var_type": ("fixedlarge", "fixedsmall", "learned_range"),
    "diffusion.loss_type": ("simple", "vlb", "hybrid", "kl"),
    "optim.optimizer": ("adam", "adamw"),
    "training.objective": ("ddpm", "ncsn"),
    "sampling.method": ("ancestral", "ddim"),
}
EVAL_METRICS = ("bpd", "fid", "is")

# Keys that may change between a run and its resumption (how long, how often, what to report).
RESUMABLE_KEYS = (
    "cpu_conv_library",
    "training.num_train_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.sample_every",
    "training.keep_checkpoints",
    "training.eval_at_end",
    "data.data_dir",
    "eval.",
    "sampling.",
)


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key, the bad value and the allowed ones; compiles nothing."""
    for key, allowed in CHOICES.items():
        value = _get(config, key)
        if value not in allowed:
            raise ValueError(f"config.{key}={value!r} is not one of {allowed}.")
    bad = [m for m in config.eval.metrics if m not in EVAL_METRICS]
    if bad:
        raise ValueError(f"config.eval.metrics has {bad}; allowed: {EVAL_METRICS}.")
    input_pipeline.validate_dataset(config)
    models.check_config(config)
    sharding.check_batch_size(config.training.batch_size)
    sharding.check_batch_size(config.eval.batch_size, "eval.batch_size")
    sharding.check_batch_size(config.sampling.batch_size, "sampling.batch_size")
    if config.training.objective == "ddpm":
        make_diffusion(config)  # schedule arguments (T >= 1, betas in (0, 1))
    else:
        make_sigmas(config)  # 0 < sigma_min < sigma_max, num_levels >= 2
        if config.ncsn.n_steps_each < 1 or config.ncsn.step_lr <= 0:
            raise ValueError(
                f"config.ncsn.n_steps_each={config.ncsn.n_steps_each} must be >= 1 and "
                f"config.ncsn.step_lr={config.ncsn.step_lr} must be > 0."
            )


def make_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
    c = config.diffusion
    kw = {}
    if c.beta_schedule in ("linear", "quadratic"):
        kw = dict(beta_start=c.beta_start, beta_end=c.beta_end)
    elif c.beta_schedule == "const":
        kw = dict(beta=c.beta_end)
    betas = schedules.get_beta_schedule(c.beta_schedule, c.num_timesteps, **kw)
    return diffusion_lib.GaussianDiffusion.create(betas, mean_type=c.mean_type, var_type=c.var_type)


def make_sigmas(config: ml_collections.ConfigDict) -> jax.Array:
    """The NCSN noise levels σ_1 > … > σ_L of ``config.ncsn``."""
    c = config.ncsn
    return score_lib.ncsn_sigmas(c.sigma_max, c.sigma_min, c.num_levels)


def model_fn(
    model, params: Any, train: bool = False, dropout_key: jax.Array | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_t, t)`` for the math core, closing over parameters (and a dropout key)."""
    rngs = {"dropout": dropout_key} if train else {}

    def fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return model.apply({"params": params}, x, t, train=train, rngs=rngs)

    return fn


def config_differences(old: dict, new: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a saved config (dict) and ``new``, ignoring
    RESUMABLE_KEYS."""
    new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        if any(dotted == r or (r.endswith(".") and dotted.startswith(r)) for r in RESUMABLE_KEYS):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, dotted + ".")
        elif _normalise(a) != _normalise(b):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _normalise(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The run's root keys, one per purpose, all derived from ``seed``."""
    names = ("init", "train", "sample", "eval")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def ncsn_score_fn(net: Callable, sigmas: jax.Array) -> Callable:
    """s(x, i) = net(x, i) / σ_i: the NCSNv2 parametrisation of a level-conditioned score."""

    def score_fn(x, level):
        level = jnp.broadcast_to(level, x.shape[:1]).astype(jnp.int32)  # [B]
        sigma = sigmas[level].reshape((-1,) + (1,) * (x.ndim - 1))
        return net(x, level) / sigma

    return score_fn
