"""Toy distributions: normalised densities, exact scores, noised laws = sampling = convolution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data import toy_distributions

SCALE, SIGMA = 0.7, 0.5  # a DDPM-like noising: scale·x + sigma·z
H = 0.08  # grid step; divides the checkerboard's edges, so its midpoint sums are exact


def midpoints(h, half_width=8.0):
    """Cell midpoints of a square grid of step h over [-half_width, half_width]², [G, 2]."""
    ticks = np.arange(-half_width + h / 2, half_width, h)
    return jnp.asarray(np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2), jnp.float32)


POINTS = midpoints(H)


@pytest.mark.parametrize("name", toy_distributions.NAMES)
def test_density_integrates_to_one(name):
    dist = toy_distributions.get(name)
    for d in (dist, dist.noised(SCALE, SIGMA), dist.noised(1.0, 0.1)):
        total = float(jnp.sum(jnp.exp(jax.jit(d.log_prob)(POINTS)))) * H**2
        assert abs(total - 1) < 1e-4, (name, total)


@pytest.mark.parametrize("name", toy_distributions.NAMES)
def test_score_is_gradient_of_log_prob(name):
    dist = toy_distributions.get(name)
    for d in (dist, dist.noised(0.9, 0.3)):
        x = d.sample(jax.random.PRNGKey(0), 256)
        grad = jax.jit(jax.vmap(jax.grad(d.log_prob)))(x)
        np.testing.assert_allclose(d.score(x), grad, rtol=1e-4, atol=1e-4)


def test_checkerboard_score_is_zero_and_support_is_the_dark_squares():
    dist = toy_distributions.get("checkerboard")
    x = dist.sample(jax.random.PRNGKey(1), 1000)
    np.testing.assert_array_equal(dist.score(x), 0.0)
    cells = np.floor(np.asarray(x) / 2).astype(int)  # squares of side 2
    assert np.all(cells.sum(1) % 2 == 0) and np.all(np.abs(x) <= 4)
    np.testing.assert_allclose(dist.log_prob(x), -np.log(32.0), rtol=1e-6)  # 8 squares of area 4
    assert dist.log_prob(jnp.array([[1.0, 3.0]])) == -jnp.inf  # a light square


def bin_probabilities(dist, edges, sub=10):
    """P(x in each bin) [nb, nb] by a midpoint sum of the density, ``sub`` points per bin side."""
    width = edges[1] - edges[0]
    ticks = edges[0] + (np.arange(sub * (len(edges) - 1)) + 0.5) * width / sub
    grid = jnp.asarray(np.stack(np.meshgrid(ticks, ticks, indexing="ij"), -1), jnp.float32)
    mass = np.asarray(jnp.exp(jax.jit(dist.log_prob)(grid)), np.float64) * (width / sub) ** 2
    nb = len(edges) - 1
    return mass.reshape(nb, sub, nb, sub).sum((1, 3))


@pytest.mark.parametrize("name", toy_distributions.NAMES)
def test_samples_match_density_and_noised_matches_monte_carlo(name):
    # Histogram counts of n draws against n·P(bin), within Z binomial standard errors, for the
    # distribution's own sampler and for scale·x + sigma·z against the noised density.
    n, z_max = 20_000, 5.0
    dist = toy_distributions.get(name)
    x_key, z_key = jax.random.split(jax.random.PRNGKey(2))
    x = dist.sample(x_key, n)
    y = SCALE * x + SIGMA * jax.random.normal(z_key, x.shape)
    edges = np.linspace(-6.0, 6.0, 13)
    for d, draws in ((dist, x), (dist.noised(SCALE, SIGMA), y)):
        p = bin_probabilities(d, edges)
        counts = np.histogram2d(*np.asarray(draws).T, bins=[edges, edges])[0]
        se = np.sqrt(n * p * (1 - p))
        np.testing.assert_array_less(np.abs(counts - n * p), z_max * se + 3)


@pytest.mark.parametrize("name", toy_distributions.NAMES)
def test_noised_density_is_the_convolution(name):
    # q(y) = ∫ p(x) N(y; scale·x, σ² I) dx, by a midpoint sum over the grid.
    dist = toy_distributions.get(name)
    noised = dist.noised(SCALE, SIGMA)
    y = noised.sample(jax.random.PRNGKey(3), 16)  # [16, 2]
    p = jnp.exp(jax.jit(dist.log_prob)(POINTS)) * H**2  # [G]
    sq = jnp.sum((y[:, None, :] - SCALE * POINTS) ** 2, -1)  # [16, G]
    kernel = jnp.exp(-0.5 * sq / SIGMA**2) / (2 * np.pi * SIGMA**2)
    # Quadrature error: ~1e-6 for the smooth densities, ~1e-3 at the checkerboard's jumps.
    np.testing.assert_allclose(jnp.exp(noised.log_prob(y)), kernel @ p, rtol=3e-3)


def test_gaussian_in_d_dimensions():
    dist = toy_distributions.get("gaussian", dim=5, std=2.0)
    assert dist.dim == 5
    x = dist.sample(jax.random.PRNGKey(4), 64)
    sq = np.sum(np.asarray(x, np.float64) ** 2, 1)
    expected = -0.5 * sq / 4.0 - 2.5 * np.log(2 * np.pi * 4.0)  # N(0, 4 I) in 5 dimensions
    np.testing.assert_allclose(dist.log_prob(x), expected, rtol=1e-5)
    np.testing.assert_allclose(dist.score(x), -x / 4.0, rtol=1e-5)
    noised = dist.noised(0.5, 1.5)  # N(0, (0.25·4 + 2.25) I)
    np.testing.assert_allclose(noised.score(x), -x / 3.25, rtol=1e-5)


@pytest.mark.parametrize("name", toy_distributions.NAMES)
def test_sample_shapes_and_range(name):
    x = toy_distributions.sample(name, jax.random.PRNGKey(5), 2000)
    assert x.shape == (2000, toy_distributions.get(name).dim) and x.dtype == jnp.float32
    np.testing.assert_array_equal(x, toy_distributions.sample(name, jax.random.PRNGKey(5), 2000))
    assert np.quantile(np.abs(x), 0.99) < 4.5  # roughly within [-4, 4]


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="'spiral'.*gmm8.*checkerboard.*swissroll"):
        toy_distributions.get("spiral")


@pytest.mark.parametrize("scale, sigma", [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1)])
def test_noised_rejects_bad_arguments(scale, sigma):
    for name in ("gmm8", "checkerboard"):
        with pytest.raises(ValueError, match="scale > 0 and sigma >= 0"):
            toy_distributions.get(name).noised(scale, sigma)
