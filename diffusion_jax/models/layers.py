"""Building blocks shared by the networks: initialisers, the convolution factory, normalisation,
the sinusoidal time embedding.

Initialisation follows Ho et al.'s code: variance scaling (scale 1, fan-average, uniform) for every
dense and convolution kernel, zero biases, and exact zeros for the layers the paper zero-inits
(the last convolution of each ResNet block, the attention output projection, the output layer).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.cpu import fast_conv, winograd

Dtype = Any


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Dtype:
    """`config.model.dtype` -> the dtype of activations (parameters always stay float32)."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"config.model.dtype={name!r}; allowed: {tuple(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[name]


def kernel_init(zero: bool = False) -> nn.initializers.Initializer:
    """Fan-average uniform variance scaling, or zeros for the zero-initialised layers."""
    if zero:
        return nn.initializers.zeros_init()
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


# Convolution implementations by `config.model.conv_impl`. Each entry is a Module class with the
# constructor arguments and parameters ("kernel" [kh, kw, in, out], "bias" [out]) of nn.Conv, so a
# faster implementation can be registered here without touching the networks.
#   "xla":  flax.linen.Conv, gradients by XLA's transpose rules.
#   "fast": fast_conv.Conv, the same forward with a hand-written backward pass that is faster on
#           XLA:CPU (strided input gradients by phase); reverse-mode only (no jax.jvp through it).
#   "winograd": winograd.Conv, F(4x4, 3x3) for the 3x3 stride-1 layers `winograd.applies` names,
#           lax.conv_general_dilated for the others.
CONV_IMPLS: dict[str, type[nn.Module]] = {
    "xla": nn.Conv,
    "fast": fast_conv.Conv,
    "winograd": winograd.Conv,
}


def resolve_conv_impl(impl: str, platform: str | None = None) -> str:
    """`config.model.conv_impl` -> a key of CONV_IMPLS: "auto" is "winograd" on CPU (faster there:
    experiments/perf/README.md) and "xla" on GPU/TPU (cuDNN's and XLA's own convolutions);
    `platform` defaults to ``jax.default_backend()``."""
    check_conv_impl(impl)
    if impl != "auto":
        return impl
    return "winograd" if (platform or jax.default_backend()) == "cpu" else "xla"


def check_conv_impl(impl: str) -> None:
    """Raise ValueError unless `impl` is "auto" or names a registered convolution implementation."""
    if impl != "auto" and impl not in CONV_IMPLS:
        raise ValueError(
            f"config.model.conv_impl={impl!r} is not available; allowed: {('auto', *CONV_IMPLS)}."
        )


def conv(
    features: int,
    kernel_size: int = 3,
    strides: int = 1,
    *,
    impl: str = "xla",
    zero_init: bool = False,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Module:
    """A square 'SAME'-padded 2-D convolution (NHWC) with bias, float32 parameters."""
    return CONV_IMPLS[resolve_conv_impl(impl)](
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding="SAME",
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init(zero_init),
        name=name,
    )


def dense(
    features: int, *, zero_init: bool = False, dtype: Dtype = jnp.float32, name: str | None = None
) -> nn.Dense:
    """A dense layer over the last axis (a 1x1 convolution, "NIN", on images)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init(zero_init),
        name=name,
    )


class GroupNorm(nn.Module):
    """Group normalisation (Wu & He 2018) over [B, ..., C], written for XLA's fusion.

    y = (x - mu_g) / sqrt(var_g + eps) * scale + bias, with mu_g and var_g the mean and (biased)
    variance of the group's C / G channels over all positions, in two passes (the mean, then
    E[(x - mu_g)^2]: the one-pass E[x^2] - mu_g^2 cancels where |mean| >> std, 5.2e-3 off at
    |mean|/std = 100; cost and precision: experiments/perf/README.md). Each is reduced first
    over positions to per-channel moments [B, C], then over each group's channels on [B, G]; the
    normalisation is applied as one multiply-add y = x * a + b with a = scale / sqrt(var_g + eps)
    and b = bias - mu_g * a ([B, C] each). flax's nn.GroupNorm computes the same function on a
    [B, ..., G, C/G] reshape of x, which XLA:CPU runs as separate passes with layout changes
    (this form's gain on the digits default's train step: experiments/perf/README.md).
    Parameters "scale" and "bias" [C] are those of nn.GroupNorm, so its checkpoints restore.
    Statistics are float32; the output has `dtype`, or x's dtype promoted with float32 if None.
    """

    num_groups: int = 32
    epsilon: float = 1e-6
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if x.ndim < 3 or c % self.num_groups:
            raise ValueError(
                f"GroupNorm: input of shape {x.shape} must be [B, ..., C] with C divisible by "
                f"num_groups={self.num_groups}."
            )
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        xf = x.astype(jnp.float32)
        positions = tuple(range(1, x.ndim - 1))
        mean_c = jnp.mean(xf, axis=positions)  # [B, C]
        grouped = (x.shape[0], self.num_groups, c // self.num_groups)
        mu = jnp.mean(mean_c.reshape(grouped), axis=-1, keepdims=True)  # [B, G, 1]
        expand0 = (x.shape[0],) + (1,) * len(positions) + (c,)
        mu_c = jnp.broadcast_to(mu, grouped).reshape(expand0)
        square_c = jnp.mean(jnp.square(xf - mu_c), axis=positions)  # [B, C]
        var = jnp.mean(square_c.reshape(grouped), axis=-1, keepdims=True)
        inv = jnp.broadcast_to(jax.lax.rsqrt(var + self.epsilon), grouped).reshape(mean_c.shape)
        a = inv * scale  # [B, C]
        b = bias - jnp.broadcast_to(mu, grouped).reshape(mean_c.shape) * a  # [B, C]
        expand = (x.shape[0],) + (1,) * len(positions) + (c,)
        y = xf * a.reshape(expand) + b.reshape(expand)
        out_dtype = self.dtype or jnp.promote_types(x.dtype, jnp.float32)
        return y.astype(out_dtype)


def group_norm(
    num_channels: int,
    *,
    groups: int = 32,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> GroupNorm:
    """GroupNorm with ``groups`` groups (the paper's 32), or gcd(groups, C) when C is not a
    multiple of ``groups``; epsilon 1e-6.

    Statistics are reduced in float32 even when `dtype` is bfloat16.
    """
    return GroupNorm(
        num_groups=math.gcd(groups, num_channels), epsilon=1e-6, dtype=dtype, name=name
    )


def timestep_embedding(t: jax.Array, dim: int) -> jax.Array:
    """Sinusoidal embedding of (possibly non-integer) times, as in Ho et al. / Vaswani et al.

    emb[:, i] = sin(t * f_i), emb[:, half + i] = cos(t * f_i), f_i = 10000^(-i / (half - 1)),
    half = dim // 2; a zero column is appended when `dim` is odd.

    Args:
      t: [B] times (int or float; treated as float32).
      dim: embedding width.

    Returns:
      [B, dim] float32.
    """
    if dim < 2:
        raise ValueError(f"timestep_embedding needs dim >= 2, got {dim}.")
    half = dim // 2
    scale = math.log(10000.0) / max(half - 1, 1)
    freqs = jnp.exp(-scale * jnp.arange(half, dtype=jnp.float32))  # [half]
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, 2 * half]
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(x: jax.Array, exponents: Sequence[int], scale: float = 1.0) -> jax.Array:
    """x with sin(2^n s pi x) and cos(2^n s pi x) for each n in ``exponents`` appended as channels
    (Kingma et al. 2021, VDM, appendix C): fine detail of x_t the network resolves at low noise.
    s is ``scale``: 1 (VDM's powers of two), or the grid frequency L - 1 (``fourier_scale``).

    For data on a grid of L levels 2k / (L - 1) - 1 in [-1, 1], sin/cos(2^n pi x) take one value
    on every level when 2^n pi times the spacing 2 / (L - 1) is a multiple of 2 pi, i.e. when
    2^n is a multiple of L - 1 (n = 4 for 17 levels; 2^n = (L - 1) / 2 alternates sign from
    level to level): then they measure x_t's offset from the nearest level.

    Args:
      x: [..., C].
      exponents: the n's; empty returns x unchanged.
      scale: s, multiplying every frequency.

    Returns:
      [..., C (1 + 2 len(exponents))], channels [x, sin(n_0), cos(n_0), sin(n_1), ...] per n.
    """
    if not exponents:
        return x
    freqs = jnp.asarray([2.0**n * scale * math.pi for n in exponents], jnp.float32)  # [F]
    args = x.astype(jnp.float32)[..., None, :] * freqs[:, None]  # [..., F, C]
    feats = jnp.stack([jnp.sin(args), jnp.cos(args)], axis=-3)  # [..., 2, F, C]
    feats = jnp.moveaxis(feats, -3, -2).reshape(*x.shape[:-1], -1)  # [..., F * 2 * C]
    return jnp.concatenate([x.astype(jnp.float32), feats], axis=-1).astype(x.dtype)


def learned_variance(config: Any) -> bool:
    """Whether the network also outputs a variance: ``diffusion.var_type="learned_range"`` under
    the ddpm objective (the diffusion section is the ddpm objective's; an NCSN ignores it)."""
    return config.training.objective == "ddpm" and config.diffusion.var_type == "learned_range"


def fourier_scale(config: Any) -> float:
    """The frequencies' factor s: with ``model.fourier_grid`` the grid frequency L - 1 of
    ``data.num_bins`` = L levels, so n = 0 is periodic in the grid (one period per level) for any
    L (256 levels: 2^n is never 255); without it (the default, and every config.json written
    before the key) 1, VDM's plain powers of two."""
    return float(config.data.num_bins - 1) if config.model.get("fourier_grid", False) else 1.0


def check_fourier_features(exponents: Sequence[int]) -> None:
    """Raise ValueError unless ``exponents`` are distinct integers in [-4, 16]."""
    ok = all(isinstance(n, int) and -4 <= n <= 16 for n in exponents)
    if not ok or len(set(exponents)) != len(exponents):
        raise ValueError(
            f"config.model.fourier_features={tuple(exponents)!r} must be distinct integers n in "
            "[-4, 16] (features sin/cos(2^n pi x)), or () for none."
        )


class TimeEmbedding(nn.Module):
    """t -> sinusoidal(t, emb_dim) -> Dense(features) -> SiLU -> Dense(features)."""

    emb_dim: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        emb = timestep_embedding(t, self.emb_dim)  # [B, emb_dim] float32
        emb = dense(self.features, dtype=self.dtype, name="dense0")(emb)
        emb = dense(self.features, dtype=self.dtype, name="dense1")(nn.silu(emb))
        return emb  # [B, features]


class ClassEmbedding(nn.Module):
    """Class label -> a learned vector added to the time embedding; ``num_classes`` classes plus
    one "no class" entry (index ``num_classes``), taken where ``labels`` is None (classifier-free
    guidance's unconditional model, Ho & Salimans 2022)."""

    num_classes: int
    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels: jax.Array | None, batch: int) -> jax.Array:
        if labels is None:
            labels = jnp.full((batch,), self.num_classes, jnp.int32)  # [B] the null class
        labels = jnp.asarray(labels)
        if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"labels must be integer class indices of shape ({batch},), got {labels.dtype} "
                f"{labels.shape}."
            )
        embed = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype, name="embed")
        return embed(labels)  # [B, features]


def check_labels(num_classes: int, labels: jax.Array | None) -> None:
    """Raise ValueError for labels given to an unconditional network (``num_classes`` 0)."""
    if labels is not None and num_classes == 0:
        raise ValueError(
            "labels were given to an unconditional network (config.model.num_classes=0)."
        )


def broadcast_times(t: jax.Array | float, batch: int) -> jax.Array:
    """A scalar or [B] time as a [B] array (dtype kept)."""
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {t.shape}.")
    return jnp.broadcast_to(t, (batch,))
