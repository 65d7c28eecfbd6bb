"""The discrete DDPM process (Ho et al. 2020; Improved DDPM): the schedule pytree, respacing,
q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0), the eps / x0 / v parametrisations and the
reverse process p(x_{t-1} | x_t) with its fixed or learned variance.

Conventions: data ``x0`` in [-1, 1] of shape [B, ...]; ``t`` is a zero-based int32 array of shape
[B] (t = 0 is the paper's t = 1); abar_t = prod_{s <= t} (1 - beta_s). Noise is drawn in float32
and cast to the data dtype, so one key gives the same draws with or without ``jax_enable_x64``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from diffusion_jax import schedules
from diffusion_jax.samplers import per_example

__all__ = [
    "GaussianDiffusion",
    "MEAN_TYPES",
    "ModelFn",
    "VAR_TYPES",
    "classifier_free_guidance",
    "eps_from_score",
    "maybe_respace",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "score_from_eps",
    "space_timesteps",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixedlarge", "fixedsmall", "learned_range")


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
    ) -> GaussianDiffusion:
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


def _at(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """table[t] shaped to broadcast against x: [B, 1, ..., 1]."""
    return per_example(table[t], x)


def _sqrt_abar(d: GaussianDiffusion, t: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sqrt(abar_t), sqrt(1 - abar_t)), each [B, 1, ..., 1]."""
    return _at(d.sqrt_alphas_cumprod, t, x), _at(d.sqrt_one_minus_alphas_cumprod, t, x)


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
        log_var = jnp.where(per_example(t, x_t) == 0, min_log, _at(d.log_betas, t, x_t))
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
