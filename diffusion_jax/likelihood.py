"""Gaussian KL, discretised Gaussian log-likelihood and bits-per-dimension helpers.

All functions are elementwise (broadcasting) unless named ``*_flat``; results are in nats unless
named ``*bpd*`` / ``bits_per_dim``.
"""

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erf, log_ndtr

__all__ = [
    "bits_per_dim",
    "discretized_gaussian_log_likelihood",
    "log_normal_interval",
    "mean_flat",
    "mean_flat_bpd",
    "normal_kl",
    "sum_flat",
]

# |z| below which a central interval's mass is taken from erf rather than from the tails:
# Phi^{-1}(3/4), where erf(z / sqrt 2) = erfc(z / sqrt 2) = 1/2.
_CENTRAL_Z = 0.6744897501960817


def normal_kl(
    mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array
) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats:

    0.5 * (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^(-logvar2)),
    with the first three terms as expm1(r) - r, r = logvar1 - logvar2 (accurate for r ~ 0).
    """
    r = logvar1 - logvar2
    return 0.5 * (jnp.expm1(r) - r + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _log1mexp(x: jax.Array) -> jax.Array:
    """log(1 - e^x) for x < 0, accurate near 0 (expm1) and for very negative x (log1p)."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def log_normal_interval(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """log P(lo < Z <= hi) for Z ~ N(0, 1) and finite lo < hi, elementwise.

    Intervals meeting (-c, c), c = Phi^{-1}(3/4), use 0.5 (erf(hi/sqrt2) - erf(lo/sqrt2)); the
    others are reflected into the left tail and use log Phi(h) + log(1 - Phi(l)/Phi(h)) with
    ``log_ndtr``, so the result keeps its relative accuracy far out in the tails. Every branch is
    fed safe values where it is not selected, so gradients stay finite.
    """
    central = (lo < _CENTRAL_Z) & (hi > -_CENTRAL_Z)
    lo_c = jnp.where(central, lo, -1.0)
    hi_c = jnp.where(central, hi, 1.0)
    log_central = jnp.log(0.5 * (erf(hi_c / math.sqrt(2.0)) - erf(lo_c / math.sqrt(2.0))))
    right = lo >= _CENTRAL_Z  # P(lo < Z <= hi) = P(-hi <= Z < -lo)
    l_t = jnp.where(central, -2.0, jnp.where(right, -hi, lo))
    h_t = jnp.where(central, -1.0, jnp.where(right, -lo, hi))
    log_h = log_ndtr(h_t)
    log_tail = log_h + _log1mexp(log_ndtr(l_t) - log_h)
    return jnp.where(central, log_central, log_tail)


def discretized_gaussian_log_likelihood(
    x: jax.Array, mean: jax.Array, log_scale: jax.Array, num_bins: int = 256
) -> jax.Array:
    """log P(bin of x) in nats, elementwise, under N(mean, e^(2 log_scale)) discretised into bins.

    ``x`` holds bin centres 2k/(num_bins - 1) - 1 in [-1, 1]; bin k covers x +- delta with
    delta = 1/(num_bins - 1), except that the first bin extends to -inf and the last to +inf, so
    the probabilities of the ``num_bins`` bins sum to 1 for any mean and scale:

      log P = log Phi(z+)                    first bin   (x < -1 + delta)
              log(1 - Phi(z-))               last bin    (x > 1 - delta)
              log(Phi(z+) - Phi(z-))         otherwise,  z+- = (x +- delta - mean) e^-log_scale.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}.")
    delta = 1.0 / (num_bins - 1)
    inv_scale = jnp.exp(-log_scale)
    z_plus = (x + delta - mean) * inv_scale
    z_minus = (x - delta - mean) * inv_scale
    return jnp.where(
        x < -1.0 + delta,
        log_ndtr(z_plus),
        jnp.where(x > 1.0 - delta, log_ndtr(-z_minus), log_normal_interval(z_minus, z_plus)),
    )


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the first: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def sum_flat(x: jax.Array) -> jax.Array:
    """Sum over every axis but the first: [B, ...] -> [B]."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
    """Converts a per-example NLL summed over ``num_dims`` dimensions to bits/dim:
    bpd = nats / (num_dims ln 2)."""
    return nats / (num_dims * math.log(2.0))


def mean_flat_bpd(nats: jax.Array) -> jax.Array:
    """Elementwise nats [B, ...] -> bits/dim per example [B] (mean over dims / ln 2)."""
    return bits_per_dim(sum_flat(nats), math.prod(nats.shape[1:]))
