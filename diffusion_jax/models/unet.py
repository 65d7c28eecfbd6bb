"""The DDPM U-Net (Ho et al. 2020, appendix B), layer for layer as in the authors' TF code.

    t -> sinusoidal(ch) -> Dense(4ch) -> SiLU -> Dense(4ch) = temb
    (+ Embed(num_classes + 1, 4ch)(y) for a class-conditional net; y = num_classes: no class)
    x -> conv3x3(ch)
      down, per level i (resolution halves between levels):
        num_res_blocks x [ResnetBlock(ch * ch_mult[i]) (+ Attention if the resolution is listed)]
        conv3x3 stride 2 (all but the last level)
      middle: ResnetBlock - Attention - ResnetBlock
      up, per level i from the last: (num_res_blocks + 1) x [concat skip -> ResnetBlock (+ Attn)]
        nearest x2 + conv3x3 (all but the first level)
      -> GroupNorm -> SiLU -> conv3x3 (zero-init) -> [B, H, W, C] (2C for learned variance)

ResnetBlock: GroupNorm - SiLU - conv3x3 - (+ Dense(SiLU(temb))) - GroupNorm - SiLU - dropout -
conv3x3 (zero-init), plus a 1x1 (dense) shortcut when the channel count changes.
Attention: single head; GroupNorm, dense q, k, v, softmax(q k^T / sqrt(C)) v, dense out (zero-init).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax.models import layers

Dtype = Any


def check_image_size(image_size: int, ch_mult: Sequence[int]) -> None:
    """Raise ValueError unless `image_size` is divisible by 2^(len(ch_mult) - 1).

    Each level but the last halves the resolution, and the way up must restore the exact sizes of
    the skip connections.
    """
    factor = 2 ** (len(ch_mult) - 1)
    if image_size <= 0 or image_size % factor:
        raise ValueError(
            f"The U-Net with ch_mult={tuple(ch_mult)} ({len(ch_mult)} levels) needs an image size "
            f"divisible by {factor}; got {image_size}. Allowed: multiples of {factor} "
            f"(e.g. {factor}, {2 * factor}, {4 * factor}, ...), or change model.ch_mult."
        )


class ResnetBlock(nn.Module):
    """Wide-ResNet block with the time embedding added after the first convolution."""

    out_ch: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    conv_impl: str = "xla"
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        # x: [B, H, W, C_in], temb: [B, E]
        c_in = x.shape[-1]
        h = nn.silu(
            layers.group_norm(c_in, groups=self.norm_groups, dtype=self.dtype, name="norm1")(x)
        )
        h = layers.conv(self.out_ch, impl=self.conv_impl, dtype=self.dtype, name="conv1")(h)
        temb = layers.dense(self.out_ch, dtype=self.dtype, name="temb_proj")(nn.silu(temb))
        h = h + temb[:, None, None, :]  # [B, H, W, out_ch]
        h = nn.silu(
            layers.group_norm(self.out_ch, groups=self.norm_groups, dtype=self.dtype, name="norm2")(
                h
            )
        )
        h = nn.Dropout(self.dropout)(h, deterministic=not train)
        h = layers.conv(
            self.out_ch, impl=self.conv_impl, zero_init=True, dtype=self.dtype, name="conv2"
        )(h)
        if c_in != self.out_ch:
            x = layers.dense(self.out_ch, dtype=self.dtype, name="nin_shortcut")(x)
        return x + h  # [B, H, W, out_ch]


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual."""

    dtype: Dtype = jnp.float32
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        h = layers.group_norm(c, groups=self.norm_groups, dtype=self.dtype, name="norm")(x)
        h = h.reshape(b, height * width, c)  # [B, N, C]
        q = layers.dense(c, dtype=self.dtype, name="q")(h)
        k = layers.dense(c, dtype=self.dtype, name="k")(h)
        v = layers.dense(c, dtype=self.dtype, name="v")(h)
        logits = jnp.einsum("bnc,bmc->bnm", q, k).astype(jnp.float32) * c**-0.5  # [B, N, N]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        h = jnp.einsum("bnm,bmc->bnc", weights, v)  # [B, N, C]
        h = layers.dense(c, zero_init=True, dtype=self.dtype, name="proj_out")(h)
        return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
    """The DDPM U-Net; output channels = input channels (x2 with `learned_variance`).

    Call as ``model.apply(variables, x_t, t, y, train=..., rngs={"dropout": key})`` with x_t
    [B, H, W, C], t [B] (int or float) or a scalar, and y [B] int class labels or None (no
    class; for ``num_classes`` 0, the unconditional net, always None).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    learned_variance: bool = False
    dtype: Dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "xla"
    fourier_scale: float = 1.0  # s of sin/cos(2^n s pi x_t) (layers.fourier_scale)
    fourier_features: tuple[int, ...] = ()  # exponents n of sin/cos(2^n pi x_t) input channels
    num_classes: int = 0  # > 0: class-conditional, labels embedded into temb
    norm_groups: int = 32  # GroupNorm groups (gcd(norm_groups, C) where C is not a multiple)

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"UNet expects x of shape [B, H, W, C], got {x.shape}.")
        b, height, width, c = x.shape
        for size in (height, width):
            check_image_size(size, self.ch_mult)
        t = layers.broadcast_times(t, b)  # [B]
        out_ch = 2 * c if self.learned_variance else c
        num_levels = len(self.ch_mult)
        dt = self.dtype
        # train is static: argument 3 of ResnetBlock.__call__ counting self.
        block_cls = nn.remat(ResnetBlock, static_argnums=(3,)) if self.remat else ResnetBlock

        def resnet(h: jax.Array, out: int, name: str) -> jax.Array:
            block = block_cls(out, self.dropout, dt, self.conv_impl, self.norm_groups, name=name)
            return block(h, temb, train)

        def conv(h: jax.Array, out: int, name: str, **kw: Any) -> jax.Array:
            return layers.conv(out, impl=self.conv_impl, dtype=dt, name=name, **kw)(h)

        temb = layers.TimeEmbedding(self.ch, 4 * self.ch, dtype=dt, name="temb")(t)  # [B, 4ch]
        layers.check_labels(self.num_classes, y)
        if self.num_classes:
            temb = temb + layers.ClassEmbedding(self.num_classes, 4 * self.ch, dt, name="class")(
                y, b
            )  # [B, 4ch]

        # Down: keep every intermediate output for the skip connections.
        h = layers.fourier_features(x, self.fourier_features, self.fourier_scale)  # [B, H, W, C']
        hs = [conv(h.astype(dt), self.ch, "conv_in")]  # [B, H, W, ch]
        for i, mult in enumerate(self.ch_mult):
            for j in range(self.num_res_blocks):
                h = resnet(hs[-1], self.ch * mult, f"down_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(dt, self.norm_groups, name=f"down_{i}_attn_{j}")(h)
                hs.append(h)
            if i != num_levels - 1:
                h = hs[-1]
                if self.resamp_with_conv:
                    h = conv(h, h.shape[-1], f"down_{i}_downsample", strides=2)
                else:
                    h = nn.avg_pool(h, (2, 2), strides=(2, 2))
                hs.append(h)  # [B, H / 2^(i+1), W / 2^(i+1), ch * mult]

        # Middle.
        h = hs[-1]
        h = resnet(h, h.shape[-1], "mid_block_1")
        h = AttnBlock(dt, self.norm_groups, name="mid_attn_1")(h)
        h = resnet(h, h.shape[-1], "mid_block_2")

        # Up: num_res_blocks + 1 blocks per level, each eating one skip connection.
        for i in reversed(range(num_levels)):
            for j in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = resnet(h, self.ch * self.ch_mult[i], f"up_{i}_block_{j}")
                if h.shape[1] in self.attn_resolutions:
                    h = AttnBlock(dt, self.norm_groups, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest x2
                if self.resamp_with_conv:
                    h = conv(h, h.shape[-1], f"up_{i}_upsample")
        assert not hs

        h = nn.silu(
            layers.group_norm(h.shape[-1], groups=self.norm_groups, dtype=dt, name="norm_out")(h)
        )
        h = conv(h, out_ch, "conv_out", zero_init=True)  # [B, H, W, out_ch]
        return h.astype(jnp.float32)


def build(config: ml_collections.ConfigDict) -> UNet:
    """The U-Net described by `config.model` (and `config.diffusion.var_type`)."""
    m = config.model
    return UNet(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        dropout=m.dropout,
        resamp_with_conv=m.resamp_with_conv,
        learned_variance=layers.learned_variance(config),
        dtype=layers.compute_dtype(m.dtype),
        remat=m.remat,
        conv_impl=m.conv_impl,
        fourier_features=tuple(m.fourier_features),
        fourier_scale=layers.fourier_scale(config),
        num_classes=m.num_classes,
        norm_groups=m.get("norm_groups", 32),
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a U-Net config that cannot work with the data; compiles nothing."""
    if not config.data.image_size:
        raise ValueError(
            "config.model.name='unet' needs image data (data.image_size > 0); "
            "use model.name='mlp' for vector data."
        )
    check_image_size(config.data.image_size, config.model.ch_mult)
    groups = config.model.get("norm_groups", 32)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(
            f"config.model.norm_groups={groups!r} must be an integer >= 1 (GroupNorm groups; "
            "the paper's 32)."
        )
