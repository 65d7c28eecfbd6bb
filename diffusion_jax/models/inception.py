"""The Inception-v3 of the FID code (TF graph 2015-12-05, as ported in pytorch-fid), in Flax.

uint8 images [B, H, W, C] (grey images repeated to 3 channels) are resized to 299 x 299
bilinearly (half-pixel centres, no antialiasing: the PyTorch ``interpolate`` convention; the
original TensorFlow graph used the legacy corner-aligned resize) and scaled to [-1, 1] by
x / 127.5 - 1. Conv + batch norm (eps 1e-3) + ReLU units, average pools in Mixed_5*, Mixed_6* and
Mixed_7b that do not count padding, a max pool in Mixed_7c's pool branch; ``pool`` is the 2048-d
global average ("pool3") and ``logits`` the 1008-way classifier on top of it. The weights are
loaded by ``diffusion_jax.evaluation.inception_weights``; the network alone is here.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the FID graph's classifier (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.padding
        if isinstance(pad, tuple):  # (ph, pw) symmetric -> ((ph, ph), (pw, pw))
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.strides, self.strides),
            padding=pad,
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, 'same' size, padding not counted."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):  # [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 35, 35, 288] -> [B, 17, 17, 768]
        b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):  # [B, 17, 17, 768] -> [B, 17, 17, 768]
        c = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 17, 17, 768] -> [B, 8, 8, 1280]
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (``max_pool=True``, as in the FID graph)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):  # [B, 8, 8, C] -> [B, 8, 8, 2048]
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg3(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 [B, H, W, C] (C = 1 or 3) -> float32 [B, size, size, 3] in [-1, 1].

    Bilinear resize with half-pixel centres and no antialiasing, then x / 127.5 - 1.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"Inception input must be uint8 images in [0, 255], got {images.dtype}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB
    if x.shape[-1] != 3:
        raise ValueError(f"Inception input needs 1 or 3 channels, got shape {images.shape}.")
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return x / 127.5 - 1.0


class InceptionV3(nn.Module):
    """The FID Inception-v3: uint8 images -> dict(pool [B, 2048], logits [B, num_classes]).

    ``resize_to`` is 299 for the FID protocol (smaller values, at least 75, only for tests).
    """

    num_classes: int = NUM_CLASSES
    resize_to: int = INPUT_SIZE

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(images, self.resize_to)  # [B, 299, 299, 3]
        x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
        x = _max3s2(x)  # [B, 73, 73, 64]
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max3s2(x)  # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)  # [B, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)  # 288
        x = InceptionA(64, name="Mixed_5d")(x)  # 288
        x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE(name="Mixed_7b")(x)  # [B, 8, 8, 2048]
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))  # [B, 2048] "pool3"
        logits = nn.Dense(self.num_classes, name="fc")(pool)  # [B, 1008]
        return dict(pool=pool, logits=logits)


def abstract_variables(model: InceptionV3, batch_shape=(1, 8, 8, 3)) -> Any:
    """The variables tree of ``model`` as ShapeDtypeStructs (no computation)."""
    images = jax.ShapeDtypeStruct(batch_shape, jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), images)
