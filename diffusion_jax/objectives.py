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
from diffusion_jax import distill as distill_lib
from diffusion_jax import models, schedules, timesteps
from diffusion_jax import score as score_lib
from diffusion_jax import vdm as vdm_lib

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


def gamma_fn(model, params: Any) -> vdm_lib.GammaFn:
    """The noise schedule ``t [B] -> γ(t) [B]`` of a vdm model (``models.continuous``) and its
    parameters."""
    return lambda t: model.apply({"params": params}, t, method="gamma")


SCHEDULE_GRADS = ("elbo", "variance")


def _vdm_loss(config: ml_collections.ConfigDict, model) -> LossFn:
    """VDM's bound (Kingma et al. 2021, eq. 17) in bits/dim per example, its diffusion term
    under ``vdm.weighting`` (Kingma & Gao 2023): L_0 + L_w + L_1; t by ``vdm.t_sampler``, the
    diffusion term the mean over ``vdm.t_per_example`` times of each example."""
    c, num_bins = config.vdm, config.data.num_bins
    variance = c.gamma == "learned" and c.schedule_grad == "variance"

    k = c.t_per_example

    def loss_fn(params, x0, key, labels=None):
        labels = training_labels(config, key, labels)
        dropout_key, t_key, noise_key, dec_key = jax.random.split(key, 4)
        b = x0.shape[0]
        if k > 1:  # each example at k times: one network batch of k B, the t spread over it
            x0 = jnp.concatenate([x0] * k)
            labels = None if labels is None else jnp.concatenate([labels] * k)
        t = timesteps.sample_continuous_t(t_key, k * b, c.t_sampler)  # [k B]
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)

        def apply(p, *args, method, **kw):
            return model.apply({"params": p}, *args, method=method, **kw)

        g0, g1 = apply(params, method="endpoints")
        s, ds = jax.jvp(lambda u: apply(params, u, method="shape"), (t,), (jnp.ones_like(t),))

        def diffusion(rest, s, ds):  # [B] nats; s, ds: the normalised shape at t and s'(t)
            p, g0, g1 = rest
            gamma_t = g0 + (g1 - g0) * s
            w = vdm_lib.weight(c.weighting, -gamma_t, c.sigmoid_bias, c.min_snr_gamma)
            rngs = {"dropout": dropout_key}

            def eps_fn(z, g):
                return apply(p, z, g, labels, train=True, rngs=rngs, method="eps")

            dgamma = (g1 - g0) * ds
            loss = vdm_lib.diffusion_loss_from_gamma(eps_fn, x0, gamma_t, dgamma, noise, w)
            return loss * scale  # bits/dim

        scale = vdm_lib.bits_per_dim_scale(x0)
        if variance:  # the shape's gradient minimises the diffusion loss's variance (VDM §4)
            diffusion = vdm_lib.variance_gradient(diffusion)
        diff = diffusion((params, g0, g1), s, ds).reshape(k, b).mean(axis=0)  # [B]
        x0 = x0[:b]
        decoder = vdm_lib.reconstruction_loss(
            x0, jnp.full((b,), g0), jax.random.normal(dec_key, x0.shape, x0.dtype), num_bins
        )
        prior = vdm_lib.prior_loss(x0, jnp.full((b,), g1))
        return {
            "loss": (decoder + prior) * scale + diff,
            "decoder_bpd": decoder * scale,
            "diffusion_bpd": diff,
            "prior_bpd": prior * scale,
            "gamma_0": jnp.full((b,), g0),
            "gamma_1": jnp.full((b,), g1),
        }

    return loss_fn


def _check_vdm(config: ml_collections.ConfigDict) -> None:
    c = config.vdm
    if not config.data.image_size:
        raise ValueError(
            "config.training.objective='vdm' bounds -log P(x) of images of data.num_bins grey "
            "levels; it needs image data (data.image_size > 0)."
        )
    for key, allowed in (
        ("gamma", vdm_lib.GAMMAS),
        ("weighting", vdm_lib.WEIGHTINGS),
        ("t_sampler", timesteps.CONTINUOUS_T_SAMPLERS),
        ("schedule_grad", SCHEDULE_GRADS),
    ):
        if c[key] not in allowed:
            raise ValueError(f"config.vdm.{key}={c[key]!r} is not one of {allowed}.")
    lo, hi = c.gamma_min, c.gamma_max
    if not (-1e3 < lo < hi < 1e3):
        raise ValueError(
            f"config.vdm.gamma_min={lo!r} and vdm.gamma_max={hi!r} must be finite with "
            "gamma_min < gamma_max (gamma = log sigma^2/alpha^2 at t = 0 and t = 1)."
        )
    if c.gamma == "beta_linear":
        make_diffusion(config)  # the betas it takes its continuous form from
    if not (isinstance(c.t_per_example, int) and c.t_per_example >= 1):
        raise ValueError(
            f"config.vdm.t_per_example={c.t_per_example!r} must be an integer >= 1 (the times "
            "each training example is diffused at, in one network batch)."
        )
    if not (isinstance(c.gamma_hidden, int) and c.gamma_hidden >= 1):
        raise ValueError(f"config.vdm.gamma_hidden={c.gamma_hidden!r} must be an integer >= 1.")
    if not (isinstance(c.eval_num_steps, int) and c.eval_num_steps >= 0):
        raise ValueError(
            f"config.vdm.eval_num_steps={c.eval_num_steps!r} must be an integer >= 0 (0: only "
            "the continuous bound)."
        )
    if not c.min_snr_gamma > 0 or not abs(c.sigmoid_bias) < 1e3:
        raise ValueError(
            f"config.vdm.min_snr_gamma={c.min_snr_gamma!r} must be > 0 and vdm.sigmoid_bias="
            f"{c.sigmoid_bias!r} finite."
        )
    d = config.diffusion
    if d.var_type == "learned_range":
        raise ValueError(
            "config.diffusion.var_type='learned_range' has no meaning under training.objective="
            "'vdm': the continuous bound needs no learned variance (the network outputs eps)."
        )
    if d.t_sampler != "uniform":
        raise ValueError(
            f"config.diffusion.t_sampler={d.t_sampler!r}: the vdm objective draws t by "
            "vdm.t_sampler (low_discrepancy | uniform); leave diffusion.t_sampler='uniform'."
        )


def _check_ddpm(config: ml_collections.ConfigDict) -> None:
    make_diffusion(config)  # schedule arguments (T >= 1, betas in (0, 1)), mean and variance types
    loss_type = config.diffusion.loss_type
    if loss_type not in diffusion_lib.LOSS_TYPES:
        raise ValueError(
            f"config.diffusion.loss_type={loss_type!r} is not one of {diffusion_lib.LOSS_TYPES}."
        )
    c = config.diffusion
    sampler = c.t_sampler
    if sampler not in timesteps.TRAIN_T_SAMPLERS:
        raise ValueError(
            f"config.diffusion.t_sampler={sampler!r} is not one of {timesteps.TRAIN_T_SAMPLERS}."
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


def distill_rounds(config: ml_collections.ConfigDict) -> list[int]:
    """The students' numbers of steps, one per round: start_steps / 2, / 4, ..., target_steps
    (``config.distill``; checked by ``_check_distill``)."""
    c = config.distill
    out, n = [], c.start_steps
    while n > c.target_steps:
        n //= 2
        out.append(n)
    return out


def _distill_loss(config: ml_collections.ConfigDict, model) -> LossFn:
    """Progressive distillation's per-example loss (``distill.distillation_loss``): the
    student (``model``, ``params``) against a teacher's two DDIM steps on the grid of N student
    steps (k uniform in [0, N)). The teacher comes with the call: ``teacher_process`` and
    ``teacher_fn`` (the trained run, or the previous round's student), ``num_steps`` N (may be
    traced)."""
    process = diffusion_lib.DiscreteProcess(make_diffusion(config))
    c, clip = config.distill, config.sampling.clip_denoised

    def loss_fn(params, x0, key, labels=None, *, teacher_process, teacher_fn, num_steps):
        del labels  # _check_distill refuses a conditional config
        k_key, noise_key = jax.random.split(key)
        k = jax.random.randint(k_key, x0.shape[:1], 0, num_steps)  # [B] student steps
        noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
        student_fn = models.model_fn(model, params)
        loss = distill_lib.distillation_loss(
            process, student_fn, teacher_process, teacher_fn, x0, noise, k, num_steps, c.weight,
            clip,
        )  # fmt: skip
        return {"loss": loss}

    return loss_fn


DISTILL_INITS = ("teacher", "random")


def _check_distill(config: ml_collections.ConfigDict) -> None:
    c, d = config.distill, config.diffusion
    if not isinstance(c.teacher, str) or not c.teacher:
        raise ValueError(
            "config.distill.teacher is empty: give the workdir of the trained run to distil, "
            "e.g. --config configs/digits_distill.py:runs/digits."
        )
    for key, least in (("start_steps", 2), ("target_steps", 1), ("steps_per_round", 1)):
        v = c[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"config.distill.{key}={v!r} must be an integer >= {least}.")
    ratio = c.start_steps // c.target_steps
    if c.start_steps % c.target_steps or ratio < 2 or ratio & (ratio - 1):
        raise ValueError(
            f"config.distill.start_steps={c.start_steps} must be target_steps={c.target_steps} "
            "times a power of 2 (>= 2): each round halves the steps."
        )
    if c.start_steps > d.num_timesteps:
        raise ValueError(
            f"config.distill.start_steps={c.start_steps} must be <= diffusion.num_timesteps="
            f"{d.num_timesteps}."
        )
    if not 0 < c.learning_rate < float("inf"):
        raise ValueError(f"config.distill.learning_rate={c.learning_rate!r} must be > 0.")
    for key, allowed in (("weight", distill_lib.DISTILL_WEIGHTS), ("init", DISTILL_INITS)):
        if c[key] not in allowed:
            raise ValueError(f"config.distill.{key}={c[key]!r} is not one of {allowed}.")
    if d.mean_type == "eps" or d.var_type == "learned_range":
        raise ValueError(
            f"config.diffusion.mean_type={d.mean_type!r}, var_type={d.var_type!r}: a distilled "
            "student predicts v (or x0), never eps (its x0_hat would be amplified 1/alpha, ~156x "
            "at the first step of the linear schedule), and has no learned variance: use "
            "mean_type='v', var_type='fixedlarge'."
        )
    if config.model.num_classes or not config.data.image_size:
        raise ValueError(
            "training.objective='distill' distils unconditional image models (model.num_classes"
            f"={config.model.num_classes}, data.image_size={config.data.image_size})."
        )
    students = distill_rounds(config)
    if config.sampling.num_steps not in students:
        raise ValueError(
            f"config.sampling.num_steps={config.sampling.num_steps}: a distilled run samples "
            f"only on the grids of its students, {students} steps."
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
    "vdm": Objective(_vdm_loss, "ancestral", True, _check_vdm),
    # Trained by ``distill_train`` (rounds against a teacher), not by ``train``.
    "distill": Objective(_distill_loss, "distilled", False, _check_distill),
}


def get_objective(config: ml_collections.ConfigDict) -> Objective:
    name = config.training.objective
    if name not in OBJECTIVES:
        raise ValueError(f"config.training.objective={name!r} is not one of {tuple(OBJECTIVES)}.")
    return OBJECTIVES[name]
