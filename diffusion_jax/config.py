"""The checked config of a run: defaults for keys an older config lacks, validation whose allowed
values come from the registries, and the comparison with a run's saved ``config.json``.

Every check here runs before anything is compiled or written, so a bad config costs a second
and leaves the workdir untouched. The evaluators' own keys are checked by
``evaluation.check_config`` (the evaluation package sits above this module).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

from configs import base as base_config
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline, models, objectives, optim, sampling, schedules, sharding

# Keys that may change between a run and its resumption (how long, how often, what to report).
RESUMABLE_KEYS = (
    # How convolutions are computed, not what: formulations agree to float32 rounding (a run of
    # an earlier version, recorded "xla", resumes with today's "auto").
    "model.conv_impl",
    "training.num_train_steps",
    "training.log_every",
    "training.checkpoint_every",
    "training.sample_every",
    "training.keep_checkpoints",
    "training.eval_at_end",
    "data.data_dir",
    "data.idx_dir",  # where the IDX files lie, not what they hold (checked when read)
    "data.num_workers",
    "data.prefetch_batches",
    "eval.",
    "sampling.",
)

# Keys that may also differ when a run is only evaluated or sampled (``--mode eval`` / ``sample``):
# they shape neither the network nor the data it models (a distillation's keys: how its students
# were trained, and where their teacher lies).
EVAL_FREE_KEYS = ("optim.", "seed", "training.batch_size", "distill.")


def defaults() -> ml_collections.ConfigDict:
    """``configs/base.py``: the one place where every key and its default is written."""
    return base_config.get_config()


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


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    """Raise ValueError naming the key, the bad value and the allowed ones; compiles nothing.
    ``check_data=False`` skips the data set's check (the benchmark feeds random images)."""
    c = config
    objective = objectives.get_objective(c)
    _choice("diffusion.beta_schedule", c.diffusion.beta_schedule, schedules.SCHEDULES)
    _choice("diffusion.mean_type", c.diffusion.mean_type, diffusion_lib.MEAN_TYPES)
    _choice("diffusion.var_type", c.diffusion.var_type, diffusion_lib.VAR_TYPES)
    _choice("diffusion.loss_type", c.diffusion.loss_type, diffusion_lib.LOSS_TYPES)
    optim.check_config(c)
    if check_data:
        input_pipeline.validate_dataset(c)
    models.check_config(c)
    sharding.check_batch_size(c.training.batch_size)
    sharding.check_batch_size(c.eval.batch_size, "eval.batch_size")
    _check_classes(c, check_data)
    _check_training(c)
    objective.check_config(c)
    sampling.check_config(c)


def _check_training(config: ml_collections.ConfigDict) -> None:
    """How often the loop logs and saves, and how many checkpoints it keeps: a run that keeps
    none would lose its model, one that logs or saves every 0 steps cannot count."""
    t = config.training
    for key, low in (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1)):
        value = t[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"config.training.{key}={value!r} must be an integer >= {low}"
                + (
                    " (a run keeping no checkpoint would lose its model)."
                    if key == "keep_checkpoints"
                    else "."
                )
            )


def _check_classes(config: ml_collections.ConfigDict, check_data: bool) -> None:
    """model.num_classes and training.label_dropout; a conditional model of a data set without
    labels is refused here, before anything compiles (``check_data``)."""
    k, rate = config.model.num_classes, config.training.label_dropout
    if not isinstance(k, int) or k < 0:
        raise ValueError(
            f"config.model.num_classes={k!r} must be an integer >= 0 (0: unconditional)."
        )
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"config.training.label_dropout={rate} must be in [0, 1).")
    if rate and not k:
        raise ValueError(
            f"config.training.label_dropout={rate} needs a class-conditional model "
            "(model.num_classes > 0)."
        )
    if k and check_data:
        reason = input_pipeline.unlabelled_reason(config)
        if reason is not None:
            raise input_pipeline.DatasetError(
                f"config.model.num_classes={k} needs labelled data, but {reason}; use "
                "model.num_classes=0 or a data set with labels."
            )


def config_differences(
    old: dict, new: ml_collections.ConfigDict, prefix: str = "", ignore: tuple[str, ...] = ()
) -> list[str]:
    """Dotted keys whose values differ between a saved config (dict) and ``new``, ignoring
    RESUMABLE_KEYS and ``ignore`` (keys, or sections as ``"name."``). A key missing from ``old``
    (a run of an earlier version) counts as equal when ``new`` holds its default."""
    new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
    return _differences(old, new, defaults().to_dict(), prefix, RESUMABLE_KEYS + tuple(ignore))


CHANGEABLE_ON_RESUME = ("optim.",)  # what --allow_config_change may name (keys or sections)


def check_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    mode: str = "train",
    allow: tuple[str, ...] = (),
) -> None:
    """Refuse a workdir holding a run of a different config (nothing is overwritten): one line
    per differing key. ``mode`` ``"eval"``/``"sample"`` also lets EVAL_FREE_KEYS differ;
    ``allow`` (keys of CHANGEABLE_ON_RESUME, e.g. ``optim.learning_rate`` after a NaN stop) lets
    those differ too. A workdir without ``config.json`` (new, or a run of a version that wrote
    none) is accepted."""
    for key in allow:
        if not key.startswith(CHANGEABLE_ON_RESUME):
            raise ValueError(
                f"--allow_config_change={key!r}: only the optimiser's keys may change on resume "
                f"({', '.join(k + '*' for k in CHANGEABLE_ON_RESUME)})."
            )
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    old = base_config.read_run_config(path)  # an earlier version's names, moved
    ignore = (() if mode == "train" else EVAL_FREE_KEYS) + tuple(allow)
    diffs = config_differences(old, config, ignore=ignore)
    if diffs:
        advice = (
            f"Use another --workdir, or the run's own config (--config configs/workdir.py:"
            f"{workdir}) to resume it."
            if mode == "train"
            else f"Use the run's own config for --mode {mode}: --config configs/workdir.py:"
            f"{workdir}"
        )
        raise ValueError(
            f"{workdir} holds a run of a different config ({path}); differing keys:\n  "
            + "\n  ".join(diffs)
            + "\n"
            + advice
        )


def _differences(
    old: dict, new: dict, default: dict, prefix: str, ignore: tuple[str, ...]
) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        dotted = prefix + key
        if any(dotted == r or (r.endswith(".") and dotted.startswith(r)) for r in ignore):
            continue
        b = new.get(key)
        a = old.get(key, default.get(key) if isinstance(default, dict) else None)
        sub_default = default.get(key, {}) if isinstance(default, dict) else {}
        if isinstance(a, dict) and isinstance(b, dict):
            sub_default = sub_default if isinstance(sub_default, dict) else {}
            out += _differences(a, b, sub_default, dotted + ".", ignore)
        elif _normalise(a) != _normalise(b):
            out.append(f"{dotted}: {a!r} -> {b!r}")
    return out


def _normalise(v: Any) -> Any:
    return list(v) if isinstance(v, tuple | list) else v
