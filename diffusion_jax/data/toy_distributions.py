"""Low-dimensional toy distributions with exact log density and exact score.

Every distribution is a mixture of K components that factorise over the D dimensions, so the
density, its score and its Gaussian convolution are all closed-form:

- ``GaussianMixture``: components N(μ_k, diag τ_k²);
- ``BoxMixture``: components uniform on a box [lo_k, hi_k] convolved with N(0, τ² I) (τ = 0: the
  plain uniform, whose score is 0 on the support).

``dist.noised(scale, sigma)`` is the exact law of ``scale * x + sigma * z`` with x ~ dist and
z ~ N(0, I): the DDPM marginal q(x_t) is ``noised(sqrt(ᾱ_t), sqrt(1 − ᾱ_t))`` and an NCSN level σ is
``noised(1, σ)``. "moons" and "swissroll" are defined as mixtures of many small Gaussians placed
along the curves, so they too have exact densities (no kernel density fit). Data is continuous and
unscaled, roughly within [-4, 4].

    dist = toy_distributions.get("gmm8")
    x = dist.sample(key, 1000)                        # [n, D]
    dist.log_prob(x), dist.score(x)                   # [n], [n, D]
    dist.noised(0.8, 0.6).score(x)                    # score of q(x_t)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, logsumexp

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _log_phi(u: jax.Array) -> jax.Array:
    """log of the standard normal density."""
    return -0.5 * u**2 - _LOG_SQRT_2PI


def _log1mexp(d: jax.Array) -> jax.Array:
    """log(1 − e^d) for d < 0, accurate at both ends (Mächler 2012)."""
    return jnp.where(d > -math.log(2.0), jnp.log(-jnp.expm1(d)), jnp.log1p(-jnp.exp(d)))


def _log_ndtr_diff(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(Φ(b) − Φ(a)) for a < b, computed in the lower tail (Φ(b)−Φ(a) = Φ(−a)−Φ(−b))."""
    flip = a + b > 0
    a, b = jnp.where(flip, -b, a), jnp.where(flip, -a, b)
    log_b = log_ndtr(b)
    return log_b + _log1mexp(log_ndtr(a) - log_b)


def _check_noise(scale, sigma) -> None:
    try:
        ok = np.all(np.asarray(scale) > 0) and np.all(np.asarray(sigma) >= 0)
    except jax.errors.TracerArrayConversionError:  # traced values are not checked
        return
    if not ok:
        raise ValueError(f"noised needs scale > 0 and sigma >= 0, got scale={scale}, sigma={sigma}")


@dataclasses.dataclass(frozen=True, eq=False)
class ToyDistribution:
    """A mixture Σ_k w_k Π_d p_kd(x_d). Subclasses give the per-dimension factors.

    Methods take x of shape [..., D] (typically [n, D]) and reduce the last axis.
    """

    weights: jax.Array  # [K], sums to 1

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _factors(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """log p_kd(x_d) and d/dx_d log p_kd(x_d): [..., D] -> ([..., K, D], [..., K, D])."""
        raise NotImplementedError

    def _sample_components(self, key: jax.Array, k: jax.Array) -> jax.Array:
        """One draw from component k[i] for each i: [n] -> [n, D]."""
        raise NotImplementedError

    def noised(self, scale: float, sigma: float) -> ToyDistribution:
        """The exact law of scale·x + sigma·z, x ~ self, z ~ N(0, I) (scale > 0, sigma >= 0)."""
        raise NotImplementedError

    def _log_joint(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        log_f, dlog_f = self._factors(x)  # [..., K, D] each
        return jnp.log(self.weights) + log_f.sum(-1), dlog_f  # [..., K], [..., K, D]

    def log_prob(self, x: jax.Array) -> jax.Array:
        """log p(x) = log Σ_k w_k p_k(x).  [..., D] -> [...]."""
        return logsumexp(self._log_joint(x)[0], axis=-1)

    def score(self, x: jax.Array) -> jax.Array:
        """∇ₓ log p(x) = Σ_k r_k(x) ∇ₓ log p_k(x), r_k the posterior responsibilities.

        [..., D] -> [..., D].
        """
        log_joint, component_scores = self._log_joint(x)
        r = jax.nn.softmax(log_joint, axis=-1)  # [..., K]
        return jnp.einsum("...k,...kd->...d", r, component_scores)

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """n independent draws, [n, D]."""
        component_key, key = jax.random.split(key)
        k = jax.random.categorical(component_key, jnp.log(self.weights), shape=(n,))  # [n]
        return self._sample_components(key, k)


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture(ToyDistribution):
    """Σ_k w_k N(μ_k, diag τ_k²)."""

    means: jax.Array  # [K, D]
    stds: jax.Array  # [K, D]

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def _factors(self, x):
        u = (x[..., None, :] - self.means) / self.stds  # [..., K, D]
        return _log_phi(u) - jnp.log(self.stds), -u / self.stds

    def _sample_components(self, key, k):
        return self.means[k] + self.stds[k] * jax.random.normal(key, (k.shape[0], self.dim))

    def noised(self, scale, sigma):
        _check_noise(scale, sigma)
        stds = jnp.sqrt((scale * self.stds) ** 2 + sigma**2)
        return GaussianMixture(self.weights, scale * self.means, stds)


@dataclasses.dataclass(frozen=True, eq=False)
class BoxMixture(ToyDistribution):
    """Σ_k w_k U[lo_k, hi_k] ⊛ N(0, τ² I): per dimension

        p_kd(x) = (Φ((hi − x)/τ) − Φ((lo − x)/τ)) / (hi − lo),

    or 1[lo ≤ x ≤ hi] / (hi − lo) at τ = 0.

    ``smoothing`` τ is a Python float, so ``noised`` needs concrete scale and sigma.
    """

    lows: jax.Array  # [K, D]
    highs: jax.Array  # [K, D]
    smoothing: float = 0.0

    @property
    def dim(self) -> int:
        return self.lows.shape[-1]

    def _factors(self, x):
        x = x[..., None, :]  # [..., 1, D]
        log_width = jnp.log(self.highs - self.lows)  # [K, D]
        tau = self.smoothing
        if tau == 0:
            inside = (self.lows <= x) & (x <= self.highs)
            return jnp.where(inside, -log_width, -jnp.inf), jnp.zeros(inside.shape, x.dtype)
        a, b = (self.lows - x) / tau, (self.highs - x) / tau  # [..., K, D]
        log_mass = _log_ndtr_diff(a, b)
        dlog = (jnp.exp(_log_phi(a) - log_mass) - jnp.exp(_log_phi(b) - log_mass)) / tau
        return log_mass - log_width, dlog

    def score(self, x):
        if self.smoothing == 0:  # piecewise constant density: 0 almost everywhere
            return jnp.zeros_like(x)
        return super().score(x)

    def _sample_components(self, key, k):
        box_key, noise_key = jax.random.split(key)
        shape = (k.shape[0], self.dim)
        u = jax.random.uniform(box_key, shape)
        z = jax.random.normal(noise_key, shape)
        lo, hi = self.lows[k], self.highs[k]
        return lo + (hi - lo) * u + self.smoothing * z

    def noised(self, scale, sigma):
        _check_noise(scale, sigma)
        smoothing = math.sqrt((scale * self.smoothing) ** 2 + sigma**2)
        return BoxMixture(self.weights, scale * self.lows, scale * self.highs, smoothing)


def _equal_weights(k: int) -> jax.Array:
    return jnp.full((k,), 1.0 / k, jnp.float32)


def _gaussians_at(centres: np.ndarray, std: float) -> GaussianMixture:
    """Equal-weight mixture of isotropic Gaussians of one std at ``centres`` [K, D]."""
    means = jnp.asarray(centres, jnp.float32)
    return GaussianMixture(_equal_weights(len(centres)), means, jnp.full(means.shape, std))


def gaussian(dim: int = 2, std: float = 1.0) -> GaussianMixture:
    """N(0, std² I) in ``dim`` dimensions."""
    return _gaussians_at(np.zeros((1, dim)), std)


def gmm8(radius: float = 3.0, std: float = 0.3) -> GaussianMixture:
    """8 Gaussians evenly spaced on a circle."""
    angle = 2 * np.pi * np.arange(8) / 8
    return _gaussians_at(radius * np.stack([np.cos(angle), np.sin(angle)], -1), std)


def gmm25(spacing: float = 1.5, std: float = 0.2) -> GaussianMixture:
    """A 5 × 5 grid of Gaussians centred on the origin."""
    ticks = spacing * np.arange(-2, 3)
    return _gaussians_at(np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2), std)


def checkerboard(side: float = 2.0) -> BoxMixture:
    """Uniform on the 8 dark squares of a 4 × 4 board of ``side``-sized squares, centred."""
    cells = np.array([(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0])
    lows = jnp.asarray(side * (cells - 2), jnp.float32)
    return BoxMixture(_equal_weights(len(cells)), lows, lows + side)


def moons(per_moon: int = 64, std: float = 0.15) -> GaussianMixture:
    """Two interleaved half circles (scikit-learn's geometry, centred and doubled in size)."""
    phi = np.linspace(0.0, np.pi, per_moon)
    upper = np.stack([np.cos(phi), np.sin(phi)], -1)
    lower = np.stack([1 - np.cos(phi), 0.5 - np.sin(phi)], -1)
    return _gaussians_at(2.0 * (np.concatenate([upper, lower]) - [0.5, 0.25]), std)


def swissroll(num_components: int = 200, std: float = 0.2) -> GaussianMixture:
    """The 2-D swiss roll (t cos t, t sin t)/4, t uniform on [1.5π, 4.5π]."""
    t = np.linspace(1.5 * np.pi, 4.5 * np.pi, num_components)
    return _gaussians_at(np.stack([t * np.cos(t), t * np.sin(t)], -1) / 4.0, std)


_BUILDERS = dict(
    gaussian=gaussian,
    gmm8=gmm8,
    gmm25=gmm25,
    checkerboard=checkerboard,
    moons=moons,
    swissroll=swissroll,
)
NAMES = tuple(_BUILDERS)


def get(name: str, **kwargs) -> ToyDistribution:
    """The distribution called ``name`` (one of NAMES); kwargs go to its builder above."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown toy distribution {name!r}; choose one of {NAMES}")
    return _BUILDERS[name](**kwargs)


def sample(name: str, key: jax.Array, n: int) -> jax.Array:
    """n draws [n, D] from the distribution called ``name``."""
    return get(name).sample(key, n)
