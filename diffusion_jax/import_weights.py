"""Import trained weights:
``python -m diffusion_jax.import_weights --diffusers PATH --workdir DIR``.

PATH is a diffusers model folder (``config.json`` and ``diffusion_pytorch_model.safetensors``,
optionally ``scheduler_config.json``; or a pipeline folder with ``unet/`` and ``scheduler/``), or
a ``.safetensors`` file (its architecture from the ``config.json`` beside it, else from
``--config``). DIR gets ``config.json`` and a checkpoint of step 0 whose parameters and EMA
parameters are the imported ones, so that ``--mode sample``, ``--mode eval``,
``configs/workdir.py:DIR`` and ``checkpoints.load_params(DIR)`` read it as a trained run, and
``--mode train`` fine-tunes it (with a fresh optimiser state).

Without ``--config`` the run's config is ``configs/cifar10_ddpm.py`` (the paper's recipe)
with the network, image size and diffusion of the files; with ``--config C`` (and
``--config.KEY=VALUE`` overrides) C must describe the same network and diffusion, and every key
that differs is named. Pickled PyTorch files (``.bin``, ``.pt``, ``.ckpt``) are refused: they
can run code when read. Without ``scheduler_config.json`` the config's diffusion is taken and
named in one line; every value read is type-checked (naming the file and key) and every tensor
must be finite. DIR (new or empty) is written whole in ``DIR.tmp-PID`` and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import ml_collections
import numpy as np

from configs import cifar10_ddpm

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")


class ImportError_(ValueError):  # noqa: N801 - not the builtin ImportError
    """What the importer refuses: files not found or not safe to read, a config that differs."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """The files of a diffusers model."""

    weights: str  # .safetensors
    config: str | None  # the UNet2DModel config.json
    scheduler: str | None  # the DDPMScheduler scheduler_config.json


def _pickle_advice(path: str) -> str:
    return (
        f"{path} is a PyTorch pickle, which can run code when read: not loaded. Convert it to "
        'safetensors on a machine you trust (python -c "import torch, safetensors.torch as st; '
        f"st.save_file(torch.load('{os.path.basename(path)}', weights_only=True), "
        "'diffusion_pytorch_model.safetensors')\"), or download the .safetensors file."
    )


def find_sources(path: str) -> Sources:
    """The weights, config and scheduler files of ``path`` (a model or pipeline folder, or a
    .safetensors file); ImportError_ naming what is missing or refused."""
    if not os.path.exists(path):
        raise ImportError_(f"--diffusers {path}: no such file or folder.")
    if os.path.isfile(path):
        if path.endswith(PICKLES):
            raise ImportError_(_pickle_advice(path))
        if not path.endswith(".safetensors"):
            raise ImportError_(
                f"--diffusers {path}: not a .safetensors file or a diffusers model folder."
            )
        folder = os.path.dirname(os.path.abspath(path))
        weights = path
    else:
        folder = path
        if os.path.isdir(os.path.join(path, "unet")):  # a pipeline: model_index.json, unet/, ...
            folder = os.path.join(path, "unet")
        found = [
            os.path.join(folder, n)
            for n in WEIGHTS_NAMES
            if os.path.exists(os.path.join(folder, n))
        ]
        if not found:
            others = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
            pickles = sorted(n for n in os.listdir(folder) if n.endswith(PICKLES))
            if len(others) == 1:
                found = [os.path.join(folder, others[0])]
            elif pickles:
                raise ImportError_(_pickle_advice(os.path.join(folder, pickles[0])))
            else:
                raise ImportError_(
                    f"--diffusers {path}: no {WEIGHTS_NAMES[0]} in {folder} (it holds "
                    f"{sorted(os.listdir(folder))[:10]})."
                )
        weights = found[0]
    config = os.path.join(folder, "config.json")
    scheduler = next(
        (
            p
            for p in (
                os.path.join(folder, "scheduler_config.json"),
                os.path.join(
                    os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json"
                ),
            )
            if os.path.exists(p)
        ),
        None,
    )
    return Sources(weights, config if os.path.exists(config) else None, scheduler)


def read_json(path: str) -> dict:
    """A JSON object from ``path``; ImportError_ naming the file when it is not one."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ImportError_(f"{path} cannot be read as JSON ({type(e).__name__}: {e}).") from e
    if not isinstance(value, dict):
        raise ImportError_(f"{path} holds {type(value).__name__}, not a JSON object.")
    return value


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (the ``safetensors`` package: no code runs)."""
    from diffusion_jax import safe_arrays

    try:
        return safe_arrays.read(path)
    except ValueError as e:
        raise ImportError_(str(e)) from e


def _named(path: str, read: Any, values: dict) -> dict:
    """``read(values)`` (``unet_keys`` / ``scheduler_keys``), its refusal prefixed with the file
    it read."""
    from diffusion_jax.models import diffusers_unet

    try:
        return read(values)
    except diffusers_unet.DiffusersImportError as e:
        raise ImportError_(f"{path}: {e}") from e


def check_finite(tensors: dict[str, np.ndarray], path: str) -> None:
    """ImportError_ naming the tensors of ``path`` that hold NaN or infinite values."""
    bad = {
        name: int(np.size(t) - np.isfinite(t).sum())
        for name, t in tensors.items()
        if np.issubdtype(t.dtype, np.floating) and not np.isfinite(t).all()
    }
    if bad:
        first = next(iter(bad))
        raise ImportError_(
            f"{path}: {len(bad)} tensor(s) hold NaN or infinite values ({first}: {bad[first]} of "
            f"{tensors[first].size}{', ...' if len(bad) > 1 else ''}): a damaged or diverged "
            "file; nothing was imported."
        )


# The DDPM conversions' conventions, for a bare .safetensors file with no config.json beside it.
DDPM_CONVENTIONS = {"flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0}


def build_config(
    sources: Sources, config: ml_collections.ConfigDict | None
) -> tuple[ml_collections.ConfigDict, dict]:
    """(our config, the diffusers UNet config) for ``sources``: ``config`` checked against the
    files (every differing key named), or ``configs/cifar10_ddpm.py`` with the files' keys."""
    from diffusion_jax import config as config_lib
    from diffusion_jax.models import diffusers_unet

    if sources.config is None and config is None:
        raise ImportError_(
            f"{sources.weights} has no config.json beside it: give the architecture with "
            "--config (a config of ours describing the same U-Net)."
        )
    keys: dict[str, Any] = {}
    dconfig: dict = {}
    if sources.config is not None:
        dconfig = read_json(sources.config)
        keys.update(_named(sources.config, diffusers_unet.unet_keys, dconfig))
    else:
        dconfig = dict(DDPM_CONVENTIONS)
    if sources.scheduler is not None:
        scheduler = _named(
            sources.scheduler, diffusers_unet.scheduler_keys, read_json(sources.scheduler)
        )
        if (
            keys.get("diffusion.var_type", scheduler["diffusion.var_type"])
            != scheduler["diffusion.var_type"]
        ):
            raise ImportError_(
                f"{sources.config}: out_channels = 2 x in_channels (a learned variance) but "
                f"{sources.scheduler} has variance_type for "
                f"{scheduler['diffusion.var_type']!r}; they must agree."
            )
        keys.update(scheduler)
    from absl import logging

    given = config
    if config is None:
        config = cifar10_ddpm.get_config()
        for dotted, value in keys.items():
            section, key = dotted.split(".")
            config[section][key] = value
        logging.info(
            "Config: configs/cifar10_ddpm.py (data.dataset=%r) with the files' %s.",
            config.data.dataset,
            ", ".join(f"{k}={v!r}" for k, v in keys.items()),
        )
    else:
        config = config_lib.with_defaults(config)
        diffs = diffusers_unet.differences(config, keys)
        if diffs:
            files = " and ".join(p for p in (sources.config, sources.scheduler) if p)
            raise ImportError_(
                f"--config describes another network or diffusion than {files}; differing keys:"
                "\n  "
                + "\n  ".join(diffs)
                + "\nDrop --config to take the files' values, or set these keys."
            )
    if sources.scheduler is None:
        taken = ("num_timesteps", "beta_schedule", "beta_start", "beta_end", "var_type")
        logging.warning(
            "No scheduler_config.json beside %s (nor in ../scheduler/): took the diffusion of %s: "
            "%s. A model trained with another schedule needs its scheduler_config.json there.",
            sources.weights,
            "configs/cifar10_ddpm.py" if given is None else "--config",
            ", ".join(f"diffusion.{k}={config.diffusion[k]!r}" for k in taken),
        )
    if config.training.objective != "ddpm" or config.model.name != "unet":
        raise ImportError_(
            f"training.objective={config.training.objective!r}, model.name={config.model.name!r}: "
            "diffusers UNet2DModel weights import into the ddpm objective's U-Net only."
        )
    return config, dconfig


def import_diffusers(
    path: str, workdir: str, config: ml_collections.ConfigDict | None = None
) -> ml_collections.ConfigDict:
    """Import the diffusers model at ``path`` into ``workdir`` (config.json and a checkpoint of
    step 0, params = EMA params); returns the run's config. ``workdir`` must hold no run."""
    import jax
    import jax.numpy as jnp
    from absl import logging

    from diffusion_jax import checkpoints, evaluation, files, models, reporting
    from diffusion_jax.models import diffusers_unet

    _check_workdir(workdir)
    sources = find_sources(path)
    config, dconfig = build_config(sources, config)
    conv_impl = config.model.conv_impl
    config = evaluation.prepare(config, check_data=False)
    config.model.conv_impl = conv_impl  # config.json keeps "auto": the platform picks
    tensors = read_safetensors(sources.weights)
    check_finite(tensors, sources.weights)
    model = models.get_model(config)
    shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), jnp.zeros((1,)), train=False)
    )["params"]
    try:
        params = diffusers_unet.convert(tensors, dconfig, abstract)
    except diffusers_unet.DiffusersImportError as e:
        raise ImportError_(f"{sources.weights}: {e}") from e
    params = jax.tree.map(jnp.asarray, params)
    num = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "ema_params": params}
    meta = {
        "step": 0,
        "data_position": 0,
        "imported_from": os.path.abspath(sources.weights),
        "imported_format": "diffusers",
    }
    # The run is written whole into WORKDIR.tmp-PID and renamed into place: a kill or a full
    # disk leaves no half-imported workdir (and the next import removes the leftover).
    with files.atomic_path(os.path.abspath(workdir).rstrip(os.sep)) as tmp:
        os.makedirs(tmp)
        manager = checkpoints.make_manager(tmp, config.training.keep_checkpoints)
        checkpoints.save(manager, 0, state, meta)
        checkpoints.wait(manager, 0)
        manager.close()
        reporting.write_json(os.path.join(tmp, "config.json"), config.to_dict())
    logging.info(
        "Imported %d tensors (%d parameters) from %s into %s: config.json and the checkpoint of "
        "step 0 (params = EMA params). Sample: python -m diffusion_jax.main --config "
        "configs/workdir.py:%s --workdir %s --mode sample",
        len(tensors),
        num,
        sources.weights,
        workdir,
        workdir,
        workdir,
    )
    return config


def _check_workdir(workdir: str) -> None:
    """ImportError_ for a ``--workdir`` that is a file, holds files already (a run or not), or
    is in a folder that cannot be written: checked before anything is read or written."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ImportError_(f"--workdir {workdir} is a file, not a folder: name a new folder.")
    if os.path.isdir(workdir) and os.listdir(workdir):
        held = sorted(os.listdir(workdir))
        what = "a run" if {"config.json", "checkpoints"} & set(held) else f"files ({held[:5]})"
        raise ImportError_(
            f"--workdir {workdir} already holds {what}: import into a new folder; nothing was "
            "changed."
        )
    folder = os.path.abspath(workdir).rstrip(os.sep)
    if not os.path.isdir(folder):
        folder = os.path.dirname(folder)
        while not os.path.exists(folder):
            folder = os.path.dirname(folder)
    for where in {folder, os.path.dirname(os.path.abspath(workdir).rstrip(os.sep))}:
        if os.path.exists(where) and not os.access(where, os.W_OK):
            raise ImportError_(
                f"--workdir {workdir}: {where} cannot be written (read-only, or not yours); "
                "import into a folder you can write."
            )


def run() -> None:
    """The command line (flags are defined here, not on import, beside ``main``'s)."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    from diffusion_jax import checkpoints, cli, files

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Optional: a config of ours that the files must match.", lock_config=False
    )
    path = flags.DEFINE_string("diffusers", None, "A diffusers model folder or .safetensors.")
    workdir = flags.DEFINE_string("workdir", None, "The new run's folder.")
    flags.mark_flags_as_required(["diffusers", "workdir"])

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
        logging.set_verbosity(logging.INFO)
        logging.get_absl_handler().addFilter(cli.ReadableLog())
        try:
            import_diffusers(path.value, workdir.value, config_flag.value)
        except (ValueError, files.WriteError, checkpoints.CheckpointError) as e:
            # ImportError_, DiffusersImportError, the config's checks; a failed write
            print(f"error: {e}", file=sys.stderr)  # once: the log is this terminal
            sys.exit(1)

    app.run(main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    run()
