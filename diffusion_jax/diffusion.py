"""DDPM as a hierarchical VAE (Ho et al. 2020), with Improved DDPM and DDIM extensions.

Pure functions over a ``GaussianDiffusion`` schedule pytree ``d`` and a ``model_fn(x_t, t)``
callable. Conventions: data ``x0`` in [-1, 1] of shape [B, ...]; ``t`` is a zero-based int32 array
of shape [B] (t = 0 is the paper's t = 1); abar_t = prod_{s <= t} (1 - beta_s); bits/dim are
means over the non-batch dimensions divided by ln 2. Every function jits and vmaps (vmap adds
axes in front of the batch axis); every function that samples takes an explicit key.

Noise is drawn in float32 and cast to the data dtype, so one key gives the same draws with or
without ``jax_enable_x64``.
"""

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax import likelihood, samplers, schedules, timesteps

__all__ = [
    "DiscreteProcess",
    "GaussianDiffusion",
    "HYBRID_LAMBDA",
    "LOSS_TYPES",
    "MEAN_TYPES",
    "MSE_WEIGHTINGS",
    "ModelFn",
    "VAR_TYPES",
    "alpha_sigma",
    "bound_terms",
    "calc_bpd_loop",
    "chain_keys",
    "classifier_free_guidance",
    "ddim_sample_loop",
    "eps_and_x0",
    "eps_from_score",
    "lambda_from_t",
    "log_alpha_cumprod",
    "maybe_respace",
    "min_snr_weight",
    "model_time",
    "mse_weight",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "p_sample",
    "p_sample_loop",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "sampled_bound_terms",
    "score_from_eps",
    "sigma_from_t",
    "space_timesteps",
    "t_from_lambda",
    "t_from_sigma",
    "training_losses",
    "vb_terms_bpd",
    "vb_terms_bpd_from_p",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned_range")
LOSS_TYPES = ("simple", "vlb", "hybrid", "kl")
HYBRID_LAMBDA = 0.001  # Improved DDPM's lambda in L_hybrid = L_simple + lambda L_vlb
MSE_WEIGHTINGS = ("none", "min_snr")  # the mse term's weight over t (``mse_weight``)


def _tables(betas, alphas_cumprod, one_minus_alphas_cumprod, xp) -> dict:
    """Every per-t table from beta_t, abar_t and 1 - abar_t (passed separately for accuracy).

    abar_{t-1} (abar_{-1} = 1), beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t),
    mu~_t = coef1 x0 + coef2 x_t with coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t),
    coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t); log beta~ is clipped at t = 0 (where
    beta~ = 0) to log beta~_1 (log beta_0 when T = 1).
    """
    abar, omab = alphas_cumprod, one_minus_alphas_cumprod  # [T]
    abar_prev = xp.concatenate([xp.ones_like(abar[:1]), abar[:-1]])
    omab_prev = xp.concatenate([xp.zeros_like(omab[:1]), omab[:-1]])
    posterior_variance = betas * omab_prev / omab
    clip = posterior_variance[1:2] if betas.shape[0] > 1 else betas[:1]
    return dict(
        betas=betas,
        log_betas=xp.log(betas),
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=xp.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=xp.sqrt(omab),
        log_one_minus_alphas_cumprod=xp.log(omab),
        sqrt_recip_alphas_cumprod=1.0 / xp.sqrt(abar),
        sqrt_recipm1_alphas_cumprod=xp.sqrt(omab / abar),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=xp.log(xp.concatenate([clip, posterior_variance[1:]])),
        posterior_mean_coef1=betas * xp.sqrt(abar_prev) / omab,
        posterior_mean_coef2=omab_prev * xp.sqrt(abar / abar_prev) / omab,
    )


@struct.dataclass
class GaussianDiffusion:
    """The schedule: per-t tables [T] and the (static) parametrisation.

    ``timestep_map[t]`` is the index the model is called with at step t: the identity, or the
    original steps of a respaced chain (see ``respace``).
    """

    betas: jax.Array
    log_betas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    log_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    posterior_mean_coef1: jax.Array
    posterior_mean_coef2: jax.Array
    timestep_map: jax.Array
    mean_type: str = struct.field(pytree_node=False, default="eps")
    var_type: str = struct.field(pytree_node=False, default="fixedlarge")

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]

    @classmethod
    def create(
        cls,
        betas: np.ndarray,
        mean_type: str = "eps",
        var_type: str = "fixedlarge",
        dtype: jnp.dtype = jnp.float32,
    ) -> "GaussianDiffusion":
        """Builds every table in float64 NumPy from ``betas`` [T], then casts to ``dtype``.

        Raises ValueError for betas outside (0, 1) or an unknown ``mean_type`` / ``var_type``.
        """
        _check_choice("mean_type", mean_type, MEAN_TYPES)
        _check_choice("var_type", var_type, VAR_TYPES)
        betas = np.asarray(betas, dtype=np.float64)
        schedules.check_betas(betas)
        abar = np.cumprod(1.0 - betas)
        omab = -np.expm1(np.cumsum(np.log1p(-betas)))  # 1 - abar without cancellation
        tables = {k: jnp.asarray(v, dtype) for k, v in _tables(betas, abar, omab, np).items()}
        timestep_map = jnp.arange(betas.shape[0], dtype=jnp.int32)
        return cls(**tables, timestep_map=timestep_map, mean_type=mean_type, var_type=var_type)


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; allowed: {list(allowed)}.")


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
    """v [B] shaped to broadcast against x: [B] -> [B, 1, ..., 1]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _at(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """table[t] shaped to broadcast against x: [B, 1, ..., 1]."""
    return _bcast(table[t], x)


def _sqrt_abar(d: GaussianDiffusion, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sqrt(abar_t), sqrt(1 - abar_t)), each [B, 1, ..., 1]."""
    return _at(d.sqrt_alphas_cumprod, t, x), _at(d.sqrt_one_minus_alphas_cumprod, t, x)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """N(0, I) drawn in float32 (the same draws under x64), cast to ``dtype``."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Respacing (Improved DDPM section 4)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced steps of {0, ..., T-1}, increasing, always including T - 1
    (and 0 when num_steps > 1): round(linspace(T - 1, 0, K)) reversed."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
    steps = np.round(np.linspace(num_timesteps - 1, 0, num_steps))[::-1].astype(np.int32)
    return np.ascontiguousarray(steps)


def respace(d: GaussianDiffusion, timesteps: np.ndarray) -> GaussianDiffusion:
    """The chain that visits only ``timesteps`` (increasing, unique) of ``d``.

    Keeps abar at those steps and recomputes beta_k = 1 - abar_{t_k} / abar_{t_{k-1}}; the model is
    still called with the original indices through ``timestep_map``. Works on traced ``d``.
    """
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size < 1 or np.any(np.diff(ts) <= 0) or ts[0] < 0:
        raise ValueError(f"timesteps must be increasing unique non-negative ints, got {ts}.")
    if ts[-1] >= d.num_timesteps:
        raise ValueError(f"timesteps must be < T = {d.num_timesteps}, got {ts[-1]}.")
    abar = d.alphas_cumprod[ts]  # [K]
    omab = jnp.square(d.sqrt_one_minus_alphas_cumprod[ts])
    abar_prev = jnp.concatenate([jnp.ones_like(abar[:1]), abar[:-1]])
    omab_prev = jnp.concatenate([jnp.zeros_like(omab[:1]), omab[:-1]])
    # abar_{k-1} - abar_k from whichever of abar, 1 - abar is small (and hence accurate).
    diff = jnp.where(abar_prev > 0.5, omab - omab_prev, abar_prev - abar)
    tables = _tables(diff / abar_prev, abar, omab, jnp)
    return GaussianDiffusion(
        **tables,
        timestep_map=d.timestep_map[ts],
        mean_type=d.mean_type,
        var_type=d.var_type,
    )


def maybe_respace(d: GaussianDiffusion, num_steps: int | None) -> GaussianDiffusion:
    if num_steps is None or num_steps == d.num_timesteps:
        return d
    return respace(d, space_timesteps(d.num_timesteps, num_steps))


# ----------------------------------------------------------------------------------------------
# Forward process and posterior


def q_mean_variance(
    d: GaussianDiffusion, x0: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) -> (mean, variance, log_variance)."""
    sqrt_a, sqrt_1ma = _sqrt_abar(d, t, x0)
    mean = sqrt_a * x0  # [B, ...]
    variance = jnp.broadcast_to(jnp.square(sqrt_1ma), mean.shape)
    log_variance = jnp.broadcast_to(_at(d.log_one_minus_alphas_cumprod, t, x0), mean.shape)
    return mean, variance, log_variance


def q_sample(d: GaussianDiffusion, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
    sqrt_a, sqrt_1ma = _sqrt_abar(d, t, x0)
    return sqrt_a * x0 + sqrt_1ma * noise


def q_posterior_mean_variance(
    d: GaussianDiffusion, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x0) = N(mu~_t, beta~_t I) -> (mean, variance, log_variance_clipped):

    mu~_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x0
            + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t,
    beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t; at t = 0 the posterior is the point x0.
    """
    mean = _at(d.posterior_mean_coef1, t, x_t) * x0 + _at(d.posterior_mean_coef2, t, x_t) * x_t
    variance = jnp.broadcast_to(_at(d.posterior_variance, t, x_t), mean.shape)
    log_var = jnp.broadcast_to(_at(d.posterior_log_variance_clipped, t, x_t), mean.shape)
    return mean, variance, log_var


# ----------------------------------------------------------------------------------------------
# Parametrisations: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0


def predict_x0_from_eps(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array
) -> jax.Array:
    """x0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
    return _at(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - (
        _at(d.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
    )


def predict_eps_from_x0(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, x0: jax.Array
) -> jax.Array:
    """eps = (x_t / sqrt(abar_t) - x0) / sqrt(1/abar_t - 1)."""
    return (_at(d.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _at(
        d.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def predict_x0_from_v(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, v: jax.Array
) -> jax.Array:
    """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    sqrt_a, sqrt_1ma = _sqrt_abar(d, t, x_t)
    return sqrt_a * x_t - sqrt_1ma * v


def predict_eps_from_v(
    d: GaussianDiffusion, x_t: jax.Array, t: jax.Array, v: jax.Array
) -> jax.Array:
    """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
    sqrt_a, sqrt_1ma = _sqrt_abar(d, t, x_t)
    return sqrt_1ma * x_t + sqrt_a * v


def predict_v(d: GaussianDiffusion, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0."""
    sqrt_a, sqrt_1ma = _sqrt_abar(d, t, x0)
    return sqrt_a * eps - sqrt_1ma * x0


def score_from_eps(d: GaussianDiffusion, eps: jax.Array, t: jax.Array) -> jax.Array:
    """Score of q(x_t): grad log q(x_t) = -E[eps | x_t] / sqrt(1 - abar_t)."""
    return -eps / _at(d.sqrt_one_minus_alphas_cumprod, t, eps)


def eps_from_score(d: GaussianDiffusion, score: jax.Array, t: jax.Array) -> jax.Array:
    """eps = -sqrt(1 - abar_t) score (the inverse of ``score_from_eps``)."""
    return -_at(d.sqrt_one_minus_alphas_cumprod, t, score) * score


def classifier_free_guidance(
    out_cond: jax.Array, out_uncond: jax.Array, w: float | jax.Array, learned_variance: bool
) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6):
    eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, none).

    ``out_cond``, ``out_uncond``: the model outputs [B, ...] under the class and under "no
    class". For x0 or v models the guidance acts on the implied eps: eps is affine in the output
    with an x_t term that does not depend on it (eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar),
    eps = sqrt(abar) v + sqrt(1 - abar) x_t), and the weights (1 + w, -w) sum to 1, so the same
    combination of the outputs themselves is exactly the output whose implied eps is eps~. A
    learned variance (the second half of the last axis) is the conditional output's.
    """
    if not learned_variance:
        return (1.0 + w) * out_cond - w * out_uncond
    mean_c, var_c = jnp.split(out_cond, 2, axis=-1)
    mean_u, _ = jnp.split(out_uncond, 2, axis=-1)
    return jnp.concatenate([(1.0 + w) * mean_c - w * mean_u, var_c], axis=-1)


# ----------------------------------------------------------------------------------------------
# Reverse process p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I)


def _split_output(
    d: GaussianDiffusion, out: jax.Array, x_t: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Model output -> (mean part [B, ...], variance part v in [-1, 1] or None)."""
    if d.var_type == "learned_range":
        if out.shape[:-1] != x_t.shape[:-1] or out.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"learned_range needs a model output of shape {x_t.shape[:-1]} + "
                f"({2 * x_t.shape[-1]},) (2x channels), got {out.shape}."
            )
        return jnp.split(out, 2, axis=-1)
    if out.shape != x_t.shape:
        raise ValueError(f"model output shape {out.shape} != x_t shape {x_t.shape}.")
    return out, None


def _model_log_variance(
    d: GaussianDiffusion, t: jax.Array, x_t: jax.Array, v: jax.Array | None
) -> jax.Array:
    """log sigma_t^2 [B, ...]: fixedsmall log beta~_t; fixedlarge log beta_t (log beta~_1 at
    t = 0, as in Ho et al.'s code); learned_range frac log beta_t + (1 - frac) log beta~_t with
    frac = (v + 1) / 2."""
    min_log = _at(d.posterior_log_variance_clipped, t, x_t)
    if d.var_type == "fixedsmall":
        log_var = min_log
    elif d.var_type == "fixedlarge":
        log_var = jnp.where(_bcast(t, x_t) == 0, min_log, _at(d.log_betas, t, x_t))
    else:
        frac = (v + 1.0) / 2.0
        log_var = frac * _at(d.log_betas, t, x_t) + (1.0 - frac) * min_log
    return jnp.broadcast_to(log_var, x_t.shape)


def _pred_x0_eps(
    d: GaussianDiffusion, mean_out: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(x0_hat, eps_hat) from the mean part of the model output, for each mean type."""
    if d.mean_type == "eps":
        return predict_x0_from_eps(d, x_t, t, mean_out), mean_out
    if d.mean_type == "x0":
        return mean_out, predict_eps_from_x0(d, x_t, t, mean_out)
    return predict_x0_from_v(d, x_t, t, mean_out), predict_eps_from_v(d, x_t, t, mean_out)


def p_mean_variance_from_output(
    d: GaussianDiffusion, out: jax.Array, x_t: jax.Array, t: jax.Array, clip_denoised: bool = True
) -> dict[str, jax.Array]:
    """``p_mean_variance`` given the model output ``out`` = model_fn(x_t, timestep_map[t])."""
    mean_out, v = _split_output(d, out, x_t)
    pred_x0, pred_eps = _pred_x0_eps(d, mean_out, x_t, t)
    if clip_denoised:
        pred_x0 = jnp.clip(pred_x0, -1.0, 1.0)
        pred_eps = predict_eps_from_x0(d, x_t, t, pred_x0)
    mean, _, _ = q_posterior_mean_variance(d, pred_x0, x_t, t)
    log_variance = _model_log_variance(d, t, x_t, v)
    return dict(
        mean=mean,
        variance=jnp.exp(log_variance),
        log_variance=log_variance,
        pred_x0=pred_x0,
        pred_eps=pred_eps,
        model_output=out,
    )


def p_mean_variance(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """p(x_{t-1} | x_t) = N(mu_theta, sigma_t^2 I), mu_theta = mu~_t(x0_hat, x_t).

    x0_hat comes from the model output per ``d.mean_type`` (eps, x0 or v), clipped to [-1, 1] when
    ``clip_denoised`` (eps_hat is then recomputed from the clipped x0_hat); sigma_t^2 per
    ``d.var_type``. Returns dict(mean, variance, log_variance, pred_x0, pred_eps, model_output),
    each [B, ...] (model_output as returned by the model).
    """
    out = model_fn(x_t, d.timestep_map[t])
    return p_mean_variance_from_output(d, out, x_t, t, clip_denoised)


# ----------------------------------------------------------------------------------------------
# The variational bound, in bits/dim


def vb_terms_bpd_from_p(
    d: GaussianDiffusion,
    p: dict[str, jax.Array],
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    num_bins: int = 256,
) -> jax.Array:
    """``vb_terms_bpd`` given ``p`` = p_mean_variance(...) for this x_t (shares the model call)."""
    decoder = _decoder_bpd(p, x0, num_bins)
    return jnp.where(t == 0, decoder, _kl_bpd(d, p, x0, x_t, t))  # [B]


def _kl_bpd(
    d: GaussianDiffusion, p: dict, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> jax.Array:
    """L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits/dim [B]."""
    true_mean, _, true_log_var = q_posterior_mean_variance(d, x0, x_t, t)
    kl = likelihood.normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])
    return likelihood.mean_flat_bpd(kl)


def _decoder_bpd(p: dict, x0: jax.Array, num_bins: int) -> jax.Array:
    """L_0 = -log p(x0 | x_1), the discretised Gaussian decoder, in bits/dim [B]."""
    log_scale = 0.5 * p["log_variance"]
    ll = likelihood.discretized_gaussian_log_likelihood(x0, p["mean"], log_scale, num_bins)
    return likelihood.mean_flat_bpd(-ll)


def vb_terms_bpd(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    clip_denoised: bool = False,
    num_bins: int = 256,
) -> jax.Array:
    """One term of the bound, bits/dim [B]:

    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 0,
    L_0 = -log p(x0 | x_1) under the discretised Gaussian decoder for t = 0.
    """
    p = p_mean_variance(d, model_fn, x_t, t, clip_denoised)
    return vb_terms_bpd_from_p(d, p, x0, x_t, t, num_bins)


def prior_bpd(d: GaussianDiffusion, x0: jax.Array) -> jax.Array:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim [B]; no parameters, ~0 for a good schedule."""
    t = jnp.full(x0.shape[:1], d.num_timesteps - 1, jnp.int32)
    mean, _, log_var = q_mean_variance(d, x0, t)
    return likelihood.mean_flat_bpd(likelihood.normal_kl(mean, log_var, 0.0, 0.0))


def bound_terms(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    t_start: jax.Array | int = 0,
    num_t: int | None = None,
    clip_denoised: bool = False,
    num_bins: int = 256,
) -> dict[str, jax.Array]:
    """The terms of the bound for t = t_start, ..., t_start + num_t - 1, in one ``lax.scan``:

        L_0 = -log p(x0 | x_0-latent)                     (t = 0)
        L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))  (t > 0)

    with x_t = q_sample(x0, t, eps_t), eps_t drawn from fold_in(key, t), so any split of
    {0, ..., T-1} into ranges gives the terms of one pass (``calc_bpd_loop``). ``t_start`` may be
    traced (one compilation serves every range of the same length); t >= T is not evaluated
    (zeros). One model call per t also gives the distortion of x0_hat on the [0, 255] scale.
    Returns dict(terms_bpd [B, n], mse [B, n] = mean_flat((eps_hat - eps)^2),
    x0_sq_err [B, n] = mean_flat((127.5 (clip(x0_hat, -1, 1) - x0))^2)).
    """
    num_t = d.num_timesteps if num_t is None else num_t
    zeros = jnp.zeros(x0.shape[:1], x0.dtype)  # [B]

    def term(t_i):
        t = jnp.full(x0.shape[:1], t_i, jnp.int32)  # [B]
        noise = _normal(jax.random.fold_in(key, t_i), x0.shape, x0.dtype)
        x_t = q_sample(d, x0, t, noise)
        p = p_mean_variance(d, model_fn, x_t, t, clip_denoised)
        # t is one step for the whole batch: evaluate only the term it needs.
        vb = jax.lax.cond(
            t_i == 0,
            lambda: _decoder_bpd(p, x0, num_bins),
            lambda: _kl_bpd(d, p, x0, x_t, t),
        )
        mse = likelihood.mean_flat(jnp.square(p["pred_eps"] - noise))
        err = 127.5 * (jnp.clip(p["pred_x0"], -1.0, 1.0) - x0)
        return tuple(v.astype(x0.dtype) for v in (vb, mse, likelihood.mean_flat(err**2)))

    def step(_, t_i):
        out = jax.lax.cond(t_i < d.num_timesteps, term, lambda _: (zeros,) * 3, t_i)
        return None, out

    ts = jnp.asarray(t_start, jnp.int32) + jnp.arange(num_t, dtype=jnp.int32)
    _, (vb, mse, sq) = jax.lax.scan(step, None, ts)  # [n, B] each
    return dict(terms_bpd=vb.T, mse=mse.T, x0_sq_err=sq.T)


def calc_bpd_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    clip_denoised: bool = False,
    num_bins: int = 256,
) -> dict[str, jax.Array]:
    """The whole bound -log p(x0) <= L_T + sum_t L_t, every t, in one ``lax.scan``.

    x_t ~ q(x_t | x0) is drawn with key fold_in(key, t) (``bound_terms``). Returns
    dict(total_bpd [B], prior_bpd [B], terms_bpd [B, T], mse [B, T]) where
    mse = mean_flat((eps_hat - eps)^2).
    """
    out = bound_terms(d, model_fn, x0, key, 0, None, clip_denoised, num_bins)
    prior = prior_bpd(d, x0)
    terms = out["terms_bpd"]  # [B, T]
    return dict(
        total_bpd=terms.sum(axis=1) + prior, prior_bpd=prior, terms_bpd=terms, mse=out["mse"]
    )


# Monte-Carlo bound: L_0 and L_T exact, sum_{t>=1} L_t estimated from K timesteps per example.


def sampled_bound_terms(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    t: jax.Array,
    weights: jax.Array,
    clip_denoised: bool = False,
    num_bins: int = 256,
) -> dict[str, jax.Array]:
    """The bound with sum_t L_t estimated at the timesteps ``t`` [B, K] (t >= 1, each example its
    own) with ``weights`` [B, K] (``timesteps``' stratified or importance bound timesteps):

        L_0 exact (x_1-noise from fold_in(key, 0), as in ``bound_terms``),
        sum_{t>=1} L_t ~ sum_k w_k L_{t_k}  (x_{t_k} from fold_in(fold_in(key, T), k)),

    one ``lax.scan`` over k, each step one model call on the batch. Returns dict(decoder_bpd [B],
    kl_bpd [B]) — the estimate of sum L_t; add ``prior_bpd`` for the whole bound.
    """
    t0 = jnp.zeros(x0.shape[:1], jnp.int32)
    x_1 = q_sample(d, x0, t0, _normal(jax.random.fold_in(key, 0), x0.shape, x0.dtype))
    decoder = _decoder_bpd(p_mean_variance(d, model_fn, x_1, t0, clip_denoised), x0, num_bins)
    key_t = jax.random.fold_in(key, d.num_timesteps)

    def step(total, k_t_w):
        k, t_k, w_k = k_t_w  # (), [B], [B]
        noise = _normal(jax.random.fold_in(key_t, k), x0.shape, x0.dtype)
        x_t = q_sample(d, x0, t_k, noise)
        p = p_mean_variance(d, model_fn, x_t, t_k, clip_denoised)
        return total + w_k * _kl_bpd(d, p, x0, x_t, t_k), None

    ks = jnp.arange(t.shape[1], dtype=jnp.int32)
    kl, _ = jax.lax.scan(step, jnp.zeros(x0.shape[:1], jnp.float32), (ks, t.T, weights.T))
    return dict(decoder_bpd=decoder, kl_bpd=kl)


# ----------------------------------------------------------------------------------------------
# Training losses


def min_snr_weight(d: GaussianDiffusion, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weight [B] (Hang et al. 2023, section 3.4): min(SNR_t, gamma) on
    the x0-error, SNR_t = abar_t / (1 - abar_t), written for the target of ``d.mean_type``
    (||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR_t = ||v - v_hat||^2 / (SNR_t + 1)):

      eps: min(SNR_t, gamma) / SNR_t,   x0: min(SNR_t, gamma),   v: min(SNR_t, gamma) / (SNR_t + 1).
    """
    abar = d.alphas_cumprod[t]
    snr = abar / jnp.square(d.sqrt_one_minus_alphas_cumprod[t])  # [B]
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[d.mean_type]


def mse_weight(
    d: GaussianDiffusion, t: jax.Array, weighting: str = "none", min_snr_gamma: float = 5.0
) -> jax.Array | None:
    """The mse term's weight over t [B]: ``none`` (L_simple: None, i.e. 1) or ``min_snr``."""
    _check_choice("mse_weighting", weighting, MSE_WEIGHTINGS)
    return None if weighting == "none" else min_snr_weight(d, t, min_snr_gamma)


def training_losses(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    loss_type: str = "simple",
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    num_bins: int = 256,
    mse_weighting: str = "none",
    min_snr_gamma: float = 5.0,
    hybrid_lambda: float = HYBRID_LAMBDA,
    hybrid_train_mean: bool = False,
    t_vb: jax.Array | None = None,
    vb_weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-example losses [B] at t ~ U{0..T-1} (or the given t) and x_t = q_sample(x0, t, eps).

    - mse = mean_flat((target - model mean output)^2), target eps, x0 or v per ``d.mean_type``,
      times ``mse_weight`` (``mse_weighting`` "min_snr": Hang et al.'s min-SNR-gamma);
    - vb = L_t in bits/dim (``vb_terms_bpd``, no clipping);
    - loss: ``simple`` mse; ``kl`` vb; ``vlb`` T vb + L_T, an unbiased one-sample estimate of the
      whole bound in bits/dim (for eps-prediction with a fixed variance, L_t at t > 0 is
      beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 plus a constant);
      ``hybrid`` mse + lambda T vb (``hybrid_lambda``, Improved DDPM's 0.001) with the mean
      frozen (stop-gradient) in vb unless ``hybrid_train_mean``, so the bound trains only a
      learned variance (Improved DDPM's L_simple + lambda L_vlb with L_vlb ~ T L_t; meant for
      ``learned_range``, with a fixed variance and a frozen mean vb adds no gradient).
    - ``t_vb`` [B] (hybrid only, e.g. importance-sampled): the vb term at its own step t_vb,
      with its own noise, times ``vb_weights`` [B] (1 / (T p_t)), while the mse term stays at t;
      the two halves go through the network in one call of 2B examples. Then ``vb_loss`` = T vb
      at t_vb (unweighted) is returned too, the value a loss history records for t_vb.
    Returns dict(loss, mse, vb[, vb_loss]). For importance-sampled t (no ``t_vb``) multiply
    ``loss`` by the weights.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if t_vb is not None and loss_type != "hybrid":
        raise ValueError(
            f"t_vb (a t of the vb term's own) needs loss_type 'hybrid', got {loss_type!r}."
        )
    key_t, key_noise = jax.random.split(key)
    if t is None:
        t = timesteps.uniform(key_t, x0.shape[0], d.num_timesteps)
    if noise is None:
        noise = _normal(key_noise, x0.shape, x0.dtype)
    x_t = q_sample(d, x0, t, noise)
    split = t_vb is not None
    if split:  # [2B]: the mse term's examples, then the vb term's
        x_t_vb = q_sample(
            d, x0, t_vb, _normal(jax.random.fold_in(key_noise, 1), x0.shape, x0.dtype)
        )
        both = model_fn(jnp.concatenate([x_t, x_t_vb]), d.timestep_map[jnp.concatenate([t, t_vb])])
        out, out_vb = jnp.split(both, 2)
    else:
        out = out_vb = model_fn(x_t, d.timestep_map[t])
        t_vb, x_t_vb = t, x_t
    mean_out, _ = _split_output(d, out, x_t)
    target = {"eps": noise, "x0": x0, "v": predict_v(d, x0, t, noise)}[d.mean_type]
    mse = likelihood.mean_flat(jnp.square(target - mean_out))
    weight = mse_weight(d, t, mse_weighting, min_snr_gamma)
    weighted_mse = mse if weight is None else weight * mse
    if loss_type == "hybrid" and not hybrid_train_mean:
        mean_vb, v = _split_output(d, out_vb, x_t_vb)
        frozen = jax.lax.stop_gradient(mean_vb)
        out_vb = frozen if v is None else jnp.concatenate([frozen, v], axis=-1)
    p = p_mean_variance_from_output(d, out_vb, x_t_vb, t_vb, clip_denoised=False)
    vb = vb_terms_bpd_from_p(d, p, x0, x_t_vb, t_vb, num_bins)
    num_t = d.num_timesteps
    vb_term = num_t * vb if vb_weights is None else num_t * vb * vb_weights
    loss = {
        "simple": lambda: weighted_mse,
        "kl": lambda: vb,
        "vlb": lambda: num_t * vb + prior_bpd(d, x0),
        "hybrid": lambda: weighted_mse + hybrid_lambda * vb_term,
    }[loss_type]()
    out = dict(loss=loss, mse=mse, vb=vb)
    return dict(out, vb_loss=num_t * vb) if split else out


# ----------------------------------------------------------------------------------------------
# Real time: the chain read as a process in t in [0, T-1] (Lu et al. 2022, DPM-Solver, on
# discrete-time models): log abar interpolated linearly between the integer steps


def _log_abar_table(d: GaussianDiffusion) -> jax.Array:
    """log abar_t at the integer steps [T], from whichever of abar, 1 - abar is accurate."""
    omab = jnp.square(d.sqrt_one_minus_alphas_cumprod)  # [T]
    return jnp.where(d.alphas_cumprod > 0.5, jnp.log1p(-omab), jnp.log(d.alphas_cumprod))


def _interp_steps(t: jax.Array, table: jax.Array) -> jax.Array:
    """table (at t = 0, ..., T-1) linearly interpolated at real t, clamped to [0, T-1]; any
    shape. Indexes floor(t) directly (no search: cheap inside compiled loops)."""
    t = jnp.clip(t, 0, table.shape[0] - 1)
    k = jnp.clip(jnp.floor(t), 0, max(table.shape[0] - 2, 0)).astype(jnp.int32)
    w = t - k
    return (1 - w) * table[k] + w * table[jnp.minimum(k + 1, table.shape[0] - 1)]


def _t_of_log_abar(d: GaussianDiffusion, g: jax.Array) -> jax.Array:
    """The inverse of ``log_alpha_cumprod``: real t in [0, T-1] where the interpolated
    (decreasing) log abar equals g (clamped at the ends); any shape."""
    table = _log_abar_table(d)[::-1]  # [T], increasing: log abar_{T-1}, ..., log abar_0
    num = table.shape[0]
    if num == 1:
        return jnp.zeros_like(g)
    g = jnp.clip(g, table[0], table[-1])
    j = jnp.clip(jnp.searchsorted(table, g, side="right", method="compare_all"), 1, num - 1)
    w = (g - table[j - 1]) / (table[j] - table[j - 1])  # [0, 1] from table[j - 1] to table[j]
    return (num - j - w).astype(table.dtype)  # reversed index j - 1 is t = num - j


def log_alpha_cumprod(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """log abar(t) = (1 - w) log abar_k + w log abar_{k+1}, k = floor(t), w = t - k, for real
    t in [0, T-1] (clamped there); any shape."""
    return _interp_steps(jnp.asarray(t, d.alphas_cumprod.dtype), _log_abar_table(d))


def alpha_sigma(d: GaussianDiffusion, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) = (sqrt(abar(t)), sqrt(1 - abar(t))), 1 - abar = -expm1(log abar)."""
    g = log_alpha_cumprod(d, t)
    return jnp.exp(0.5 * g), jnp.sqrt(-jnp.expm1(g))


def lambda_from_t(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """Half log-SNR lambda(t) = log(alpha / sigma) = (log abar - log(1 - abar)) / 2."""
    g = log_alpha_cumprod(d, t)
    return 0.5 * (g - jnp.log(-jnp.expm1(g)))


def t_from_lambda(d: GaussianDiffusion, lam: jax.Array) -> jax.Array:
    """The inverse of ``lambda_from_t``: log abar = log sigmoid(2 lambda), then t by inverse
    interpolation of the (decreasing) log abar_t table; clamped to [0, T-1]."""
    return _t_of_log_abar(d, jax.nn.log_sigmoid(2.0 * jnp.asarray(lam, d.alphas_cumprod.dtype)))


def sigma_from_t(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """VE noise level sigma_ve(t) = sigma / alpha = sqrt(1 / abar - 1) = exp(-lambda(t))."""
    return jnp.sqrt(jnp.expm1(-log_alpha_cumprod(d, t)))


def t_from_sigma(d: GaussianDiffusion, sigma: jax.Array) -> jax.Array:
    """The inverse of ``sigma_from_t``: log abar = -log(1 + sigma_ve^2), then t as in
    ``t_from_lambda``; clamped to [0, T-1]."""
    return _t_of_log_abar(d, -jnp.log1p(jnp.square(jnp.asarray(sigma, d.alphas_cumprod.dtype))))


def model_time(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """The time the network is called with at real step t: ``timestep_map`` interpolated
    linearly (t itself for a schedule that is not respaced)."""
    t = jnp.asarray(t, d.alphas_cumprod.dtype)
    return _interp_steps(t, d.timestep_map.astype(t.dtype))


def eps_and_x0(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat), each [B, ...], from one network call at real t [B], with
    x = alpha x0 + sigma eps: eps-prediction x0 = (x - sigma eps) / alpha; x0-prediction
    eps = (x - alpha x0) / sigma; v-prediction x0 = alpha x - sigma v, eps = sigma x + alpha v.
    ``clip_denoised`` clips x0_hat to [-1, 1] and recomputes eps_hat from it."""
    out = model_fn(x, model_time(d, t))
    mean_out, _ = _split_output(d, out, x)  # a learned variance is not used here
    alpha, sigma = (_bcast(v.astype(x.dtype), x) for v in alpha_sigma(d, t))
    if d.mean_type == "eps":
        eps, x0 = mean_out, (x - sigma * mean_out) / alpha
    elif d.mean_type == "x0":
        eps, x0 = (x - alpha * mean_out) / sigma, mean_out
    else:
        eps, x0 = sigma * x + alpha * mean_out, alpha * x - sigma * mean_out
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return eps, x0


# ----------------------------------------------------------------------------------------------
# The process interface of ``samplers`` and the chain's samplers


class DiscreteProcess:
    """The DDPM chain of ``d`` as ``samplers.Process``: at an integer step t (int32 [B]) the
    tables of ``d`` (respaced or not), at real t in [0, T-1] (float) the interpolation above.
    Its chain is the reverse chain t = K-1, ..., 0 of ``d.chain(K)`` (``maybe_respace``), step
    i at t = K-1-i, its noise from fold_in(key, t) (Ho et al.'s loop); p(x_{t-1} | x_t) has the
    variance of ``d.var_type``; its solvers run from t = T-1 to t = 0 and end at sigma = 0."""

    def __init__(self, d: GaussianDiffusion):
        self.d = d
        self.t_min, self.t_max = 0.0, float(d.num_timesteps - 1)

    def denoise(
        self, model_fn: ModelFn, x: jax.Array, t: jax.Array, clip_denoised: bool
    ) -> samplers.Prediction:
        if jnp.issubdtype(t.dtype, jnp.integer):  # the tables
            out = model_fn(x, self.d.timestep_map[t])
            mean_out, v = _split_output(self.d, out, x)
            x0, eps = _pred_x0_eps(self.d, mean_out, x, t)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
                eps = predict_eps_from_x0(self.d, x, t, x0)
            return samplers.Prediction(eps, x0, v)
        eps, x0 = eps_and_x0(self.d, model_fn, x, t, clip_denoised)
        return samplers.Prediction(eps, x0)

    def chain(self, num_steps: int) -> "DiscreteProcess":
        return DiscreteProcess(maybe_respace(self.d, num_steps or None))

    def chain_length(self) -> int:
        return self.d.num_timesteps

    def step_at(self, t: jax.Array, x: jax.Array) -> samplers.ChainStep:
        """The chain's step from t to t - 1 (t int32 [B])."""
        d = self.d
        return samplers.ChainStep(
            t, t - 1, t[0], _at(d.alphas_cumprod_prev, t, x), _at(d.posterior_variance, t, x)
        )

    def chain_step(self, i: jax.Array, x: jax.Array) -> samplers.ChainStep:
        t = jnp.full(x.shape[:1], self.d.num_timesteps - 1 - i, jnp.int32)  # [B]
        return self.step_at(t, x)

    def reverse(
        self, step: samplers.ChainStep, pred: samplers.Prediction, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """p(x_{t-1} | x_t) = N(mu~_t(x0_hat, x_t), sigma_t^2), no noise at t = 0."""
        mean, _, _ = q_posterior_mean_variance(self.d, pred.x0, x, step.t)
        log_variance = _model_log_variance(self.d, step.t, x, pred.var)
        nonzero = _bcast((step.t != 0).astype(x.dtype), x)  # [B, 1, ...]
        return mean, nonzero * jnp.exp(0.5 * log_variance)

    def solver_grid(self, num_steps: int) -> samplers.SolverGrid:
        """``num_steps`` calls uniform in lambda from t = T-1 to t = 0 (Lu et al.'s advice for
        few steps), then the step to sigma = 0."""
        _check_num_steps(num_steps)
        d = self.d
        lam = jnp.linspace(lambda_from_t(d, d.num_timesteps - 1), lambda_from_t(d, 0), num_steps)
        t = t_from_lambda(d, lam).at[-1].set(0.0).at[0].set(d.num_timesteps - 1)
        return samplers.SolverGrid(t, lam, None)

    def sigma_ve(self, t: jax.Array) -> jax.Array:
        return sigma_from_t(self.d, t)

    def t_from_sigma_ve(self, sigma: jax.Array) -> jax.Array:
        return t_from_sigma(self.d, sigma)

    def finish(self, x: jax.Array) -> jax.Array:
        return x


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps (network calls) must be an int >= 1, got {num_steps!r}.")


def p_sample(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    key: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise where t == 0
    (``samplers.ancestral_update``). Returns dict(sample, pred_x0), each [B, ...].
    """
    process = DiscreteProcess(d)
    step = process.step_at(t, x_t)
    sample, pred_x0 = samplers.ancestral_update(process, model_fn, x_t, step, key, clip_denoised)
    return dict(sample=sample, pred_x0=pred_x0)


def chain_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key of x_T, key of the steps) of ``p_sample_loop`` / ``ddim_sample_loop``."""
    key_T, key_steps = jax.random.split(key)
    return key_T, key_steps


def _chain(
    d: GaussianDiffusion, model_fn: ModelFn, key_steps: jax.Array, num_steps, clip, eta=None
) -> tuple[DiscreteProcess, Callable]:
    """The process of the (respaced) chain and its step: ancestral (eta None) or DDIM."""
    process = DiscreteProcess(d).chain(num_steps)
    if eta is None:
        update = functools.partial(samplers.ancestral_update, process, model_fn, clip_denoised=clip)
    else:
        update = functools.partial(
            samplers.ddim_update, process, model_fn, eta=eta, clip_denoised=clip
        )
    return process, samplers.chain_step_fn(process, update, key_steps)


def p_sample_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    x_T: jax.Array | None = None,
    num_steps: int | None = None,
    clip_denoised: bool = True,
    pred_x0_every: int = 0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t), in one ``lax.scan``.

    ``num_steps`` < T respaces the chain (``space_timesteps`` / ``respace``; the model still sees
    the original t). The last step adds no noise. With ``pred_x0_every`` = k > 0, also returns
    the x0_hat of every k-th step (steps t with t % k == 0, from the noisiest to t = 0):
    (x0 [B, ...], snapshots [ceil(K/k), B, ...]).
    """
    key_T, key_steps = chain_keys(key)
    process, step = _chain(d, model_fn, key_steps, num_steps, clip_denoised)
    x = _normal(key_T, shape, d.betas.dtype) if x_T is None else x_T
    return samplers.chain_sample(process, step, x, pred_x0_every)


def ddim_sample_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    num_steps: int,
    eta: float = 0.0,
    x_T: jax.Array | None = None,
    clip_denoised: bool = True,
) -> jax.Array:
    """DDIM (Song et al. 2021, ``samplers.ddim_update``) over ``num_steps`` evenly spaced
    steps, in one ``lax.scan``; abar = 1 after the last step, so it adds no noise there.
    eta = 0 is deterministic; eta = 1 with all T steps is ancestral sampling with the fixedsmall
    variance. The model's variance output (if any) is ignored.
    """
    key_T, key_steps = chain_keys(key)
    process, step = _chain(d, model_fn, key_steps, num_steps, clip_denoised, eta)
    x = _normal(key_T, shape, d.betas.dtype) if x_T is None else x_T
    return samplers.chain_sample(process, step, x)
