"""Training objectives by name, and the maths objects a config asks for.

``OBJECTIVES[config.training.objective]`` gives the per-example loss of the objective, the
sampler its models draw with by default, and whether it has a likelihood bound (bits/dim).
A new objective is one new entry here plus its loss builder.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import models, schedules
from diffusion_jax import score as score_lib

# loss_fn(params, x0, key, labels=None) -> {"loss": [B], ...}: per-example losses of a training
# batch (labels [B] the classes of a conditional model's batch); the ddpm one also takes t=[B]
# and weights=[B] (drawn by the train step for diffusion.t_sampler='loss_aware*'; with
# 'loss_aware_vb' the weights are applied inside, to the vb term, and "vb_loss" is returned).
LossFn = Callable[..., dict[str, jax.Array]]

_LABEL_DROP_TAG = 0x1AB  # fold_in(step key, .): the label dropout's key (the others unchanged)


def make_diffusion(config: ml_collections.ConfigDict) -> diffusion_lib.GaussianDiffusion:
    """The Gaussian diffusion of ``config.diffusion`` (schedule, mean and variance types)."""
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


def loss_aware(config: ml_collections.ConfigDict) -> bool:
    """Whether training importance-samples t from a loss history (the train state's
    ``loss_history``): ``diffusion.t_sampler`` "loss_aware" or "loss_aware_vb" under the ddpm
    objective; the ncsn objective, which ignores the diffusion section, draws its noise levels
    uniformly."""
    return config.training.objective == "ddpm" and config.diffusion.t_sampler != "uniform"


def loss_aware_vb(config: ml_collections.ConfigDict) -> bool:
    """Whether the importance-sampled t drives only the hybrid loss's vb term
    (``diffusion.t_sampler="loss_aware_vb"``; the mse term keeps a uniform t)."""
    return loss_aware(config) and config.diffusion.t_sampler == "loss_aware_vb"


def run_keys(seed: int) -> dict[str, jax.Array]:
    """The run's root keys, one per purpose, all derived from ``seed``."""
    names = ("init", "train", "sample", "eval")
    return dict(zip(names, jax.random.split(jax.random.key(seed), len(names)), strict=True))


def drop_labels(key: jax.Array, labels: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Classifier-free guidance's training (Ho & Salimans 2022, algorithm 1): each label [B]
    replaced by the "no class" index ``num_classes`` with probability ``rate``, independently."""
    drop = jax.random.bernoulli(key, rate, labels.shape)  # [B]
    return jnp.where(drop, num_classes, labels)


def training_labels(
    config: ml_collections.ConfigDict, key: jax.Array, labels: jax.Array | None
) -> jax.Array | None:
    """The labels the network sees in training: ``labels`` with ``training.label_dropout``
    applied (key fold_in(key, _LABEL_DROP_TAG), so the other draws of the step are unchanged)."""
    rate = config.training.label_dropout
    if labels is None or not rate:
        return labels
    key = jax.random.fold_in(key, _LABEL_DROP_TAG)
    return drop_labels(key, labels, rate, config.model.num_classes)


def _ddpm_loss(config: ml_collections.ConfigDict, model) -> LossFn:
    d = make_diffusion(config)

    c = config.diffusion
    split = loss_aware_vb(config)

    def loss_fn(params, x0, key, labels=None, t=None, weights=None):
        labels = training_labels(config, key, labels)
        dropout_key, loss_key = jax.random.split(key)
        if labels is not None and split:  # the mse and the vb halves of one network call
            labels = jnp.concatenate([labels, labels])
        net = models.model_fn(model, params, train=True, dropout_key=dropout_key, labels=labels)
        t_kw = dict(t_vb=t, vb_weights=weights) if split else dict(t=t)
        return diffusion_lib.training_losses(
            d,
            net,
            x0,
            loss_key,
            loss_type=c.loss_type,
            num_bins=config.data.num_bins,
            mse_weighting=c.mse_weighting,
            min_snr_gamma=c.min_snr_gamma,
            hybrid_lambda=c.hybrid_lambda,
            hybrid_train_mean=c.hybrid_train_mean,
            **t_kw,
        )

    return loss_fn


def _ncsn_loss(config: ml_collections.ConfigDict, model) -> LossFn:
    sigmas = make_sigmas(config)

    def loss_fn(params, x0, key, labels=None):
        del labels  # _check_ncsn refuses a conditional config
        dropout_key, loss_key = jax.random.split(key)
        net = models.model_fn(model, params, train=True, dropout_key=dropout_key)
        score_fn = score_lib.ncsn_score_fn(net, sigmas)
        return {"loss": score_lib.ncsn_loss(score_fn, x0, sigmas, loss_key)}

    return loss_fn


def _check_ddpm(config: ml_collections.ConfigDict) -> None:
    make_diffusion(config)  # schedule arguments (T >= 1, betas in (0, 1)), mean and variance types
    loss_type = config.diffusion.loss_type
    if loss_type not in diffusion_lib.LOSS_TYPES:
        raise ValueError(
            f"config.diffusion.loss_type={loss_type!r} is not one of {diffusion_lib.LOSS_TYPES}."
        )
    c = config.diffusion
    sampler = c.t_sampler
    if sampler not in diffusion_lib.T_SAMPLERS:
        raise ValueError(
            f"config.diffusion.t_sampler={sampler!r} is not one of {diffusion_lib.T_SAMPLERS}."
        )
    if sampler == "loss_aware_vb" and loss_type != "hybrid":
        raise ValueError(
            f"config.diffusion.t_sampler='loss_aware_vb' samples t for the vb term of "
            f"loss_type='hybrid'; got loss_type={loss_type!r} (use t_sampler 'loss_aware')."
        )
    if c.mse_weighting not in diffusion_lib.MSE_WEIGHTINGS:
        raise ValueError(
            f"config.diffusion.mse_weighting={c.mse_weighting!r} is not one of "
            f"{diffusion_lib.MSE_WEIGHTINGS}."
        )
    if not c.min_snr_gamma > 0:
        raise ValueError(f"config.diffusion.min_snr_gamma={c.min_snr_gamma!r} must be > 0.")
    if not c.hybrid_lambda >= 0:
        raise ValueError(f"config.diffusion.hybrid_lambda={c.hybrid_lambda!r} must be >= 0.")


def _check_ncsn(config: ml_collections.ConfigDict) -> None:
    if config.model.num_classes:
        raise ValueError(
            f"config.model.num_classes={config.model.num_classes}: the ncsn objective trains "
            "unconditional score networks only; use training.objective='ddpm' for a "
            "class-conditional model, or model.num_classes=0."
        )
    make_sigmas(config)  # 0 < sigma_min < sigma_max, num_levels >= 2
    if config.ncsn.n_steps_each < 1 or config.ncsn.step_lr <= 0:
        raise ValueError(
            f"config.ncsn.n_steps_each={config.ncsn.n_steps_each} must be >= 1 and "
            f"config.ncsn.step_lr={config.ncsn.step_lr} must be > 0."
        )


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a training objective brings to a run."""

    make_loss_fn: Callable[[ml_collections.ConfigDict, Any], LossFn]
    default_sampler: str  # the sampling.method its models draw with unless told otherwise
    has_bound: bool  # a likelihood bound in bits/dim exists (the bpd evaluators)
    check_config: Callable[[ml_collections.ConfigDict], None]  # raises ValueError


OBJECTIVES: dict[str, Objective] = {
    "ddpm": Objective(_ddpm_loss, "ancestral", True, _check_ddpm),
    "ncsn": Objective(_ncsn_loss, "langevin", False, _check_ncsn),
}


def get_objective(config: ml_collections.ConfigDict) -> Objective:
    name = config.training.objective
    if name not in OBJECTIVES:
        raise ValueError(f"config.training.objective={name!r} is not one of {tuple(OBJECTIVES)}.")
    return OBJECTIVES[name]
