"""Optimisers by name (optax): Adam(W) with linear warmup, an optional cosine decay and global-norm
clipping; the EMA of the parameters, with its optional warm-up; the checks of every
``config.optim`` value."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

__all__ = [
    "LR_DECAYS",
    "OPTIMIZERS",
    "check_config",
    "ema_decay_at",
    "ema_update",
    "learning_rate_schedule",
    "make_optimizer",
]


def _adam(o: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    return optax.adam(schedule, o.beta1, o.beta2, o.eps)


def _adamw(o: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, o.beta1, o.beta2, o.eps, weight_decay=o.weight_decay)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": _adam,
    "adamw": _adamw,
}
LR_DECAYS = ("constant", "cosine")  # what follows the warm-up


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """The learning rate at step n, with W = ``optim.warmup_steps`` and N =
    ``training.num_train_steps``:

        "constant":  lr · min(n / W, 1)
        "cosine":    lr · n / W for n < W, then lr · ½ (1 + cos(π (n − W) / (N − W))): 0 at N

    (``optim.lr_decay``). The cosine spans the run's N: a run resumed with a larger N goes on
    from the higher rate of the longer schedule."""
    o = config.optim
    if o.lr_decay == "cosine":
        n = config.training.num_train_steps
        return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, o.warmup_steps, n, 0.0)
    if o.warmup_steps == 0:
        return optax.constant_schedule(o.learning_rate)
    return optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optim.optimizer`` with ``learning_rate_schedule`` and clipping of the global
    gradient norm at ``optim.grad_clip`` (0: none). Returns (optimizer, schedule)."""
    check_config(config)
    o = config.optim
    schedule = learning_rate_schedule(config)
    opt = OPTIMIZERS[o.optimizer](o, schedule)
    if o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt, schedule


def ema_decay_at(step: jax.Array, decay: float, warmup_power: float = 0.0) -> jax.Array | float:
    """The EMA's decay at update ``step`` (0-based: the decay that mixes in the parameters after
    update step + 1):

        d_n = min(decay, 1 - (1 + n)^-p)

    (the warm-up of k-diffusion's and diffusers' EMA). ``warmup_power`` p = 0 keeps the constant
    ``decay``. With p > 0, d_0 = 0, so the average starts at the first trained parameters rather
    than the random initial ones, and its memory grows like n^p / p steps until ``decay`` caps it:
    a run of N steps keeps none of its initialisation, where a constant 0.999 keeps 0.999^N of it
    (13.5 % after 2,000 steps). With p = 0 the Python float itself, as before the warm-up."""
    if not warmup_power:
        return decay
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), 1.0 - (1.0 + n) ** -jnp.float32(warmup_power))


def ema_update(ema, params, decay: jax.Array | float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in each leaf's dtype."""
    return optax.incremental_update(params, ema, 1.0 - decay)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Every ``config.optim`` value, before anything compiles: ValueError naming the key, the
    bad value and what is allowed."""
    o = config.optim
    if o.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"config.optim.optimizer={o.optimizer!r} is not one of {tuple(OPTIMIZERS)}."
        )
    rules = (  # key, test, what is allowed
        ("learning_rate", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("beta1", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("beta2", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("eps", lambda v: _finite(v) and v > 0, "a finite number > 0"),
        ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
        ("grad_clip", lambda v: _finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
        ("ema_decay", lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
        (
            "ema_warmup_power",
            lambda v: _finite(v) and v >= 0,
            "a finite number >= 0 (0: no warm-up; 3/4 suits runs of thousands of steps)",
        ),
        (
            "warmup_steps",
            lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
            "an integer >= 0",
        ),
    )
    for key, ok, allowed in rules:
        value = o[key]
        if not ok(value):
            raise ValueError(f"config.optim.{key}={value!r} must be {allowed}.")
    if o.lr_decay not in LR_DECAYS:
        raise ValueError(f"config.optim.lr_decay={o.lr_decay!r} is not one of {LR_DECAYS}.")
    steps = config.training.num_train_steps
    if o.lr_decay == "cosine" and not steps > o.warmup_steps:
        raise ValueError(
            f"config.optim.lr_decay='cosine' decays over the steps after the warm-up, but "
            f"training.num_train_steps={steps} <= optim.warmup_steps={o.warmup_steps}: "
            "lower the warm-up or train longer."
        )
