"""The DDPM's variational bound in bits/dim (Ho et al. 2020, eq. 5): L_0 (the discretised
decoder), L_t (KL terms) and L_T (the prior), over every t or estimated from K timesteps per
example (``timesteps``' stratified or importance draws)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import likelihood, samplers
from diffusion_jax.discrete.process import (
    GaussianDiffusion,
    ModelFn,
    p_mean_variance,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
)

__all__ = [
    "bound_terms",
    "calc_bpd_loop",
    "prior_bpd",
    "sampled_bound_terms",
    "vb_terms_bpd",
    "vb_terms_bpd_from_p",
]

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
        noise = samplers.normal(jax.random.fold_in(key, t_i), x0.shape, x0.dtype)
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
    x_1 = q_sample(d, x0, t0, samplers.normal(jax.random.fold_in(key, 0), x0.shape, x0.dtype))
    decoder = _decoder_bpd(p_mean_variance(d, model_fn, x_1, t0, clip_denoised), x0, num_bins)
    key_t = jax.random.fold_in(key, d.num_timesteps)

    def step(total, k_t_w):
        k, t_k, w_k = k_t_w  # (), [B], [B]
        noise = samplers.normal(jax.random.fold_in(key_t, k), x0.shape, x0.dtype)
        x_t = q_sample(d, x0, t_k, noise)
        p = p_mean_variance(d, model_fn, x_t, t_k, clip_denoised)
        return total + w_k * _kl_bpd(d, p, x0, x_t, t_k), None

    ks = jnp.arange(t.shape[1], dtype=jnp.int32)
    dtype = jnp.result_type(x0.dtype, weights.dtype, d.betas.dtype)  # each term's: the carry's
    kl, _ = jax.lax.scan(step, jnp.zeros(x0.shape[:1], dtype), (ks, t.T, weights.T))
    return dict(decoder_bpd=decoder, kl_bpd=kl)
