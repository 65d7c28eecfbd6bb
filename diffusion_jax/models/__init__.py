"""The networks that `model_fn(x_t, t)` wraps, picked by `config.model.name`.

Every model is a flax.linen Module called as
``model.apply(variables, x_t, t, y, train=..., rngs={"dropout": key})``, y [B] class labels
(``config.model.num_classes`` > 0) or None; its output has the input's shape, with the last axis
doubled when ``config.diffusion.var_type == "learned_range"``.

A new network is one new file defining ``build(config) -> nn.Module`` and
``check_config(config)``, plus one entry in MODELS.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax.models import continuous, layers, mlp, unet
from diffusion_jax.models.layers import resolve_conv_impl
from diffusion_jax.models.unet import check_image_size

__all__ = [
    "MODELS",
    "check_config",
    "check_image_size",
    "get_model",
    "model_fn",
    "resolve_conv_impl",
]

MODELS: dict[str, ModuleType] = {"unet": unet, "mlp": mlp}


def _lookup(name: str) -> ModuleType:
    if name not in MODELS:
        raise ValueError(f"config.model.name={name!r} is not a model; allowed: {tuple(MODELS)}.")
    return MODELS[name]


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the bad key and the allowed values; builds and compiles nothing.

    Checks the model name, compute dtype, convolution implementation, and what the picked model
    needs of the data (the U-Net: an image size divisible by 2^(levels - 1)).
    """
    model_module = _lookup(config.model.name)
    layers.compute_dtype(config.model.dtype)
    layers.check_conv_impl(config.model.conv_impl)
    layers.check_fourier_features(config.model.fourier_features)
    model_module.check_config(config)


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The network named by `config.model.name` ("unet" | "mlp"), configured from `config`;
    under ``training.objective="vdm"`` wrapped with its noise schedule
    (``continuous.ContinuousTimeNet``: called at continuous t in [0, 1])."""
    model_module = _lookup(config.model.name)
    layers.compute_dtype(config.model.dtype)
    layers.check_conv_impl(config.model.conv_impl)
    net = model_module.build(config)
    return continuous.wrap(config, net) if config.training.objective == "vdm" else net


def model_fn(
    model: nn.Module,
    params: Any,
    train: bool = False,
    dropout_key: jax.Array | None = None,
    labels: jax.Array | None = None,
    guidance_scale: float = 0.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``model_fn(x_t, t)`` for the math core, closing over parameters (and a dropout key).

    ``labels`` [B]: the classes of a class-conditional model's batch (None: no class). With
    ``guidance_scale`` w != 0, classifier-free guidance: x_t goes through the network once,
    batched with itself, under the labels and under "no class"; the outputs are combined by
    ``diffusion.classifier_free_guidance``.
    """
    rngs = {"dropout": dropout_key} if train else {}

    def apply(x, t, y):
        return model.apply({"params": params}, x, t, y, train=train, rngs=rngs)

    if not guidance_scale:
        return lambda x, t: apply(x, t, labels)
    if labels is None:
        raise ValueError(
            f"sampling.guidance_scale={guidance_scale} needs class labels (a conditional model)."
        )
    num_classes = model.num_classes
    learned_var = bool(getattr(model, "learned_variance", False))

    def guided(x: jax.Array, t: jax.Array) -> jax.Array:
        b = x.shape[0]
        t = layers.broadcast_times(t, b)  # [B]
        null = jnp.full_like(labels, num_classes)  # [B] "no class"
        both = apply(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )  # [2B, ...]
        return diffusion_lib.classifier_free_guidance(
            both[:b], both[b:], guidance_scale, learned_var
        )

    return guided
