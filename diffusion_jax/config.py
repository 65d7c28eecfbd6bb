"""The checked config of a run: defaults for keys an older config lacks, validation whose allowed
values come from the registries, and the comparison with a run's saved ``config.json``.

Every check here runs before anything is compiled or written, so a bad config costs a second
and leaves the workdir untouched. The evaluators' own keys are checked by
``evaluation.check_config`` (the evaluation package sits above this module).
"""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from configs import default as default_config
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline, models, objectives, optim, sampling, schedules, sharding

# Keys that may change between a run and its resumption (how long, how often, what to report).
RESUMABLE_KEYS = (
    "cpu_conv_library",
    "training.num_train_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.sample_every",
    "training.keep_checkpoints",
    "training.eval_at_end",
    "data.data_dir",
    "eval.",
    "sampling.",
)


def defaults() -> ml_collections.ConfigDict:
    """``configs/default.py``: the one place where every key and its default is written."""
    return default_config.get_config()


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of ``config`` with every key of ``defaults()`` it lacks (a config written before
    the key existed), at its default value; keys it has are kept as they are."""
    out = copy.deepcopy(config)

    def fill(target: ml_collections.ConfigDict, source: ml_collections.ConfigDict) -> None:
        for key, value in source.items():
            if key not in target:
                with target.unlocked():
                    target[key] = copy.deepcopy(value)
            elif isinstance(value, ml_collections.ConfigDict) and isinstance(
                target[key], ml_collections.ConfigDict
            ):
                fill(target[key], value)

    fill(out, defaults())
    return out


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not one of {allowed}.")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the key, the bad value and the allowed ones; compiles nothing."""
    c = config
    objective = objectives.get_objective(c)
    _choice("diffusion.beta_schedule", c.diffusion.beta_schedule, schedules.SCHEDULES)
    _choice("diffusion.mean_type", c.diffusion.mean_type, diffusion_lib.MEAN_TYPES)
    _choice("diffusion.var_type", c.diffusion.var_type, diffusion_lib.VAR_TYPES)
    _choice("diffusion.loss_type", c.diffusion.loss_type, diffusion_lib.LOSS_TYPES)
    _choice("optim.optimizer", c.optim.optimizer, tuple(optim.OPTIMIZERS))
    input_pipeline.validate_dataset(c)
    models.check_config(c)
    sharding.check_batch_size(c.training.batch_size)
    sharding.check_batch_size(c.eval.batch_size, "eval.batch_size")
    objective.check_config(c)
    sampling.check_config(c)


def config_differences(old: dict, new: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between a saved config (dict) and ``new``, ignoring
    RESUMABLE_KEYS. A key missing from ``old`` (a run of an earlier version) counts as equal
    when ``new`` holds its default."""
    new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
    return _differences(old, new, defaults().to_dict(), prefix)


def _differences(old: dict, new: dict, default: dict, prefix: str) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        if any(dotted == r or (r.endswith(".") and dotted.startswith(r)) for r in RESUMABLE_KEYS):
            continue
        b = new.get(key)
        a = old.get(key, default.get(key) if isinstance(default, dict) else None)
        sub_default = default.get(key, {}) if isinstance(default, dict) else {}
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(
                a, b, sub_default if isinstance(sub_default, dict) else {}, dotted + "."
            )
        elif _normalise(a) != _normalise(b):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _normalise(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v
