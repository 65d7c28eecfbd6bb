"""Optimisers by name (optax): Adam(W) with linear warmup and global-norm clipping."""

from __future__ import annotations

from collections.abc import Callable

import ml_collections
import optax


def _adam(o: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    return optax.adam(schedule, o.beta1, o.beta2, o.eps)


def _adamw(o: ml_collections.ConfigDict, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, o.beta1, o.beta2, o.eps, weight_decay=o.weight_decay)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": _adam,
    "adamw": _adamw,
}


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``config.optim.optimizer`` with the learning rate lr·min(step/warmup, 1) and clipping of
    the global gradient norm at ``optim.grad_clip`` (0: none). Returns (optimizer, schedule)."""
    o = config.optim
    if o.optimizer not in OPTIMIZERS:
        raise ValueError(
            f"config.optim.optimizer={o.optimizer!r} is not one of {tuple(OPTIMIZERS)}."
        )
    schedule = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
    if o.warmup_steps == 0:
        schedule = optax.constant_schedule(o.learning_rate)
    opt = OPTIMIZERS[o.optimizer](o, schedule)
    if o.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt, schedule
