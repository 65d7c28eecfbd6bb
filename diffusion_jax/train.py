"""Training: a pure ``train_step`` threading a ``TrainState`` through ``jax.jit`` on a data mesh.

The run is a function of (config, seed): the batch of step ``s`` comes from
``input_pipeline.train_batch(config, source, s)`` and the step's randomness from
``fold_in(key(seed), s)``, so a run resumed from a checkpoint ends bit-identical to one that was
never interrupted.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import (
    checkpoints,
    evaluation,
    input_pipeline,
    interrupts,
    models,
    objectives,
    optim,
    reporting,
    sampling,
    sharding,
    timesteps,
    workdir_lock,
)
from diffusion_jax import config as config_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    ema_params: Any
    opt_state: Any
    # [T, 10] the last losses of each t for diffusion.t_sampler="loss_aware", else None. A
    # checkpoint written before this field existed restores with it filled (checkpoints.restore).
    loss_history: Any = None


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stopped without saving that state."""


def init_state(
    config: ml_collections.ConfigDict, model, optimizer: optax.GradientTransformation
) -> Callable[[jax.Array], TrainState]:
    """``init(key) -> TrainState`` with the EMA warm-started at the initial parameters."""
    shape = (1, *input_pipeline.example_shape(config))

    def init(key: jax.Array) -> TrainState:
        x = jnp.zeros(shape, jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        params = model.init({"params": key, "dropout": key}, x, t, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ema_params=params,
            opt_state=optimizer.init(params),
            loss_history=(
                timesteps.init_loss_history(config.diffusion.num_timesteps)
                if objectives.loss_aware(config)
                else None
            ),
        )

    return init


def make_loss_fn(config: ml_collections.ConfigDict, model) -> Callable:
    """``loss_fn(params, x0, key, labels=None, t=None, weights=None) -> (loss, (metrics,
    losses))`` of ``training.objective``: the mean of the per-example losses [B] (times
    ``weights`` when t was importance-sampled), the batch means of every per-example term, and
    the losses themselves. ``labels`` [B]: the batch's classes (a conditional model)."""
    per_example = objectives.get_objective(config).make_loss_fn(config, model)
    inside = objectives.loss_aware_vb(config)  # the weights go to the vb term, in the loss

    def loss_fn(params, x0, key, labels=None, t=None, weights=None):
        kw = {} if t is None else {"t": t, "weights": weights}
        terms = per_example(params, x0, key, labels=labels, **kw)
        losses = terms["loss"]  # [B]
        metrics = {k: jnp.mean(v) for k, v in terms.items()}
        loss = metrics["loss"] if weights is None or inside else jnp.mean(weights * losses)
        return loss, (metrics, terms.get("vb_loss", losses))

    return loss_fn


def make_train_step(
    config: ml_collections.ConfigDict, model, optimizer: optax.GradientTransformation, schedule
) -> Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]:
    """The pure update: loss, gradient, optax update, EMA; randomness from fold_in(key, step).
    The batch is ``input_pipeline.train_batch``'s: ``image`` [B, ...] and, for a conditional
    model, ``label`` [B].

    With ``diffusion.t_sampler="loss_aware"`` t is drawn from the state's loss history
    (``timesteps.sample_t_importance``, its own key split off the step's), the loss reweighted
    to stay unbiased, and the history updated with the step's per-example losses."""
    loss_fn = make_loss_fn(config, model)
    o = config.optim

    def train_step(state: TrainState, batch: dict, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        x0 = input_pipeline.to_model_space(batch["image"], config.data.num_bins)  # [B, ...]
        labels = batch.get("label")  # [B] int32, or None
        t = weights = None
        if state.loss_history is not None:
            key, t_key = jax.random.split(key)
            t, weights = timesteps.sample_t_importance(
                t_key, state.loss_history, x0.shape[0]
            )  # [B], [B]
        grads, (metrics, losses) = jax.grad(loss_fn, has_aux=True)(
            state.params, x0, key, labels, t, weights
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = optim.ema_decay_at(state.step, o.ema_decay, o.ema_warmup_power)
        ema_params = optim.ema_update(state.ema_params, params, decay)
        metrics |= {
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),  # finite iff the new parameters are
            "lr": schedule(state.step),
        }
        history = state.loss_history
        if history is not None:
            history = timesteps.update_loss_history(history, t, losses)
        new_state = TrainState(state.step + 1, params, ema_params, opt_state, history)
        return new_state, metrics

    return train_step


@dataclasses.dataclass(frozen=True)
class Program:
    """A run's compiled pieces over a mesh: what the loop and the benchmark both use."""

    model: Any
    init: Callable[[jax.Array], TrainState]  # jitted; the state replicated over the mesh
    step: Callable[[TrainState, dict, jax.Array], tuple[TrainState, dict]]  # jitted, donated
    abstract_state: TrainState  # ShapeDtypeStructs with their shardings (for restoring)
    mesh: jax.sharding.Mesh


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Program:
    """The train step jitted on ``mesh``: state replicated and donated, batch split over the
    data axis; and the state's initialiser with the same shardings. ``config`` is checked."""
    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    model = models.get_model(config)
    optimizer, schedule = optim.make_optimizer(config)
    init = init_state(config, model, optimizer)
    abstract = jax.eval_shape(init, objectives.run_keys(config.seed)["init"])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), abstract
    )
    step = jax.jit(
        make_train_step(config, model, optimizer, schedule),
        in_shardings=(repl, data, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )
    return Program(model, jax.jit(init, out_shardings=repl), step, abstract, mesh)


# ----------------------------------------------------------------------------- the run


def _label(e: BaseException) -> str:
    """What stopped the run: the signal's name (``SIGTERM``), or ``Ctrl-C`` for a
    KeyboardInterrupt (whose str() is empty, though the exception itself is truthy)."""
    return str(e) or "Ctrl-C"


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: tuple[str, ...] = (),
    signals: interrupts.SignalRecorder | None = None,
    fresh_start: bool = False,
) -> TrainState:
    """Train (resuming from the newest checkpoint), then sample and evaluate as configured; the
    workdir locked against a second train process for the whole run. ``allow_config_change``:
    optimiser keys that may differ from the run's config.json (``config.check_workdir``).
    Ctrl-C and SIGTERM until the end of training are recorded and acted on between steps
    (``interrupts``); ``signals`` passes a recorder installed earlier. ``fresh_start``: start at
    step 0 in a workdir whose checkpoints are all damaged (``corrupt-*``), else refused."""
    config = evaluation.prepare(config)
    config_lib.check_workdir(config, workdir, allow=allow_config_change)
    process0 = jax.process_index() == 0
    # Several processes: SIGTERM is JAX's preemption service's (see the loop).
    signums = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGINT, signal.SIGTERM)
    with workdir_lock.hold(workdir, enabled=process0):
        # ``signals``: the entry point's, recording since before JAX was imported.
        signals = interrupts.SignalRecorder(signums) if signals is None else signals
        try:
            return _train_and_evaluate(config, workdir, process0, signals, fresh_start)
        finally:
            signals.restore()


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    process0: bool,
    signals: interrupts.SignalRecorder,
    fresh_start: bool = False,
) -> TrainState:
    mesh = sharding.make_mesh()
    program = build(config, mesh)
    keys = objectives.run_keys(config.seed)
    train_key = keys["train"]

    source = input_pipeline.load_split(config, config.data.train_split)
    damaged = checkpoints.check_directory(workdir)
    manager = checkpoints.make_manager(workdir, config.training.keep_checkpoints)
    # A checkpoint of an earlier version lacks the newer fields: filled from a fresh state.
    restored = checkpoints.restore(
        manager, program.abstract_state, fill=lambda: program.init(keys["init"])
    )
    if restored is None:
        if damaged and not fresh_start:
            raise checkpoints.CheckpointError(
                f"{checkpoints.checkpoint_dir(workdir)} holds only damaged checkpoints "
                f"({', '.join(damaged)}), none that restores: a new run beside them would look "
                "like their resumption. Move them away, use another --workdir, or pass "
                "--fresh_start to start at step 0 here."
            )
        state = program.init(keys["init"])
        logging.info("Starting a new run in %s.", workdir)
    else:
        state, meta = restored
        _check_data_position(config, int(state.step), meta)
        if meta.get("imported_from") and int(state.step) == 0:
            logging.info(
                "Fine-tuning the parameters imported from %s (%s), with a fresh optimiser state.",
                meta["imported_from"],
                meta.get("imported_format", "?"),
            )
        else:
            logging.info("Resuming from the checkpoint of step %d in %s.", int(state.step), workdir)
    if process0:
        os.makedirs(workdir, exist_ok=True)
        reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())
    num_params = sum(x.size for x in jax.tree.leaves(program.abstract_state.params))
    logging.info(
        "Model %s: %d parameters; %d device(s) in %d process(es); global batch %d.",
        config.model.name,
        num_params,
        jax.device_count(),
        jax.process_count(),
        config.training.batch_size,
    )
    step_fn = program.step
    sampler = sampling.make_sample_fn(config, program.model, mesh)
    writer = reporting.MetricWriter(workdir)
    start = int(state.step)
    total = config.training.num_train_steps
    host_batches = input_pipeline.train_batches(
        config, source, start, jax.process_index(), jax.process_count()
    )
    batches = sharding.prefetch(mesh, host_batches)  # the next batch on its way to the devices

    # Several processes: SIGTERM (Slurm's --signal, a preemption notice) reaches each one at a
    # different step of its loop. JAX's preemption service, started by jax.distributed, takes the
    # signal over and names one step at which all of them stop and save together.
    multi = jax.process_count() > 1
    last_saved = start if restored is not None else None

    def save(step):
        nonlocal last_saved
        if step == last_saved:  # an interrupt right after the periodic save of this step
            return
        meta = {"step": step, "data_position": step * config.training.batch_size}
        # Signals are recorded (``signals``) until the loop looks: a save is never cut in two.
        checkpoints.save(manager, step, state, meta, previous=last_saved)
        last_saved = step

    def resumed() -> int | None:
        """The step this run resumed from while it has saved nothing newer, else None."""
        return start if restored is not None and last_saved == start else None

    pending = []  # per-step metrics (device arrays) since the last check
    data_wait = 0.0  # seconds the loop waited for batches since the last log
    window_start = time.perf_counter()
    progress = reporting.progress_bar(total, "train", initial=start)
    step = start
    try:
        while step < total:
            signals.check()  # the first time: one from start-up (nothing trained, nothing saved)
            waited = time.perf_counter()
            batch = next(batches)
            data_wait += time.perf_counter() - waited
            state, metrics = step_fn(state, batch, train_key)
            checkpoints.check_saves(manager, last_saved)  # a failed save stops the run here
            pending.append(metrics)
            step += 1
            progress.update(1)
            boundary = step == total or step % config.training.checkpoint_every == 0
            if step % config.training.log_every == 0 or boundary:
                summary = _summarise(pending, step, manager, resumed())
                elapsed = time.perf_counter() - window_start
                summary["steps_per_s"] = len(pending) / elapsed
                summary["data_wait_frac"] = data_wait / elapsed  # of the window's wall time
                pending, window_start, data_wait = [], time.perf_counter(), 0.0
                writer.scalars(step, summary)
                reporting.log_metrics(step, summary)
                progress.set_postfix(loss=f"{summary['loss']:.4f}")
            if boundary:
                save(step)
            if multi and multihost_utils.reached_preemption_sync_point(step):
                raise interrupts.Interrupted("SIGTERM")
            every = config.training.sample_every
            if every and step % every == 0 and step != total:
                _write_samples(
                    config, sampler, state.ema_params, keys["sample"], workdir, step, writer
                )
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        if multi and not isinstance(e, interrupts.Interrupted):
            # Ctrl-C stops each process at its own step: a checkpoint needs all of them at one.
            logging.warning("Interrupted (Ctrl-C) at step %d: several processes, not saving.", step)
            raise
        # Raises rather than save a non-finite state.
        _summarise(pending, step, manager, resumed())
        if step == start:  # e.g. during the first step's compilation: nothing new to save
            logging.warning("Interrupted (%s) before step %d: nothing to save.", _label(e), step)
            raise KeyboardInterrupt from e
        logging.warning("Interrupted (%s) at step %d: saving a checkpoint.", _label(e), step)
        save(step)
        checkpoints.wait(manager, step)
        raise KeyboardInterrupt from e
    finally:
        progress.close()
        checkpoints.wait(manager, last_saved)
    signals.check()  # still installed: sampling and evaluation stop between their segments
    logging.info("Training done: %d steps.", step)
    try:
        if config.training.eval_at_end and step > start:
            sampling.sample_and_save(config, sampler, state.ema_params, workdir, writer)
            ctx = evaluation.EvalContext(
                config, program.model, state.ema_params, mesh, workdir, {"checkpoint_step": step}
            )
            evaluation.run_evaluators(ctx)
    finally:
        writer.close()
    return state


def _check_data_position(config: ml_collections.ConfigDict, step: int, meta: dict) -> None:
    want = step * config.training.batch_size
    if meta.get("data_position") != want:
        raise ValueError(
            f"The checkpoint of step {step} was written at data position "
            f"{meta.get('data_position')}, but this config resumes at {want} "
            f"(training.batch_size={config.training.batch_size})."
        )


def _first_bad_state(stacked: dict, first_step: int) -> tuple[int, int, str, float] | None:
    """(the first state that does not resume, the step whose metrics show it, the quantity,
    its value) for a window of per-step metrics from ``first_step`` on; None when all finite.

    Step s's loss and gradient norm are computed at the parameters of state s - 1, its
    parameter norm is of state s: a non-finite loss or gradient at step s condemns state s - 1
    (any learning rate repeats that gradient), non-finite parameters condemn state s."""
    found = []
    for name, what, offset in (
        ("loss", "loss", 1),
        ("grad_norm", "gradient norm", 1),
        ("param_norm", "parameter norm", 0),
    ):
        values = np.asarray(stacked.get(name, ()))
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            step = first_step + int(bad[0])
            found.append((step - offset, step, what, float(values[bad[0]])))
    return min(found) if found else None


def _summarise(
    pending: list[dict], step: int, manager, resumed_from: int | None = None
) -> dict[str, float]:
    """Mean metrics over the window; raise NonFiniteLossError naming the first bad step when a
    loss, gradient norm or parameter norm is not finite.

    ``resumed_from``: the checkpoint this run resumed from, while nothing newer is saved. A
    divergence before the next save condemns it too (its parameters are finite but lead to a
    non-finite gradient whatever the new settings), so the message walks back to an older one."""
    if not pending:
        return {}
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
    first = _first_bad_state(stacked, step - len(pending) + 1)
    if first is not None:
        bad_state, at, what, value = first
        again = resumed_from is not None and resumed_from < bad_state
        if again:
            bad_state = resumed_from
        manager.wait_until_finished()
        # Checkpoints of that state and after cannot resume: moved aside (never deleted), so a
        # resume starts before them.
        moved = [
            checkpoints.move_aside(manager, s, "diverged")
            for s in sorted(manager.all_steps())
            if s >= bad_state
        ]
        last = manager.latest_step()
        where = (
            f"The newest checkpoint of a finite state (loss, gradient and parameters) is step "
            f"{last} in {manager.directory}; the same settings will likely diverge again from it: "
            "resume"
            if last is not None
            else f"No checkpoint before step {bad_state} is left in {manager.directory}: the "
            "same command starts again at step 0; run it"
        )
        raise NonFiniteLossError(
            f"The {what} is {value} at step {at}: stopping"
            + (
                f", again after resuming from step {bad_state}, which cannot resume either"
                if again
                else ""
            )
            + (f" (checkpoints from step {bad_state} on moved to diverged-<step>)" if moved else "")
            + f". {where} with changed optimiser settings, e.g. "
            "--config.optim.learning_rate=<lower> --allow_config_change=optim.learning_rate."
        )
    return {k: float(np.mean(v)) for k, v in stacked.items()}


def _write_samples(config, sampler, params, key, workdir, step, writer) -> None:
    """A grid from the same noise at every step, so the grids show the model's progress."""
    samples = sampler(params, key)  # every process takes part; process 0 writes
    if config.data.image_size and jax.process_index() == 0:
        path = os.path.join(workdir, "samples", f"step_{step:08d}.png")
        grid = reporting.save_sample_grid(
            path,
            np.asarray(jax.device_get(samples)),
            config.data.num_bins,
            sampling.sample_labels(config, len(samples)),
        )
        writer.image(step, "samples", grid)
        logging.info("Wrote samples of step %d to %s.", step, path)
