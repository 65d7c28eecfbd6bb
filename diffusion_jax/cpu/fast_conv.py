"""A 2-D convolution with a hand-written backward pass, for training on XLA:CPU.

`conv2d(x, kernel, strides, padding)` computes what ``lax.conv_general_dilated`` computes with
``dimension_numbers=("NHWC", "HWIO", "NHWC")``, and so do its gradients (up to float32 rounding:
the same products, summed in another order). What differs is the program XLA is given:

- 1x1, stride 1, no padding: a matrix product over channels (``dot_general``), forwards and
  backwards. XLA:CPU runs the kernel gradient of a 1x1 ``convolution`` as a "window = whole
  image" convolution: fwd+bwd of 16x32x32, 256->128 took 40.5 ms as a convolution, 10.8 ms as dots.
- Input gradient, stride 1: one forward convolution of the output gradient with the spatially
  flipped, in/out-swapped kernel (what XLA's own transpose rule emits too).
- Input gradient, stride s > 1: XLA's transpose rule convolves the output gradient dilated by s
  (s^2 - 1 of every s^2 pixels are inserted zeros). Here it is split by phase instead: input pixel
  i (padded index j = i + pad_lo = s*m + r) only receives kernel taps r, r + s, ..., so each of the
  s^2 phases is a small dense stride-1 convolution of the output gradient with a sub-kernel, and
  the phases are interleaved (depth-to-space). 9-15 % faster than XLA's rule for the U-Net's
  downsampling convolutions.
- Kernel gradient: XLA's own rule (a "batch-as-feature" convolution), which XLA:CPU hands to
  YNNPACK. Every alternative measured was slower: im2col(x)^T @ dy and per-tap matmuls (slices are
  materialised; 1.1-3x slower), lax.conv_general_dilated_patches (2-3x), swapping the roles of x
  and dy (not offloaded to YNNPACK: >50x), a Winograd F(2x2, 3x3) with its transforms fused in one
  pass (forward 2-3x, forward+backward 1.04-1.9x slower). See experiments/perf/conv_bench.py.

With ``--cpu_conv_library=eigen`` (the default, ``diffusion_jax.cpu.runtime``) XLA:CPU runs
every convolution with Eigen, whose kernel gradient is as fast as its forward pass; on the whole
CIFAR-10 U-Net train step this module then measures within the run-to-run noise of "xla"
(experiments/perf/README.md); the CPU default (``conv_impl = "auto"``) is cpu/winograd.py
instead.

The forward pass is ``lax.conv_general_dilated`` (the dot for 1x1), so inference is unchanged.
Forward-mode differentiation (``jax.jvp``) is not available through a custom VJP: a model that
must be differentiated forwards (e.g. sliced score matching through a convolutional network)
keeps ``conv_impl = "xla"``.

`Conv` is a drop-in for ``flax.linen.Conv`` in the 2-D cases the networks use: the same
constructor arguments, parameter names, shapes and initialisers, so parameters move freely between
the two (``config.model.conv_impl = "fast"`` vs ``"xla"``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as flax_dtypes
from jax import lax

Array = jax.Array
Dtype = Any
Pads = tuple[tuple[int, int], tuple[int, int]]

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

__all__ = ["Conv", "conv2d", "resolve_padding"]


def resolve_padding(
    padding: str | int | Sequence[int | tuple[int, int]],
    in_hw: Sequence[int],
    kernel_hw: Sequence[int],
    strides: Sequence[int],
) -> Pads:
    """'SAME' | 'VALID' | int | [(lo, hi), (lo, hi)] | [p, p] -> ((lo, hi), (lo, hi)), like lax."""
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}: this convolution supports 'SAME' and 'VALID'.")
        pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), padding.upper())
    elif isinstance(padding, int):
        pads = [(padding, padding)] * 2
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if len(pads) != 2 or any(len(p) != 2 for p in pads):
        raise ValueError(f"padding={padding!r} is not two (low, high) pairs.")
    (a, b), (c, d) = pads
    return ((int(a), int(b)), (int(c), int(d)))


def _is_pointwise(kernel_shape: Sequence[int], strides: Sequence[int], pads: Pads) -> bool:
    return tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) == (1, 1) and pads == ((0, 0),) * 2


def _dot_channels(x: Array, w: Array, precision) -> Array:
    """[..., C] x [C, O] -> [..., O]."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _forward(x: Array, kernel: Array, strides, pads: Pads, precision) -> Array:
    if _is_pointwise(kernel.shape, strides, pads):
        return _dot_channels(x, kernel[0, 0], precision)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=DIMENSION_NUMBERS, precision=precision
    )


def _phase_taps(k: int, s: int, r: int) -> int:
    """Number of kernel taps r, r + s, r + 2s, ... below k."""
    return max(0, -(-(k - r) // s))


def _input_grad(g: Array, kernel: Array, x_shape, strides, pads: Pads, precision) -> Array:
    """d(loss)/dx of y = conv(x, kernel), by output phase (see the module docstring).

    1-D picture for one spatial axis (stride s, low padding lo): with j = i + lo = s*m + r,
    dx[i] = sum_q g[m - q] * w[r + q*s], a stride-1 correlation of g with the flipped sub-kernel
    w[r::s]. Phases r = 0..s-1 are computed for m in [lo // s, ceil((lo + H) / s)) and interleaved.
    """
    n, h, w, c = x_shape
    kh, kw = kernel.shape[:2]
    (sh, sw), ((lo_h, _), (lo_w, _)) = strides, pads
    ho, wo = g.shape[1:3]
    m0_h, m0_w = lo_h // sh, lo_w // sw
    m1_h, m1_w = -(-(lo_h + h) // sh), -(-(lo_w + w) // sw)
    rows = []
    for rh in range(sh):
        cols = []
        for rw in range(sw):
            qh, qw = _phase_taps(kh, sh, rh), _phase_taps(kw, sw, rw)
            if qh == 0 or qw == 0:
                cols.append(jnp.zeros((n, m1_h - m0_h, m1_w - m0_w, c), g.dtype))
                continue
            sub = kernel[rh::sh, rw::sw][::-1, ::-1].swapaxes(2, 3)  # [qh, qw, O, C]
            phase_pads = ((qh - 1 - m0_h, m1_h - ho), (qw - 1 - m0_w, m1_w - wo))
            cols.append(
                lax.conv_general_dilated(
                    g,
                    sub,
                    (1, 1),
                    phase_pads,
                    dimension_numbers=DIMENSION_NUMBERS,
                    precision=precision,
                )
            )  # [N, m1_h - m0_h, m1_w - m0_w, C]
        rows.append(cols)
    if sh == sw == 1:
        full = rows[0][0]
    else:
        full = jnp.stack(
            [jnp.stack(cols, axis=3) for cols in rows], axis=2
        )  # [N, Mh, sh, Mw, sw, C]
        full = full.reshape(n, (m1_h - m0_h) * sh, (m1_w - m0_w) * sw, c)
    off_h, off_w = lo_h - m0_h * sh, lo_w - m0_w * sw
    return full[:, off_h : off_h + h, off_w : off_w + w, :]


def _kernel_grad(x: Array, g: Array, kernel: Array, strides, pads: Pads, precision) -> Array:
    """d(loss)/dkernel: XLA's own transpose of the convolution in its kernel argument."""
    _, vjp = jax.vjp(
        lambda k: lax.conv_general_dilated(
            x, k, strides, pads, dimension_numbers=DIMENSION_NUMBERS, precision=precision
        ),
        kernel,
    )
    return vjp(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: Array, kernel: Array, strides, pads: Pads, precision) -> Array:
    return _forward(x, kernel, strides, pads, precision)


def _conv_fwd(x, kernel, strides, pads, precision):
    return _forward(x, kernel, strides, pads, precision), (x, kernel)


def _conv_bwd(strides, pads, precision, residuals, g):
    x, kernel = residuals
    if _is_pointwise(kernel.shape, strides, pads):
        w = kernel[0, 0]
        dx = _dot_channels(g, w.T, precision)
        dw = lax.dot_general(x, g, (((0, 1, 2), (0, 1, 2)), ((), ())), precision=precision)
        dw = dw[None, None]
    else:
        if min(pads[0] + pads[1]) < 0:  # negative (cropping) padding: XLA's own rule
            _, vjp = jax.vjp(
                lambda a: lax.conv_general_dilated(
                    a,
                    kernel,
                    strides,
                    pads,
                    dimension_numbers=DIMENSION_NUMBERS,
                    precision=precision,
                ),
                x,
            )
            dx = vjp(g)[0]
        else:
            dx = _input_grad(g, kernel, x.shape, strides, pads, precision)
        dw = _kernel_grad(x, g, kernel, strides, pads, precision)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(
    x: Array,
    kernel: Array,
    strides: int | Sequence[int] = (1, 1),
    padding: str | int | Sequence[int | tuple[int, int]] = "SAME",
    precision: Any = None,
) -> Array:
    """2-D convolution, NHWC input, HWIO kernel, with the backward pass described above.

    Equal to ``lax.conv_general_dilated(x, kernel, strides, padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)``, values and gradients.

    Args:
      x: [N, H, W, C].
      kernel: [KH, KW, C, O].
      strides: an int or (sh, sw).
      padding: 'SAME', 'VALID', an int, or ((lo, hi), (lo, hi)).
      precision: passed to the convolutions (``lax.Precision`` or None).

    Returns:
      [N, HO, WO, O].
    """
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"conv2d needs x [N,H,W,C] and kernel [KH,KW,C,O]; got {x.shape}, {kernel.shape}."
        )
    if x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"x has {x.shape[-1]} channels but the kernel expects {kernel.shape[2]}.")
    strides = (strides, strides) if isinstance(strides, int) else tuple(int(s) for s in strides)
    pads = resolve_padding(padding, x.shape[1:3], kernel.shape[:2], strides)
    if isinstance(precision, list):
        precision = tuple(precision)
    return _conv(x, kernel, strides, pads, precision)


class Conv(nn.Module):
    """Drop-in for ``flax.linen.Conv`` (2-D, NHWC) computing with `conv2d`.

    Same attributes, defaults, parameter names ("kernel" [KH, KW, C, features], "bias" [features])
    and dtype promotion as ``nn.Conv``, for the cases it supports: 2-D kernels, 'SAME' / 'VALID' /
    explicit padding, no dilation, no feature groups, no mask.
    """

    features: int
    kernel_size: Sequence[int]
    strides: int | Sequence[int] = 1
    padding: str | int | Sequence[int | tuple[int, int]] = "SAME"
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        if len(kernel_size) != 2:
            raise ValueError(
                f"fast_conv.Conv is 2-D: kernel_size must be (kh, kw), got {self.kernel_size!r}."
            )
        strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
        # Any number of leading batch axes (none, one, several), as nn.Conv allows.
        batch_shape = inputs.shape[:-3]
        x = inputs.reshape((-1, *inputs.shape[-3:]))
        kernel = self.param(
            "kernel", self.kernel_init, (*kernel_size, x.shape[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = self._convolve(x, kernel, strides)
        if bias is not None:
            y = y + bias
        return y.reshape((*batch_shape, *y.shape[1:]))

    def _convolve(self, x: Array, kernel: Array, strides: tuple[int, int]) -> Array:
        """[N, H, W, C] x [KH, KW, C, O] -> [N, HO, WO, O]; subclasses change the formulation."""
        return conv2d(x, kernel, strides, self.padding, self.precision)
