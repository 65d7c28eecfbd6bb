"""Gaussian KL and the discretised Gaussian likelihood against independent references."""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from scipy import integrate, stats

from diffusion_jax import likelihood

mpmath.mp.dps = 50
_log_likelihood = jax.jit(likelihood.discretized_gaussian_log_likelihood, static_argnums=3)


def _mp_log_mass(lo: float, hi: float) -> float:
    """log P(lo < Z <= hi) in 50-digit arithmetic (tails by reflection; +-inf allowed)."""
    lo, hi = mpmath.mpf(lo), mpmath.mpf(hi)
    if lo > 0:
        return float(mpmath.log(mpmath.ncdf(-lo) - mpmath.ncdf(-hi)))
    return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


def _reference_log_likelihood(x, mean, log_scale, num_bins):
    """Per-element reference: bin [x - d, x + d] (edges open), standardised in float64."""
    d = 1.0 / (num_bins - 1)
    out = []
    for xi, mi, si in zip(x, mean, log_scale, strict=True):
        lo = -math.inf if xi < -1 + d else (xi - d - mi) / math.exp(si)
        hi = math.inf if xi > 1 - d else (xi + d - mi) / math.exp(si)
        out.append(_mp_log_mass(lo, hi))
    return np.array(out)


@pytest.mark.parametrize(
    "m1, lv1, m2, lv2", [(0.0, 0.0, 0.0, 0.0), (0.3, -1.0, -0.5, 0.5), (2.0, 1.0, 0.0, -2.0)]
)
def test_normal_kl_matches_quadrature_and_monte_carlo(m1, lv1, m2, lv2):
    kl = float(likelihood.normal_kl(m1, lv1, m2, lv2))
    p, q = stats.norm(m1, math.exp(0.5 * lv1)), stats.norm(m2, math.exp(0.5 * lv2))
    ref = integrate.quad(lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)), -np.inf, np.inf)[0]
    np.testing.assert_allclose(kl, ref, rtol=1e-5, atol=1e-6)
    x = p.rvs(size=400_000, random_state=np.random.default_rng(0))
    log_ratio = p.logpdf(x) - q.logpdf(x)
    assert abs(kl - log_ratio.mean()) < 5 * log_ratio.std() / math.sqrt(x.size) + 1e-6


def test_normal_kl_broadcasts_elementwise():
    mean1 = jnp.zeros((4, 3))
    out = likelihood.normal_kl(mean1, jnp.zeros(3), jnp.arange(3.0), 0.0)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out[0], 0.5 * np.arange(3.0) ** 2, rtol=1e-6)


@pytest.mark.parametrize("num_bins", [2, 17, 256])
def test_discretized_likelihood_sums_to_one(num_bins):
    centres = jnp.linspace(-1.0, 1.0, num_bins)  # [K]
    means = jnp.array([-3.0, -1.0, -0.999, -0.37, 0.0, 0.21, 1.0, 1.3, 40.0])
    log_scales = jnp.array([-10.0, -8.0, -5.0, -2.0, 0.0, 1.0, 4.0])
    m, s = jnp.meshgrid(means, log_scales)  # [S, M]
    ll = _log_likelihood(centres[:, None, None], m[None], s[None], num_bins)  # [K, S, M]
    assert np.all(np.isfinite(ll)) and np.all(ll <= 0)
    np.testing.assert_allclose(jnp.exp(ll).sum(axis=0), 1.0, atol=1e-5)


def test_discretized_likelihood_matches_high_precision_reference():
    rng = np.random.default_rng(0)
    n, num_bins = 400, 256
    x = (2 * rng.integers(0, num_bins, n) / (num_bins - 1) - 1).astype(np.float32)
    x[:20], x[20:40] = -1.0, 1.0  # the open edge bins
    mean = rng.uniform(-1.5, 1.5, n).astype(np.float32)
    log_scale = rng.uniform(-8.0, 1.0, n).astype(np.float32)
    # Far tails: the bin sits tens to thousands of standard deviations from the mean.
    mean[40:50], log_scale[40:50] = -0.9, -7.0
    ll = _log_likelihood(x, mean, log_scale, num_bins)
    ref = _reference_log_likelihood(
        x.astype(np.float64), mean.astype(np.float64), log_scale.astype(np.float64), num_bins
    )
    assert ref[40:50].max() < -500  # really in the tails
    # float32 resolves a bin of width w = 2 delta / sigma (in standard units) to ~1e-7 / w
    # relative: 1e-5 for bins wider than 0.05 sigma (the DDPM decoder has w ~ 1), 1e-4 for all.
    wide = 2.0 / (num_bins - 1) / np.exp(log_scale) > 0.05
    assert wide.sum() > n // 2
    np.testing.assert_allclose(np.asarray(ll)[wide], ref[wide], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ll), ref, rtol=1e-4, atol=1e-6)


def test_discretized_likelihood_gradients_are_finite():
    x = jnp.linspace(-1.0, 1.0, 17)[:, None, None]
    mean = jnp.array([-30.0, -1.0, 0.0, 0.4, 1.0, 30.0])[None, None, :]
    log_scale = jnp.array([-9.0, -3.0, 0.0, 3.0])[None, :, None]

    def total(mean, log_scale):
        return likelihood.discretized_gaussian_log_likelihood(x, mean, log_scale, 17).sum()

    g_mean, g_scale = jax.jit(jax.grad(total, argnums=(0, 1)))(mean, log_scale)
    assert np.all(np.isfinite(g_mean)) and np.all(np.isfinite(g_scale))
    # One value against a finite difference in float64 scipy.
    h = 1e-3
    f = lambda m: np.log(stats.norm.cdf(0.125 + 1 / 16, m) - stats.norm.cdf(0.125 - 1 / 16, m))
    fd = (f(0.4 + h) - f(0.4 - h)) / (2 * h)
    g = jax.jit(jax.grad(lambda m: _log_likelihood(jnp.float32(0.125), m, 0.0, 17)))(0.4)
    np.testing.assert_allclose(g, fd, rtol=1e-4)


def test_bad_num_bins():
    with pytest.raises(ValueError, match="num_bins"):
        likelihood.discretized_gaussian_log_likelihood(jnp.zeros(2), 0.0, 0.0, num_bins=1)


def test_flat_reductions_and_bits_per_dim():
    x = jnp.arange(24.0).reshape(2, 3, 4)
    np.testing.assert_allclose(likelihood.mean_flat(x), [5.5, 17.5])
    np.testing.assert_allclose(likelihood.sum_flat(x), [66.0, 210.0])
    np.testing.assert_allclose(likelihood.bits_per_dim(jnp.array(12.0 * math.log(2)), 3), 4.0)
    np.testing.assert_allclose(likelihood.mean_flat_bpd(x), np.array([5.5, 17.5]) / math.log(2))
