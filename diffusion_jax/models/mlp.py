"""A time- (or noise-level-) conditioned residual MLP for vector data.

    t -> sinusoidal(hidden) -> Dense(hidden) -> SiLU -> Dense(hidden) = temb
    (+ Embed(num_classes + 1, hidden)(y) for a class-conditional net; y = num_classes: no class)
    x [B, D] -> Dense(hidden)
      num_layers x residual block:
        h + Dense(dropout(SiLU(Dense(SiLU(LayerNorm(h))) + Dense(SiLU(temb)))))
      -> LayerNorm -> SiLU -> Dense(D) (zero-init; 2D for learned variance)

Inputs with more than one data axis ([B, ..., C]) are flattened and the output is reshaped back,
with the channel axis doubled for learned variance.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax.models import layers

Dtype = Any


class ResidualBlock(nn.Module):
    """Pre-norm residual block with the time embedding added in the middle."""

    features: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    fourier_features: tuple[int, ...] = ()  # exponents n of sin/cos(2^n pi x_t) inputs

    @nn.compact
    def __call__(self, h: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
        # h: [B, F], temb: [B, F]
        y = nn.silu(nn.LayerNorm(dtype=self.dtype, name="norm")(h))
        y = layers.dense(self.features, dtype=self.dtype, name="dense1")(y)
        y = y + layers.dense(self.features, dtype=self.dtype, name="temb_proj")(nn.silu(temb))
        y = nn.Dropout(self.dropout)(nn.silu(y), deterministic=not train)
        y = layers.dense(self.features, dtype=self.dtype, name="dense2")(y)
        return h + y  # [B, F]


class MLP(nn.Module):
    """Residual MLP; call as ``model.apply(variables, x_t, t, y, train=..., rngs=...)``.

    x_t [B, D] (or [B, ..., C], flattened), t [B] int or float (time step, noise-level index or
    sigma) or a scalar, y [B] int class labels or None (no class; always None for
    ``num_classes`` 0).
    """

    hidden_dim: int = 256
    num_layers: int = 4
    dropout: float = 0.0
    learned_variance: bool = False
    dtype: Dtype = jnp.float32
    fourier_scale: float = 1.0  # s of sin/cos(2^n s pi x_t) (layers.fourier_scale)
    fourier_features: tuple[int, ...] = ()  # exponents n of sin/cos(2^n pi x_t) inputs
    num_classes: int = 0  # > 0: class-conditional, labels embedded into temb

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        if x.ndim < 2:
            raise ValueError(f"MLP expects x of shape [B, D], got {x.shape}.")
        b = x.shape[0]
        mult = 2 if self.learned_variance else 1
        out_shape = (*x.shape[:-1], mult * x.shape[-1])
        t = layers.broadcast_times(t, b)  # [B]
        temb = layers.TimeEmbedding(
            self.hidden_dim, self.hidden_dim, dtype=self.dtype, name="temb"
        )(t)  # [B, F]
        layers.check_labels(self.num_classes, y)
        if self.num_classes:
            temb = temb + layers.ClassEmbedding(
                self.num_classes, self.hidden_dim, self.dtype, name="class"
            )(y, b)  # [B, F]
        h = x.reshape(b, -1)  # [B, D]
        h = layers.fourier_features(h, self.fourier_features, self.fourier_scale)  # [B, D (1 + 2F)]
        h = h.astype(self.dtype)
        h = layers.dense(self.hidden_dim, dtype=self.dtype, name="dense_in")(h)  # [B, F]
        for i in range(self.num_layers):
            h = ResidualBlock(self.hidden_dim, self.dropout, self.dtype, name=f"block_{i}")(
                h, temb, train
            )
        h = nn.silu(nn.LayerNorm(dtype=self.dtype, name="norm_out")(h))
        d_out = mult * x[0].size
        h = layers.dense(d_out, zero_init=True, dtype=self.dtype, name="dense_out")(h)
        return h.reshape(out_shape).astype(jnp.float32)  # [B, mult * D]


def build(config: ml_collections.ConfigDict) -> MLP:
    """The MLP described by `config.model` (and `config.diffusion.var_type`)."""
    m = config.model
    return MLP(
        hidden_dim=m.hidden_dim,
        num_layers=m.num_layers,
        dropout=m.dropout,
        learned_variance=layers.learned_variance(config),
        dtype=layers.compute_dtype(m.dtype),
        fourier_features=tuple(m.fourier_features),
        fourier_scale=layers.fourier_scale(config),
        num_classes=m.num_classes,
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for an MLP config that cannot work; compiles nothing."""
    m = config.model
    if m.hidden_dim < 2 or m.num_layers < 0:
        raise ValueError(
            f"config.model.hidden_dim must be >= 2 and num_layers >= 0; "
            f"got {m.hidden_dim} and {m.num_layers}."
        )
