"""Checkpoints with orbax: the train state plus a small JSON record, in ``WORKDIR/checkpoints``.

Orbax writes each step to a temporary folder and renames it when complete, so a run killed in the
middle of a save leaves no folder that ``latest_step`` would take for a finished checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging as std_logging
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from diffusion_jax import sharding


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, or none of a run's checkpoints restored."""


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def check_directory(workdir: str) -> list[str]:
    """The damaged checkpoints moved aside in ``WORKDIR/checkpoints`` (``corrupt-*`` folders,
    sorted); CheckpointError naming an entry with a step's name that is not a folder (a file
    ``checkpoints/8`` that a save of step 8 would silently replace)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    names = sorted(os.listdir(directory))
    for name in names:
        path = os.path.join(directory, name)
        if name.isdigit() and not os.path.isdir(path):
            raise CheckpointError(
                f"{path} is not a checkpoint folder (a {'link' if os.path.islink(path) else 'file'}"
                f" named like step {int(name)}), and a save of that step would replace it: move "
                "it out of the checkpoints folder."
            )
    return [n for n in names if n.startswith("corrupt-")]


def make_manager(
    workdir: str, max_to_keep: int | None = 3, enable_async: bool = True
) -> ocp.CheckpointManager:
    """A manager over ``WORKDIR/checkpoints`` keeping the newest ``max_to_keep`` steps."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=enable_async
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_handlers=_handlers()
    )


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    """The items of a checkpoint: registered up front so that a step's metadata can be read
    before anything is restored."""
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,
    meta: dict,
    previous: int | None = None,
) -> None:
    """Start saving ``state`` (a pytree) and ``meta`` (JSON) at ``step``; async where enabled.

    A save that fails (disk full, permissions), here or in the background (raised by
    ``check_saves`` or ``wait``), is a CheckpointError naming the step, the folder and the
    cause; its temporary folder is removed, so the previous checkpoint stays the newest. A
    folder where nothing can be created (read-only, no permission) fails here at once, before
    orbax's background threads wait minutes for a step folder that never comes. ``previous``:
    the step of the save that may still be in flight, named if that one failed."""
    wait(manager, previous)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    try:
        if jax.process_index() == 0:
            _check_writable(os.fspath(manager.directory))
        manager.save(step, args=args, force=True)
    except Exception as e:
        raise _save_failed(manager, step, e) from e


def _check_writable(directory: str) -> None:
    """Create (and remove) a folder in ``directory``: OSError when nothing can be written."""
    os.makedirs(directory, exist_ok=True)
    os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=directory))


def check_saves(manager: ocp.CheckpointManager, step: int | None) -> None:
    """Raise CheckpointError now if the background save (of ``step``) has failed, so that the
    run stops at the failed save rather than at the next one."""
    try:
        manager.check_for_errors()
    except Exception as e:
        raise _save_failed(manager, step, e) from e


def wait(manager: ocp.CheckpointManager, step: int | None = None) -> None:
    """Wait for the save in flight; its failure as CheckpointError (see ``save``)."""
    try:
        manager.wait_until_finished()
    except Exception as e:
        raise _save_failed(manager, step, e) from e


def _save_failed(manager: ocp.CheckpointManager, step: int | None, e: Exception) -> Exception:
    # An earlier save may still be in flight: let it finish before removing what is left over.
    with contextlib.suppress(Exception):
        manager.wait_until_finished()
    directory = os.fspath(manager.directory)
    for name in os.listdir(directory) if os.path.isdir(directory) else ():
        if ".orbax-checkpoint-tmp" in name and jax.process_index() == 0:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    manager.reload()
    newest = manager.latest_step()
    what = "a checkpoint" if step is None else f"the checkpoint of step {step}"
    return CheckpointError(
        f"Saving {what} to {directory} failed ({type(e).__name__}: "
        f"{' '.join(str(e).split())[:200]}); the run stopped there. The newest checkpoint is "
        f"{'none' if newest is None else f'step {newest}'}; free space or fix permissions, then "
        "run the same command to resume."
    )


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: Any,
    step: int | None = None,
    fill: Callable[[], Any] | None = None,
) -> tuple[Any, dict] | None:
    """(state, meta) of ``step``, or by default of the newest checkpoint that restores; None when
    the run has none.

    ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` (with shardings) that fixes the
    structure, dtypes and placement of the restored arrays. When it is a dataclass with fields
    that the checkpoint lacks (one written by an earlier version), those fields are taken from
    ``fill()`` (a fresh state); without ``fill`` that is an error.

    Without ``step``, a checkpoint that fails to restore (missing or corrupt data, bad metadata,
    an empty step folder) is named in one warning with the reason, moved aside to
    ``checkpoints/corrupt-<step>`` (never deleted) and the next older one is tried; when every
    one fails, CheckpointError.
    """
    if step is not None:
        return _restore_step(manager, abstract_state, step, fill)
    steps = sorted(manager.all_steps(), reverse=True)
    for s in steps:
        try:
            return _restore_step(manager, abstract_state, s, fill)
        except Exception as e:  # orbax, tensorstore, JSON and key errors alike
            _quiet_abandoned_reads(os.path.join(os.fspath(manager.directory), str(s)))
            moved = move_aside(manager, s)
            logging.warning(
                "Checkpoint %d cannot be restored (%s); moved to %s, trying the one before.",
                s,
                _reason(e),
                moved,
            )
    if steps:
        raise CheckpointError(
            f"None of the checkpoints {steps} in {manager.directory} could be restored; they "
            "were moved to corrupt-<step> folders there. Start afresh in another --workdir, or "
            "repair them."
        )
    return None


class _AbandonedReads(std_logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" records (each with a traceback) of
    the parallel reads of a checkpoint whose restore failed and that was already named in one
    warning: ``prefix`` is its folder, which the records' messages name."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and self.prefix in message)


def _quiet_abandoned_reads(step_dir: str) -> None:
    """Keep the left-over read errors of the failed restore of ``step_dir`` out of the log."""
    std_logging.getLogger("asyncio").addFilter(_AbandonedReads(step_dir + os.sep))


def _reason(e: BaseException) -> str:
    """An exception as one short line: its type and message."""
    return " ".join(f"{type(e).__name__}: {e}".split())[:300]


def move_aside(manager: ocp.CheckpointManager, step: int, reason: str = "corrupt") -> str:
    """Rename the folder of ``step`` to ``<reason>-<step>`` (``-2``, ``-3``, ... if taken) on
    process 0, and make the manager forget it; never deletes. Returns the new path."""
    directory = os.fspath(manager.directory)
    dest = os.path.join(directory, f"{reason}-{step}")
    n = 1
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(directory, f"{reason}-{step}-{n}")
    if jax.process_index() == 0:
        os.rename(os.path.join(directory, str(step)), dest)
    manager.reload()
    return dest


def _restore_step(
    manager: ocp.CheckpointManager, abstract_state: Any, step: int, fill: Callable[[], Any] | None
) -> tuple[Any, dict]:
    target, missing = abstract_state, []
    if dataclasses.is_dataclass(abstract_state) and fill is not None:
        on_disk = manager.item_metadata(step)["state"]
        on_disk = getattr(on_disk, "tree", on_disk)
        names = [f.name for f in dataclasses.fields(abstract_state)]
        missing = [n for n in names if n not in on_disk]
        if missing:
            target = {n: getattr(abstract_state, n) for n in names if n not in missing}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    state = restored.state
    if missing:
        fresh = fill()
        state = dataclasses.replace(fresh, **state)
        logging.info("Checkpoint %d has no %s: filled from a fresh state.", step, missing)
    return state, restored.meta


def load_params(workdir: str, step: int | None = None, ema: bool = True) -> Any:
    """The parameters of a run: EMA (default) or raw, of ``step`` or the newest checkpoint that
    restores (a damaged one is named in a warning and skipped; nothing is moved).

    What a notebook needs to sample from a trained model::

        params = checkpoints.load_params("runs/digits")
        model.apply({"params": params}, x_t, t, train=False)
    """
    return load_state_item(workdir, "ema_params" if ema else "params", step)


def load_state_item(workdir: str, name: str, step: int | None = None) -> Any:
    """One field of the train state (``params``, ``ema_params``, ``loss_history``, ...) of
    ``step`` or of the newest checkpoint that restores; KeyError naming the fields when the
    checkpoint has no ``name``."""
    return load_state_item_and_step(workdir, name, step)[0]


def load_state_item_and_step(
    workdir: str, name: str, step: int | None = None, rounds: int = 3
) -> tuple[Any, int]:
    """(``load_state_item``'s value, the step it was read from). Without ``step``: when every
    checkpoint listed fails while a train deletes old ones under the reader (keep_checkpoints),
    the folder is listed again and the newest tried again, up to ``rounds`` times."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    directory = checkpoint_dir(workdir)
    manager = ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"No checkpoint in {directory}.")
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} in {directory}; there are {sorted(steps)}."
            )
        return _load_item(manager, step, name), step
    tried: set[int] = set()
    for _ in range(rounds):
        for s in steps:
            if s in tried:
                continue
            tried.add(s)
            try:
                return _load_item(manager, s, name), s
            except KeyError:
                raise
            except Exception as e:  # orbax, tensorstore, JSON errors alike
                if not os.path.isdir(os.path.join(directory, str(s))):
                    logging.info("Checkpoint %d was deleted while being read; trying another.", s)
                    continue
                logging.warning(
                    "Checkpoint %d cannot be restored (%s); trying the one before.", s, _reason(e)
                )
        manager.reload()
        steps = sorted(set(manager.all_steps()) - tried, reverse=True)
        if not steps:
            break
    raise CheckpointError(
        f"None of the checkpoints {sorted(tried, reverse=True)} in {directory} could be restored."
    )


def _load_item(manager: ocp.CheckpointManager, step: int, name: str) -> Any:
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
    if restored.state.get(name) is None:
        have = sorted(k for k, v in restored.state.items() if v is not None)
        raise KeyError(f"Checkpoint {step} has no {name!r}; it holds {have}.")
    return jax.tree.map(jax.numpy.asarray, restored.state[name])


# ----------------------------------------------------------------------------------------------
# Distilled students: WORKDIR/students/<N>, one per finished round, named by its grid's steps


def students_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "students")


def _students_manager(workdir: str, read_only: bool) -> ocp.CheckpointManager:
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    else:
        options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    return ocp.CheckpointManager(students_dir(workdir), options=options, item_handlers=_handlers())


def save_student(workdir: str, num_steps: int, params: Any, meta: dict) -> None:
    """Save the student of ``num_steps`` steps (its parameters as ``ema_params``, what sample
    and eval read, and ``meta``: its grid and round) and wait until it is on disk. One saved
    before under that number (a round run again after a kill) is replaced."""
    manager = _students_manager(workdir, read_only=False)
    if num_steps in manager.all_steps():
        manager.delete(num_steps)
    save(manager, num_steps, {"ema_params": params}, meta)
    wait(manager, num_steps)


def student_steps(workdir: str) -> list[int]:
    """The steps of the students saved in ``workdir``, sorted; [] when none."""
    if not os.path.isdir(students_dir(workdir)):
        return []
    return sorted(_students_manager(workdir, read_only=True).all_steps())


def load_student(workdir: str, num_steps: int) -> tuple[Any, dict]:
    """(parameters, meta) of the student of ``num_steps`` steps, replicated on this run's
    devices; FileNotFoundError naming the students there are."""
    found = os.path.isdir(students_dir(workdir))
    manager = _students_manager(workdir, read_only=True) if found else None
    have = sorted(manager.all_steps()) if manager else []  # one manager lists and reads
    if num_steps not in have:
        raise FileNotFoundError(
            f"No student of {num_steps} steps in {students_dir(workdir)}: "
            + (
                f"it holds students of {have} steps (--config.sampling.num_steps=N)."
                if have
                else "no round has finished yet (run the distillation: --mode train)."
            )
        )
    meta = manager.restore(num_steps, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return _load_item(manager, num_steps, "ema_params"), meta
