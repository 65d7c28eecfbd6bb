"""Two-sample distances between point clouds x [n, D] and y [m, D]: sliced Wasserstein and MMD.

Both are jit-able JAX functions of the samples (float32 in, float32 out).

Sliced 2-Wasserstein distance (Rabin et al. 2011), over K random directions θ_k uniform on the
sphere S^{D-1}:

    SW₂(x, y) = ( (1/K) Σ_k W₂²(θ_kᵀx, θ_kᵀy) )^½,   W₂²(a, b) = (1/n) Σ_i (a_(i) − b_(i))²

with a_(i) the i-th order statistic (for n = m the 1-D optimal coupling pairs the sorted values).

Unbiased squared maximum mean discrepancy (Gretton et al. 2012) with a sum of RBF kernels
k(u, v) = Σ_h exp(−‖u − v‖² / (2h²)):

    MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j)
             − 2/(nm) Σ_{i,j} k(x_i, y_j),

zero in expectation when x and y come from the same law (so it can be slightly negative).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

DEFAULT_BANDWIDTHS = (0.1, 0.3, 1.0, 3.0)  # toy data: modes of width ~0.2-0.3, spread ~3


def _check_pair(x: jax.Array, y: jax.Array) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need samples [n, D] and [m, D], got {x.shape} and {y.shape}")


def random_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
    """``num`` directions uniform on the unit sphere in R^dim, [num, dim]."""
    v = jax.random.normal(key, (num, dim))
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def sliced_wasserstein(
    x: jax.Array, y: jax.Array, key: jax.Array, num_projections: int = 512
) -> jax.Array:
    """SW₂(x, y) over ``num_projections`` random directions; x, y: [n, D] (the same n)."""
    _check_pair(x, y)
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"sliced_wasserstein needs as many x as y, got {x.shape[0]} and {y.shape[0]}"
        )
    theta = random_directions(key, num_projections, x.shape[1])  # [K, D]
    px = jnp.sort(x @ theta.T, axis=0)  # [n, K]
    py = jnp.sort(y @ theta.T, axis=0)
    return jnp.sqrt(jnp.mean(jnp.square(px - py)))


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
    """‖a_i − b_j‖², [n, m], from the differences (no cancellation; memory n·m·D)."""
    return jnp.sum(jnp.square(a[:, None, :] - b[None, :, :]), axis=-1)


def rbf_kernel(a: jax.Array, b: jax.Array, bandwidths: Sequence[float]) -> jax.Array:
    """Σ_h exp(−‖a_i − b_j‖² / (2h²)), [n, m]."""
    d = _sq_dists(a, b)
    return sum(jnp.exp(-d / (2.0 * h**2)) for h in bandwidths)


def kernel_sum(
    a: jax.Array, b: jax.Array, bandwidths: Sequence[float], block: int = 1024
) -> jax.Array:
    """Σ_ij k(a_i, b_j) over row blocks of ``a`` (memory block·m·D instead of n·m·D)."""
    n, dim = a.shape
    block = min(block, n)
    pad = -n % block
    rows = jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, block, dim)  # [n_blocks, block, D]
    valid = (jnp.arange(n + pad) < n).reshape(-1, block).astype(a.dtype)  # [n_blocks, block]

    def one(args):
        rows_b, valid_b = args
        return jnp.sum(rbf_kernel(rows_b, b, bandwidths) * valid_b[:, None])

    return jnp.sum(jax.lax.map(one, (rows, valid)))


def mmd2(
    x: jax.Array,
    y: jax.Array,
    bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
    block: int = 1024,
) -> jax.Array:
    """The unbiased MMD² estimate with the summed RBF kernel; x [n, D], y [m, D], n, m >= 2."""
    _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd2 needs at least 2 points on each side, got {n} and {m}")
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"bandwidths must be positive, got {bandwidths}")
    k = len(bandwidths)  # k(u, u) = len(bandwidths): the diagonal to drop
    kxx = (kernel_sum(x, x, bandwidths, block) - n * k) / (n * (n - 1))
    kyy = (kernel_sum(y, y, bandwidths, block) - m * k) / (m * (m - 1))
    kxy = kernel_sum(x, y, bandwidths, block) / (n * m)
    return kxx + kyy - 2.0 * kxy
