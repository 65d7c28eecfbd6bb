"""Checkpoints with orbax: the train state plus a small JSON record, in ``WORKDIR/checkpoints``.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed in the
middle of a save leaves no folder that ``latest_step`` would take for a finished checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from diffusion_jax import sharding


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(
    workdir: str, max_to_keep: int | None = 3, enable_async: bool = True
) -> ocp.CheckpointManager:
    """A manager over ``WORKDIR/checkpoints`` keeping the newest ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=enable_async
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict) -> None:
    """Start saving ``state`` (a pytree) and ``meta`` (JSON) at ``step``; async where enabled."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=True)


def restore(
    manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None
) -> tuple[Any, dict] | None:
    """(state, meta) of ``step`` (default: the newest complete one), or None without any.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) that fixes the
    structure, dtypes and placement of the restored arrays.
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
    )
    restored = manager.restore(step, args=args)
    return restored.state, restored.meta


def load_params(workdir: str, step: int | None = None, ema: bool = True) -> Any:
    """The parameters of a run: EMA (default) or raw, of ``step`` or the newest checkpoint.

    What a notebook needs to sample from a trained model::

        params = checkpoints.load_params("runs/digits")
        model.apply({"params": params}, x_t, t, train=False)
    """
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(workdir)}.")
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"No checkpoint of step {step} in {checkpoint_dir(workdir)}; "
            f"there are {sorted(manager.all_steps())}."
        )
    # Restore onto this run's devices, replicated, whatever the devices of the run that saved it
    # (a checkpoint of 8 GPUs loads in a 1-CPU notebook). On several processes, all must call this.
    replicated = sharding.replicated(sharding.make_mesh())
    metadata = manager.item_metadata(step)["state"]
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        getattr(metadata, "tree", metadata),
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    params = restored.state["ema_params" if ema else "params"]
    return jax.tree.map(jax.numpy.asarray, params)
