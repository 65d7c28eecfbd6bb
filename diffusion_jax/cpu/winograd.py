"""Winograd convolution F(4x4, 3x3) (Lavin & Gray 2016), for training and sampling on XLA:CPU.

A 3x3, stride-1, 'SAME' convolution computes each 4x4 output tile Y from the 6x6 input tile d
that covers it (two pixels of overlap with each neighbour) as

    Y = A^T [ (G g G^T) ⊙ (B^T d B) ] A                                  (Lavin & Gray, eq. 10)

with g the 3x3 kernel of one (input, output) channel pair and B^T [6, 6], G [6, 3], A^T [4, 6]
the transforms of Toom-Cook interpolation at the points 0, ±1, ±2, ∞. Summed over input
channels, the elementwise product becomes 36 matrix products [tiles, C] x [C, O]: 36 products per
16 outputs instead of 144, 4x fewer multiplications than the direct convolution, at the price of
the (memory-bound) transforms of the input and output. The result equals the direct convolution
up to float32 rounding (relative error ~1e-5 for the U-Net's layers: the transforms' constants,
up to 8, amplify rounding a little; tests/test_winograd.py). Float32 only: with the products'
operands rounded to bfloat16 (transforms in float32, float32 accumulation) the error was 2.6 %
(relative norm, 16x16, 64 -> 32 channels) against 0.17 % for the direct bfloat16 convolution, and
the CIFAR-10 train step no faster (9.0 images/s at batch 16); `model.dtype = "bfloat16"` keeps
``lax.conv_general_dilated``.

On XLA:CPU the direct convolution is Eigen's at ~330-440 GFLOP/s; here the 36 products go to
YNNPACK's batched matrix product and the transforms are elementwise fusions, each transform in
two separable passes (rows, then columns) kept apart by ``lax.optimization_barrier`` (fused into
one, XLA recomputes the row pass for every column output: 8x slower). Gradients are JAX's
transposes of these linear steps: the input gradient is the same three steps run backwards, the
kernel gradient 36 products [C, tiles] x [tiles, O]. `config.model.conv_impl = "winograd"` (and
"auto" on CPU) uses it for the shapes `applies` accepts, chosen by timing the whole CIFAR-10 train
step (experiments/perf/README.md; per shape: experiments/perf/conv_bench.py, form "winograd"), and
``lax.conv_general_dilated`` for every other one: a rule fixed in code, never measured at run
time, so the same config always runs the same program.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from diffusion_jax.cpu import fast_conv

Array = jax.Array
Dtype = Any

__all__ = ["Conv", "applies", "winograd_conv3x3", "B_T", "G", "A_T"]

# F(4, 3) at the points 0, 1, -1, 2, -2, ∞ (Lavin & Gray 2016, section 4.3).
B_T = np.array(
    [
        [4, 0, -5, 0, 1, 0],
        [0, -4, -4, 1, 1, 0],
        [0, 4, -4, -1, 1, 0],
        [0, -2, -1, 2, 1, 0],
        [0, 2, -1, -2, 1, 0],
        [0, 4, 0, -5, 0, 1],
    ],
    np.float64,
)  # [6, 6]
G = np.array(
    [
        [1 / 4, 0, 0],
        [-1 / 6, -1 / 6, -1 / 6],
        [-1 / 6, 1 / 6, -1 / 6],
        [1 / 24, 1 / 12, 1 / 6],
        [1 / 24, -1 / 12, 1 / 6],
        [0, 0, 1],
    ],
    np.float64,
)  # [6, 3]
A_T = np.array(
    [
        [1, 1, 1, 1, 1, 0],
        [0, 1, -1, 2, -2, 0],
        [0, 1, 1, 4, 4, 0],
        [0, 1, -1, 8, -8, 1],
    ],
    np.float64,
)  # [4, 6]
TILE = 4  # output tile size m; the input tile is m + 2

# The shapes `config.model.conv_impl = "winograd"` computes this way (measured on the CIFAR-10
# U-Net's layers, experiments/perf/README.md): spatial sizes from MIN_SIZE, at least MIN_CHANNELS
# input channels (conv_in's 3 channels stay direct). Everything else is lax.conv_general_dilated.
MIN_SIZE = 16
MIN_CHANNELS = 64


def _combine(matrix: np.ndarray, xs: Sequence[Array]) -> list[Array]:
    """[sum_i matrix[a, i] * xs[i] for each row a]: a small constant matrix applied to a list of
    arrays as elementwise adds and scalings (XLA fuses them), zero coefficients skipped."""
    out = []
    for row in matrix:
        acc = None
        for c, x in zip(row, xs, strict=True):
            if c == 0:
                continue
            term = x if c == 1 else -x if c == -1 else x * jnp.asarray(c, x.dtype)
            acc = term if acc is None else acc + term
        out.append(acc)
    return out


def input_transform(x: Array) -> Array:
    """V = B^T d B for every 6x6 input tile d of x padded by 1: [N, H, W, C] -> [36, tiles, C].

    Tile (ty, tx) covers padded rows 4ty .. 4ty + 5 and columns 4tx .. 4tx + 5; tiles are ordered
    (n, ty, tx), the 36 entries (a, b) of B^T d B row-major.
    """
    n, h, w, c = x.shape
    th, tw = h // TILE, w // TILE
    # Pad 1 before (SAME) and 3 after, so that the padded size is 4 * (tiles + 1).
    xp = jnp.pad(x, ((0, 0), (1, 3), (1, 3), (0, 0))).reshape(n, th + 1, TILE, w + 4, c)
    rows = [xp[:, :th, i] if i < TILE else xp[:, 1:, i - TILE] for i in range(6)]  # [N, th, W+4, C]
    r = lax.optimization_barrier(jnp.stack(_combine(B_T, rows)))  # [6, N, th, W+4, C]
    r = r.reshape(6, n, th, tw + 1, TILE, c)
    cols = [r[:, :, :, :tw, j] if j < TILE else r[:, :, :, 1:, j - TILE] for j in range(6)]
    v = jnp.stack(_combine(B_T, cols), axis=1)  # [6, 6, N, th, tw, C]
    return v.reshape(36, n * th * tw, c)


def kernel_transform(kernel: Array) -> Array:
    """U = G g G^T per (input, output) channel pair: [3, 3, C, O] -> [36, C, O]."""
    c, o = kernel.shape[2:]
    gw = jnp.stack(_combine(G, [kernel[i] for i in range(3)]))  # [6, 3, C, O]
    return jnp.stack(_combine(G, [gw[:, j] for j in range(3)]), axis=1).reshape(36, c, o)


def output_transform(m: Array, shape: tuple[int, int, int]) -> Array:
    """Y = A^T M A per tile, the tiles put back in place: [36, tiles, O] -> [N, H, W, O]."""
    n, h, w = shape
    o = m.shape[-1]
    th, tw = h // TILE, w // TILE
    m = m.reshape(6, 6, n, th, tw, o)
    a = lax.optimization_barrier(jnp.stack(_combine(A_T, [m[i] for i in range(6)])))
    y = jnp.stack(_combine(A_T, [a[:, j] for j in range(6)]), axis=-2)  # [4, N, th, tw, 4, O]
    return y.transpose(1, 2, 0, 3, 4, 5).reshape(n, h, w, o)


def winograd_conv3x3(x: Array, kernel: Array) -> Array:
    """3x3, stride 1, 'SAME' convolution by F(4x4, 3x3): Y = A^T [U ⊙ V] A, summed over channels.

    Equal (up to float32 rounding) to ``lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"))``, values and gradients.

    Args:
      x: [N, H, W, C], H and W multiples of 4.
      kernel: [3, 3, C, O].

    Returns:
      [N, H, W, O].
    """
    n, h, w, c = x.shape
    if kernel.shape[:3] != (3, 3, c) or h % TILE or w % TILE:
        raise ValueError(
            f"winograd_conv3x3 needs a [3, 3, {c}, O] kernel and H, W multiples of {TILE}; "
            f"got x {x.shape}, kernel {kernel.shape}."
        )
    with jax.named_scope("winograd"):  # names its ops in profiles (experiments/perf)
        v = lax.optimization_barrier(input_transform(x))  # [36, tiles, C]
        u = kernel_transform(kernel)  # [36, C, O]
        m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # [36, tiles, O]
        return output_transform(lax.optimization_barrier(m), (n, h, w))


def applies(
    x_shape: Sequence[int],
    kernel_shape: Sequence[int],
    strides: Sequence[int],
    padding: Any,
    dtype: Dtype,
    min_size: int = MIN_SIZE,
    min_channels: int = MIN_CHANNELS,
) -> bool:
    """Whether `Conv` computes this convolution by Winograd: 3x3, stride 1, 'SAME', float32, H
    and W multiples of 4 and at least `min_size`, at least `min_channels` input channels."""
    _, h, w, c = x_shape
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and isinstance(padding, str)
        and padding.upper() == "SAME"
        and h % TILE == 0
        and w % TILE == 0
        and min(h, w) >= min_size
        and c >= min_channels
        and jnp.dtype(dtype) == jnp.float32
    )


class Conv(fast_conv.Conv):
    """Drop-in for ``flax.linen.Conv`` (2-D, NHWC): Winograd F(4x4, 3x3) where `applies`,
    ``lax.conv_general_dilated`` (autodiff) elsewhere. Same parameters as ``nn.Conv``."""

    def _convolve(self, x: Array, kernel: Array, strides: tuple[int, int]) -> Array:
        if applies(x.shape, kernel.shape, strides, self.padding, x.dtype):
            return winograd_conv3x3(x, kernel)
        pads = fast_conv.resolve_padding(self.padding, x.shape[1:3], kernel.shape[:2], strides)
        return lax.conv_general_dilated(
            x,
            kernel,
            strides,
            pads,
            dimension_numbers=fast_conv.DIMENSION_NUMBERS,
            precision=self.precision,
        )
