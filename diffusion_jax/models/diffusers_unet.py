"""diffusers' ``UNet2DModel`` (the conversions of Ho et al.'s models, ``google/ddpm-*``) as our
U-Net: its ``config.json`` as our config keys, its tensors as our parameters.

The two networks are the same function: sinusoidal time embedding -> Linear -> SiLU -> Linear;
``conv_in``; per level ResNet blocks (GroupNorm, SiLU, conv, + Linear(SiLU(temb)), GroupNorm, SiLU,
dropout, conv, 1x1 shortcut on a channel change) with single-head attention at the listed
resolutions; a stride-2 convolution whose padding is TensorFlow's asymmetric SAME (diffusers'
``downsample_padding=0``: pad right and bottom by one); the middle (block, attention, block); the
way up with one more block a level, each eating a skip connection, nearest x2 + conv; GroupNorm,
SiLU, ``conv_out``. What differs is layout: PyTorch's convolutions are [O, I, kh, kw] (ours
[kh, kw, I, O]), its linear layers [O, I] (ours [I, O]), its 1x1 shortcut a convolution (ours a
dense layer), and its up blocks are numbered from the lowest resolution.

A diffusers config with an option our U-Net does not compute (another activation, multi-head or
cross attention, scale-shift time conditioning, ...) is refused naming the key, so an import that
succeeds is the same network.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np


class DiffusersImportError(ValueError):
    """A diffusers model or scheduler that cannot be represented, or tensors that do not fit."""


# diffusers' defaults (UNet2DModel / DDPMScheduler of diffusers 0.42): what a key missing from a
# config.json means.
UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "variance_type": "fixed_small",
    "clip_sample": True,
    "prediction_type": "epsilon",
    "thresholding": False,
    "clip_sample_range": 1.0,
    "rescale_betas_zero_snr": False,
}
# Scheduler keys that only shape diffusers' own inference loop (or its thresholding, refused
# when on): not read.
_SCHEDULER_IGNORED = ("dynamic_thresholding_ratio", "sample_max_value", "timestep_spacing")
_SCHEDULER_IGNORED += ("steps_offset", "variance_type_learned")

# The values our U-Net computes, for the keys that have exactly one: (allowed, what ours does).
_FIXED = {
    "center_input_sample": ((False,), "the input is used as it is ([-1, 1] data)"),
    "time_embedding_type": (("positional",), "a sinusoidal time embedding"),
    "freq_shift": ((1,), "frequencies 10000^(-i / (half - 1))"),
    "mid_block_type": (("UNetMidBlock2D",), "a middle of block, attention, block"),
    "mid_block_scale_factor": ((1,), "unscaled residuals in the middle"),
    "downsample_padding": ((0,), "TensorFlow's SAME padding in the stride-2 convolution"),
    "downsample_type": (("conv",), "a stride-2 convolution"),
    "upsample_type": (("conv",), "nearest x2 then a convolution"),
    "act_fn": (("silu", "swish"), "SiLU"),
    "norm_eps": ((1e-6,), "GroupNorm epsilon 1e-6"),
    "resnet_time_scale_shift": (("default",), "the time embedding added (no scale-shift)"),
    "add_attention": ((True,), "attention in the middle"),
    "class_embed_type": ((None,), "no class embedding of diffusers' kinds"),
    "num_class_embeds": ((None,), "no class embedding of diffusers' kinds"),
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}

_VARIANCE = {
    "fixed_small": "fixedsmall",
    "fixed_small_log": "fixedsmall",
    "fixed_large": "fixedlarge",
    "fixed_large_log": "fixedlarge",
    "learned_range": "learned_range",
}
_PREDICTION = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_BETAS = {"linear": "linear", "scaled_linear": "quadratic", "squaredcos_cap_v2": "cosine"}


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _list_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(check(x) for x in v)


def _or_none(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


_INT, _NUM, _STR, _BOOL = (
    (_int, "an integer"),
    (_number, "a number"),
    (_str, "a string"),
    (
        _bool,
        "true or false",
    ),
)
# The JSON type of every key read (a value of another type is refused naming the key, before it
# is interpreted).
UNET_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "sample_size": (lambda v: _int(v) or _list_of(_int)(v), "an integer or [s, s]"),
    "in_channels": _INT,
    "out_channels": _INT,
    "center_input_sample": _BOOL,
    "time_embedding_type": _STR,
    "time_embedding_dim": (_or_none(_int), "an integer or null"),
    "freq_shift": _INT,
    "flip_sin_to_cos": _BOOL,
    "down_block_types": (_list_of(_str), "a list of block names"),
    "mid_block_type": (_or_none(_str), "a string or null"),
    "up_block_types": (_list_of(_str), "a list of block names"),
    "block_out_channels": (_list_of(lambda c: _int(c) and c > 0), "a list of integers > 0"),
    "layers_per_block": _INT,
    "mid_block_scale_factor": _NUM,
    "downsample_padding": _INT,
    "downsample_type": _STR,
    "upsample_type": _STR,
    "dropout": (lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "act_fn": _STR,
    "attention_head_dim": (_or_none(_int), "an integer or null"),
    "norm_num_groups": (lambda v: _int(v) and v > 0, "an integer > 0"),
    "attn_norm_num_groups": (_or_none(_int), "an integer or null"),
    "norm_eps": _NUM,
    "resnet_time_scale_shift": _STR,
    "add_attention": _BOOL,
    "class_embed_type": (_or_none(_str), "a string or null"),
    "num_class_embeds": (_or_none(_int), "an integer or null"),
    "num_train_timesteps": (_or_none(_int), "an integer or null"),
}
SCHEDULER_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "num_train_timesteps": (lambda v: _int(v) and v >= 2, "an integer >= 2"),
    "beta_start": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "beta_end": (lambda v: _number(v) and 0 < v < 1, "a number in (0, 1)"),
    "beta_schedule": _STR,
    "trained_betas": (_or_none(_list_of(_number)), "null or a list of numbers"),
    "variance_type": _STR,
    "clip_sample": _BOOL,
    "prediction_type": _STR,
    "thresholding": _BOOL,
    "clip_sample_range": _NUM,
    "rescale_betas_zero_snr": _BOOL,
}


def check_types(
    values: Mapping[str, Any], types: Mapping[str, tuple[Callable[[Any], bool], str]], kind: str
) -> None:
    """DiffusersImportError naming the first key of ``values`` whose value is not of its type in
    ``types`` (``kind``: "config" or "scheduler", for the message)."""
    for key, (check, what) in types.items():
        if key in values and not check(values[key]):
            raise DiffusersImportError(
                f"diffusers {kind} key {key}={values[key]!r} must be {what}."
            )


def _refuse(key: str, value: Any, allowed: Any, why: str) -> DiffusersImportError:
    return DiffusersImportError(
        f"diffusers config {key}={value!r} cannot be represented: our U-Net computes {why} "
        f"(allowed: {allowed!r})."
    )


def unet_keys(dconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Our config keys (dotted) for a diffusers ``UNet2DModel`` config.json; a key missing from
    it takes diffusers' default (``UNET_DEFAULTS``).

    Raises DiffusersImportError naming the first key our U-Net cannot represent (another class,
    activation, time embedding, padding, multi-head attention, attention on the way down but not
    up, ...) or a key this importer does not know.
    """
    name = dconfig.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise DiffusersImportError(
            f"diffusers config _class_name={name!r}: only UNet2DModel (the DDPM U-Net) is "
            "imported; conditional models (UNet2DConditionModel: text cross-attention) are not."
        )
    unknown = sorted(k for k in dconfig if not k.startswith("_") and k not in UNET_DEFAULTS)
    if unknown:
        raise DiffusersImportError(
            f"diffusers config key {unknown[0]}={dconfig[unknown[0]]!r} is not known to this "
            f"importer (it knows {sorted(UNET_DEFAULTS)}); refusing rather than guessing."
        )
    check_types(dconfig, UNET_TYPES, "config")
    d = {**UNET_DEFAULTS, **dconfig}
    for key, (allowed, why) in _FIXED.items():
        if d[key] not in allowed:
            raise _refuse(key, d[key], allowed, why)
    if d["time_embedding_type"] == "positional" and not isinstance(d["flip_sin_to_cos"], bool):
        raise _refuse("flip_sin_to_cos", d["flip_sin_to_cos"], (False, True), "either order")

    channels = [int(c) for c in d["block_out_channels"]]
    ch = channels[0]
    if not channels or any(c <= 0 or c % ch for c in channels):
        raise _refuse(
            "block_out_channels", d["block_out_channels"], "multiples of the first", "ch * ch_mult"
        )
    levels = len(channels)
    down, up = list(d["down_block_types"]), list(d["up_block_types"])
    for key, types, known in (("down_block_types", down, _DOWN), ("up_block_types", up, _UP)):
        if len(types) != levels:
            raise DiffusersImportError(
                f"diffusers config {key} has {len(types)} entries for {levels} levels "
                f"(block_out_channels={channels})."
            )
        for i, kind in enumerate(types):
            if kind not in known:
                raise _refuse(f"{key}[{i}]", kind, tuple(known), "ResNet blocks with attention")
    size = d["sample_size"]
    if isinstance(size, list | tuple):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse("sample_size", size, "an int or [s, s]", "square images")
        size = size[0]
    if not isinstance(size, int) or size <= 0:
        raise _refuse("sample_size", size, "an int > 0", "images of a fixed size")
    attn = []
    for i in range(levels):
        if _DOWN[down[i]] != _UP[up[levels - 1 - i]]:
            raise DiffusersImportError(
                f"diffusers config down_block_types[{i}]={down[i]!r} and up_block_types"
                f"[{levels - 1 - i}]={up[levels - 1 - i]!r} (the same resolution, "
                f"{size // 2**i}) disagree: our U-Net has attention at a resolution on the way "
                "down and up alike."
            )
        if _DOWN[down[i]]:
            attn.append(size // 2**i)
    head_dim = d["attention_head_dim"]
    attn_channels = {channels[i] for i in range(levels) if _DOWN[down[i]]} | {channels[-1]}
    if head_dim is not None and {head_dim} != attn_channels:
        raise _refuse(
            "attention_head_dim",
            head_dim,
            (None, *sorted(attn_channels)) if len(attn_channels) == 1 else None,
            f"one attention head over all channels ({sorted(attn_channels)} here)",
        )
    groups = d["norm_num_groups"]
    if d["attn_norm_num_groups"] not in (None, groups):
        raise _refuse(
            "attn_norm_num_groups", d["attn_norm_num_groups"], (None, groups), "one group count"
        )
    if any(c % groups for c in channels):
        raise _refuse("norm_num_groups", groups, "a divisor of every channel count", "GroupNorm")
    if d["time_embedding_dim"] not in (None, 4 * ch):
        raise _refuse("time_embedding_dim", d["time_embedding_dim"], (None, 4 * ch), "4 * ch")
    c_in, c_out = int(d["in_channels"]), int(d["out_channels"])
    if c_out not in (c_in, 2 * c_in):
        raise _refuse(
            "out_channels", c_out, (c_in, 2 * c_in), "eps (or eps and a variance) per channel"
        )
    if int(d["layers_per_block"]) < 1:
        raise _refuse("layers_per_block", d["layers_per_block"], ">= 1", "ResNet blocks")
    keys = {
        "model.name": "unet",
        "model.ch": ch,
        "model.ch_mult": tuple(c // ch for c in channels),
        "model.num_res_blocks": int(d["layers_per_block"]),
        "model.attn_resolutions": tuple(attn),
        "model.resamp_with_conv": True,
        "model.norm_groups": int(groups),
        "model.fourier_features": (),
        "model.num_classes": 0,
        "data.image_size": size,
        "data.num_channels": c_in,
        "training.objective": "ddpm",
    }
    if "dropout" in dconfig:  # configs of older diffusers have none: the run's own stays
        keys["model.dropout"] = float(d["dropout"])
    if c_out == 2 * c_in:
        keys["diffusion.var_type"] = "learned_range"
    return keys


def scheduler_keys(sconfig: Mapping[str, Any]) -> dict[str, Any]:
    """Our ``diffusion.*`` (and ``sampling.clip_denoised``) keys for a diffusers DDPMScheduler
    config; missing keys take diffusers' defaults. Raises DiffusersImportError for what our
    diffusion cannot compute (trained betas, the sigmoid schedule, thresholding, ...)."""
    unknown = sorted(
        k
        for k in sconfig
        if not k.startswith("_") and k not in SCHEDULER_DEFAULTS and k not in _SCHEDULER_IGNORED
    )
    if unknown:
        raise DiffusersImportError(
            f"diffusers scheduler key {unknown[0]}={sconfig[unknown[0]]!r} is not known to this "
            "importer; refusing rather than guessing."
        )
    check_types(sconfig, SCHEDULER_TYPES, "scheduler")
    s = {**SCHEDULER_DEFAULTS, **sconfig}
    if s["beta_schedule"] != "squaredcos_cap_v2" and not s["beta_start"] <= s["beta_end"]:
        raise DiffusersImportError(
            f"diffusers scheduler keys beta_start={s['beta_start']!r} > beta_end="
            f"{s['beta_end']!r}: the betas must grow."
        )
    checks = {
        "trained_betas": ((None,), "named beta schedules only"),
        "thresholding": ((False,), "no dynamic thresholding"),
        "clip_sample_range": ((1.0,), "x0 clipped to [-1, 1]"),
        "rescale_betas_zero_snr": ((False,), "the schedule as named"),
        "beta_schedule": (tuple(_BETAS), "these schedules"),
        "variance_type": (tuple(_VARIANCE), "fixed or learned-range variances"),
        "prediction_type": (tuple(_PREDICTION), "eps, x0 or v prediction"),
    }
    for key, (allowed, why) in checks.items():
        if s[key] not in allowed:
            raise _refuse(f"scheduler {key}", s[key], allowed, why)
    keys = {
        "diffusion.num_timesteps": int(s["num_train_timesteps"]),
        "diffusion.beta_schedule": _BETAS[s["beta_schedule"]],
        "diffusion.var_type": _VARIANCE[s["variance_type"]],
        "diffusion.mean_type": _PREDICTION[s["prediction_type"]],
        "sampling.clip_denoised": bool(s["clip_sample"]),
    }
    if s["beta_schedule"] != "squaredcos_cap_v2":
        keys["diffusion.beta_start"] = float(s["beta_start"])
        keys["diffusion.beta_end"] = float(s["beta_end"])
    return keys


def _get(config: Any, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return isinstance(a, list | tuple) and isinstance(b, list | tuple) and list(a) == list(b)
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b)
    return a == b


def differences(config: Any, keys: Mapping[str, Any]) -> list[str]:
    """``"key: config V, file W"`` for each of ``keys`` (from ``unet_keys``/``scheduler_keys``)
    whose value in ``config`` differs."""
    out = []
    for dotted, want in keys.items():
        have = _get(config, dotted)
        if not _same(have, want):
            out.append(f"{dotted}: config {have!r}, diffusers files {want!r}")
    return out


# ----------------------------------------------------------------------------- tensors

# Our module names -> diffusers' (up blocks counted from the lowest resolution there).
_INNER = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb_proj": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
# The names diffusers' conversions of 2022 (the google/ddpm-* files) use for the attention.
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def diffusers_name(path: tuple[str, ...], num_levels: int) -> str:
    """The diffusers tensor name of one of our parameters (``("down_1_block_0", "conv1",
    "kernel")`` -> ``"down_blocks.1.resnets.0.conv1.weight"``)."""
    top, *inner, leaf = path
    fixed = {
        "temb": "time_embedding",
        "conv_in": "conv_in",
        "norm_out": "conv_norm_out",
        "conv_out": "conv_out",
        "mid_block_1": "mid_block.resnets.0",
        "mid_attn_1": "mid_block.attentions.0",
        "mid_block_2": "mid_block.resnets.1",
    }
    if top in fixed:
        prefix = fixed[top]
    else:
        m = re.fullmatch(r"(down|up)_(\d+)_(block|attn|downsample|upsample)(?:_(\d+))?", top)
        if m is None:
            raise DiffusersImportError(f"our parameter {'/'.join(path)} has no diffusers name.")
        way, level, kind, j = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        index = level if way == "down" else num_levels - 1 - level
        part = {
            "block": f"resnets.{j}",
            "attn": f"attentions.{j}",
            "downsample": "downsamplers.0.conv",
            "upsample": "upsamplers.0.conv",
        }[kind]
        prefix = f"{way}_blocks.{index}.{part}"
    names = [{"dense0": "linear_1", "dense1": "linear_2"}.get(n, _INNER.get(n, n)) for n in inner]
    return ".".join([prefix, *names, _LEAF.get(leaf, leaf)])


def _layout(array: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """A PyTorch tensor in our layout: conv [O, I, kh, kw] -> [kh, kw, I, O]; a 1x1 conv onto a
    dense kernel [I, O]; linear [O, I] -> [I, O]; vectors as they are."""
    if array.ndim == 4 and len(target_shape) == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 4 and len(target_shape) == 2 and array.shape[2:] == (1, 1):
        return array[:, :, 0, 0].T
    if array.ndim == 2:
        return array.T
    return array


def _flip_sin_cos(kernel: np.ndarray) -> np.ndarray:
    """linear_1's kernel [D, 4ch] for an embedding [cos, sin] -> rows for ours, [sin, cos]."""
    half = kernel.shape[0] // 2
    return np.concatenate([kernel[half : 2 * half], kernel[:half], kernel[2 * half :]])


def convert(
    tensors: Mapping[str, np.ndarray], dconfig: Mapping[str, Any], abstract_params: Any
) -> Any:
    """diffusers' tensors as our parameter tree (the structure and shapes of
    ``abstract_params``, a pytree of arrays or ShapeDtypeStructs); float32 numpy arrays.

    Every parameter must have its tensor of the right shape and every tensor must be used:
    otherwise DiffusersImportError naming the first tensor missing, left over or of the wrong
    shape, with the shape expected. The attention's names of 2022 (``query``, ``key``,
    ``value``, ``proj_attn``) are read as ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.
    """
    d = {**UNET_DEFAULTS, **dconfig}
    num_levels = len(d["block_out_channels"])
    names = dict(tensors)
    for name in list(names):
        for new, old in _LEGACY.items():
            if f".{old}." in name:
                names[name.replace(f".{old}.", f".{new}.")] = names.pop(name)
    used = set()

    def take(path, leaf):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        name = diffusers_name(keys, num_levels)
        shape = tuple(leaf.shape)
        if name not in names:
            raise DiffusersImportError(
                f"tensor {name} is missing from the diffusers file (our {'/'.join(keys)}, "
                f"expected shape {_torch_shape(shape)})."
            )
        array = _layout(np.asarray(names[name]), shape)
        if keys[:2] == ("temb", "dense0") and keys[-1] == "kernel" and d["flip_sin_to_cos"]:
            array = _flip_sin_cos(array)
        if tuple(array.shape) != shape:
            raise DiffusersImportError(
                f"tensor {name} has shape {tuple(np.shape(names[name]))}, expected "
                f"{_torch_shape(shape)} (our {'/'.join(keys)} {shape})."
            )
        used.add(name)
        return np.ascontiguousarray(array, dtype=np.float32)

    params = jax.tree_util.tree_map_with_path(take, abstract_params)
    left = sorted(set(names) - used)
    if left:
        raise DiffusersImportError(
            f"{len(left)} tensor(s) of the diffusers file fit no parameter of our U-Net, e.g. "
            f"{left[0]} {tuple(np.shape(names[left[0]]))}: not the architecture its config.json "
            "describes."
        )
    return params


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our parameter shape in PyTorch's layout, for messages."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if len(shape) == 2:
        return (shape[1], shape[0])
    return shape
