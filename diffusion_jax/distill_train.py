"""Progressive distillation of a trained run (Salimans & Ho 2022), the command:

    python -m diffusion_jax.main --config configs/digits_distill.py:runs/digits \
        --workdir runs/digits_distill

Round r trains a student to take, in one DDIM step, the two DDIM steps of its teacher on the grid
of 2N steps uniform in t (``distill.distillation_loss``): the teacher is the trained run's EMA
parameters (``distill.teacher``) in the first round, the previous round's student after; N runs
from ``distill.start_steps / 2`` down to ``distill.target_steps``. Each round is
``distill.steps_per_round`` Adam updates, the learning rate falling linearly to 0, from the
previous student's weights (the first: the teacher's, its learned-variance channels dropped).

Each finished round's student is saved in ``WORKDIR/students/<N>`` with its grid; ``--mode
sample|eval`` read the one of ``sampling.num_steps``. The loop's state (step, round, student,
optimiser) is checkpointed every ``training.checkpoint_every`` steps and at each round's end:
a run killed anywhere resumes where it stopped, and ends bit-identical to one that was not (the
batches and keys are functions of the step, as in ``train``).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from configs import workdir as workdir_config
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
    workdir_lock,
)
from diffusion_jax import config as config_lib
from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import distill as distill_lib

__all__ = ["DistillState", "Teacher", "load_teacher", "student_init", "train_and_evaluate"]

# What a student must share with its teacher: the network and the data it models, the schedule.
SHARED_KEYS = (
    "model.",
    "data.",
    "diffusion.beta_schedule",
    "diffusion.beta_start",
    "diffusion.beta_end",
    "diffusion.num_timesteps",
)


@flax.struct.dataclass
class DistillState:
    step: jax.Array  # int32: updates applied over all rounds
    round: jax.Array  # int32: the round being trained, 0-based (== rounds when all are done)
    params: Any  # the student's
    opt_state: Any  # fresh at the start of each round


@dataclasses.dataclass(frozen=True)
class Teacher:
    """The trained run a distillation starts from."""

    config: ml_collections.ConfigDict
    model: Any
    params: Any
    step: int
    process: diffusion_lib.DiscreteProcess


def load_teacher(config: ml_collections.ConfigDict) -> Teacher:
    """The run in ``distill.teacher``: its config (checked against the student's: the same
    network, data and schedule) and its newest EMA parameters. ValueError naming what differs;
    FileNotFoundError when it holds no run or no checkpoint."""
    path = config.distill.teacher
    if not os.path.exists(os.path.join(path, "config.json")):
        raise ValueError(
            f"config.distill.teacher={path!r} holds no trained run (no config.json): train the "
            f"teacher first, e.g. python -m diffusion_jax.main --config configs/digits.py "
            f"--workdir {path} --config.diffusion.mean_type=v"
        )
    teacher_config = evaluation.prepare(workdir_config.get_config(path))
    if teacher_config.training.objective != "ddpm":
        raise ValueError(
            f"{path} holds a training.objective={teacher_config.training.objective!r} run; "
            "distillation starts from a ddpm run."
        )
    diffs = [
        d
        for d in config_lib.config_differences(teacher_config.to_dict(), config)
        if d.startswith(SHARED_KEYS)
    ]
    if diffs:
        raise ValueError(
            f"The student's network, data and schedule must be its teacher's ({path}); "
            "differing keys:\n  " + "\n  ".join(diffs) + "\nLet the config read them from the "
            f"teacher: --config configs/digits_distill.py:{path}"
        )
    params, step = checkpoints.load_state_item_and_step(path, "ema_params")
    logging.info("Teacher: the EMA parameters of step %d in %s.", step, path)
    process = diffusion_lib.DiscreteProcess(objectives.make_diffusion(teacher_config))
    return Teacher(teacher_config, models.get_model(teacher_config), params, step, process)


def student_init(teacher_params: Any, abstract_params: Any) -> Any:
    """The teacher's weights as the student's: the same tree, each array cut to the student's
    shape along its last axis (the output layer's learned-variance channels dropped; its
    eps channels are read as v). ValueError when the networks differ otherwise."""
    want = jax.tree.structure(abstract_params)
    if jax.tree.structure(teacher_params) != want:
        raise ValueError("the teacher's network is not the student's (its layers differ).")

    def cut(t, a):
        if t.shape[:-1] != a.shape[:-1] or t.shape[-1] < a.shape[-1]:
            raise ValueError(f"a teacher array of shape {t.shape} cannot start one of {a.shape}.")
        return jnp.array(t[..., : a.shape[-1]], a.dtype, copy=True)  # not the teacher's buffer

    return jax.tree.map(cut, teacher_params, abstract_params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """``optim.optimizer`` at ``distill.learning_rate`` falling linearly to 0 over a round (its
    state is fresh each round), the gradient's global norm clipped at ``optim.grad_clip``."""
    o, c = config.optim, config.distill
    schedule = optax.linear_schedule(c.learning_rate, 0.0, c.steps_per_round)
    opt = optim.OPTIMIZERS[o.optimizer](o, schedule)
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt) if o.grad_clip > 0 else opt


def _make_step(config, loss_fn, optimizer, teacher_model, teacher_process, mesh):
    """The jitted update against one kind of teacher (the trained run, or a student): state
    and teacher replicated, the state donated; N, the student's steps, traced."""

    def step(state: DistillState, teacher_params, batch, base_key, num_steps):
        key = jax.random.fold_in(base_key, state.step)
        x0 = input_pipeline.to_model_space(batch["image"], config.data.num_bins)  # [B, ...]
        teacher_fn = models.model_fn(teacher_model, teacher_params)

        def loss(params):
            terms = loss_fn(
                params,
                x0,
                key,
                teacher_process=teacher_process,
                teacher_fn=teacher_fn,
                num_steps=num_steps,
            )
            return jnp.mean(terms["loss"])

        value, grads = jax.value_and_grad(loss)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": value, "grad_norm": optax.tree.norm(grads)}
        return DistillState(state.step + 1, state.round, params, opt_state), metrics

    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(repl, repl, data, repl, repl),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    allow_config_change: tuple[str, ...] = (),
    signals: interrupts.SignalRecorder | None = None,
    fresh_start: bool = False,
) -> DistillState:
    """``--mode train`` of a ``training.objective="distill"`` config: every round not yet done
    (resuming from the newest checkpoint), then the samples and evaluation of the student of
    ``sampling.num_steps`` steps. Arguments as ``train.train_and_evaluate``'s."""
    config = evaluation.prepare(config)
    config_lib.check_workdir(config, workdir, allow=allow_config_change)
    teacher = load_teacher(config)
    process0 = jax.process_index() == 0
    with workdir_lock.hold(workdir, enabled=process0):
        signals = signals or interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM))
        try:
            return _run(config, workdir, teacher, process0, signals, fresh_start)
        finally:
            signals.restore()


def _run(config, workdir, teacher: Teacher, process0, signals, fresh_start) -> DistillState:
    mesh = sharding.make_mesh()
    repl = sharding.replicated(mesh)
    rounds = objectives.distill_rounds(config)  # the students' steps
    per_round = config.distill.steps_per_round
    model = models.get_model(config)
    loss_fn = objectives.get_objective(config).make_loss_fn(config, model)
    optimizer = make_optimizer(config)
    process = diffusion_lib.DiscreteProcess(objectives.make_diffusion(config))
    keys = objectives.run_keys(config.seed)
    shape = (1, *input_pipeline.example_shape(config))

    def init_params():
        x, t = jnp.zeros(shape), jnp.zeros((1,), jnp.int32)
        return model.init({"params": keys["init"], "dropout": keys["init"]}, x, t)["params"]

    def fresh(step, rnd, params) -> DistillState:
        """A round's start: the optimiser's state new, everything replicated as the step's
        output is (so the step compiles once)."""
        state = DistillState(jnp.int32(step), jnp.int32(rnd), params, optimizer.init(params))
        return jax.device_put(state, repl)

    abstract_params = jax.eval_shape(init_params)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
        jax.eval_shape(lambda: fresh(0, 0, init_params())),
    )
    damaged = checkpoints.check_directory(workdir)
    manager = checkpoints.make_manager(workdir, config.training.keep_checkpoints)
    restored = checkpoints.restore(manager, abstract)
    if restored is None:
        if damaged and not fresh_start:
            raise checkpoints.CheckpointError(
                f"{checkpoints.checkpoint_dir(workdir)} holds only damaged checkpoints "
                f"({', '.join(damaged)}): move them away, use another --workdir, or pass "
                "--fresh_start."
            )
        if config.distill.init == "teacher":
            params = student_init(teacher.params, abstract_params)
        else:
            params = init_params()
        state = fresh(0, 0, params)
        logging.info(
            "Distilling %s (%d-step DDIM) in %d rounds down to %d steps, %d updates each; "
            "the first student starts from %s weights.",
            config.distill.teacher,
            config.distill.start_steps,
            len(rounds),
            rounds[-1],
            per_round,
            "the teacher's" if config.distill.init == "teacher" else "random",
        )
    else:
        state, _ = restored
        if int(state.round) >= len(rounds):
            logging.info(
                "All %d rounds are done in %s (students of %s steps in %s).",
                len(rounds),
                workdir,
                checkpoints.student_steps(workdir),
                checkpoints.students_dir(workdir),
            )
        else:
            logging.info(
                "Resuming from the checkpoint of step %d (round %d of %d) in %s.",
                int(state.step),
                int(state.round) + 1,
                len(rounds),
                workdir,
            )
    if process0:
        os.makedirs(workdir, exist_ok=True)
        reporting.write_json(os.path.join(workdir, "config.json"), config.to_dict())

    source = input_pipeline.load_split(config, config.data.train_split)
    start = int(state.step)
    batches = sharding.prefetch(
        mesh,
        input_pipeline.train_batches(
            config, source, start, jax.process_index(), jax.process_count()
        ),
    )
    writer = reporting.MetricWriter(workdir)
    last_saved = start if restored is not None else None

    def save(state, wait=False):
        nonlocal last_saved
        step = int(state.step)
        if step != last_saved:
            meta = {
                "step": step,
                "round": int(state.round),
                "data_position": step * config.training.batch_size,
            }
            checkpoints.save(manager, step, state, meta, previous=last_saved)
            last_saved = step
        if wait:
            checkpoints.wait(manager, step)

    compiled = {}
    step, pending = start, []
    try:
        for r in range(int(state.round), len(rounds)):
            n = rounds[r]
            if r == 0:
                t_model, t_process, t_params = teacher.model, teacher.process, teacher.params
            else:
                t_model, t_process = model, process
                t_params, _ = checkpoints.load_student(workdir, 2 * n)
            t_params = jax.device_put(t_params, repl)
            kind = "trained run" if r == 0 else "student"
            if kind not in compiled:
                compiled[kind] = _make_step(config, loss_fn, optimizer, t_model, t_process, mesh)
            step_fn = compiled[kind]
            end = (r + 1) * per_round
            desc = f"round {r + 1}/{len(rounds)}: {2 * n} -> {n} steps"
            began = time.perf_counter()
            with reporting.progress_bar(per_round, desc, initial=step - r * per_round) as bar:
                while step < end:
                    signals.check()
                    state, metrics = step_fn(state, t_params, next(batches), keys["train"], n)
                    checkpoints.check_saves(manager, last_saved)
                    pending.append(metrics)
                    step += 1
                    bar.update(1)
                    saving = step % config.training.checkpoint_every == 0 and step < end
                    if step % config.training.log_every == 0 or step == end or saving:
                        summary = _summarise(pending, step, r)  # raises before a bad save
                        pending = []
                        writer.scalars(step, summary)
                        reporting.log_metrics(step, summary)
                        bar.set_postfix(loss=f"{summary['loss']:.4f}")
                    if saving:
                        save(state)
            seconds = time.perf_counter() - began
            grid = distill_lib.distillation_grid(process, n)
            checkpoints.save_student(
                workdir,
                n,
                state.params,
                {
                    "num_steps": n,
                    "teacher_steps": 2 * n,
                    "round": r,
                    "step": step,
                    "grid_t": [float(t) for t in grid.t],
                    "seconds": seconds,
                },
            )
            state = fresh(step, r + 1, state.params)
            save(state, wait=True)
            writer.scalars(step, {"round_seconds": seconds, "student_steps": n})
            logging.info(
                "Round %d/%d done in %.1f s: the student of %d steps is in %s.",
                r + 1,
                len(rounds),
                seconds,
                n,
                os.path.join(checkpoints.students_dir(workdir), str(n)),
            )
            _write_round_samples(config, model, mesh, state.params, workdir, n, keys["sample"])
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        if step == start:
            logging.warning("Interrupted before step %d: nothing to save.", step)
            raise KeyboardInterrupt from e
        if pending:
            _summarise(pending, step, int(state.round))  # raises rather than save a bad state
        logging.warning("Interrupted at step %d: saving a checkpoint.", step)
        save(state, wait=True)
        raise KeyboardInterrupt from e
    finally:
        checkpoints.wait(manager, last_saved)
    signals.check()
    try:
        if config.training.eval_at_end and step > start:
            params, record = evaluation.load_run_params(config, workdir, mesh)
            sampler = sampling.make_sample_fn(config, model, mesh)
            sampling.sample_and_save(config, sampler, params, workdir, writer)
            ctx = evaluation.EvalContext(config, model, params, mesh, workdir, record)
            evaluation.run_evaluators(ctx)
    finally:
        writer.close()
    return state


def _summarise(pending: list[dict], step: int, rnd: int) -> dict[str, float]:
    """Mean metrics of the window; FloatingPointError when a loss is not finite (nothing of it
    is saved: the newest checkpoint is of finite weights)."""
    stacked = jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending))
    bad = np.flatnonzero(~np.isfinite(np.asarray(stacked["loss"])))
    if bad.size:
        at = step - len(pending) + 1 + int(bad[0])
        raise FloatingPointError(
            f"The distillation loss is not finite at step {at} (round {rnd + 1}): stopping "
            "without saving. Start again in a new --workdir with a lower "
            "--config.distill.learning_rate."
        )
    return {k: float(np.mean(v)) for k, v in stacked.items()}


def _write_round_samples(config, model, mesh, params, workdir, num_steps, key) -> None:
    """A grid of the new student's samples at its own steps, ``samples/rounds/student_<N>.png``
    (the same noise every round, so the grids show what each halving costs)."""
    if not config.data.image_size:
        return
    round_config = config.copy_and_resolve_references()
    with round_config.unlocked():
        round_config.sampling.num_steps = num_steps
    sampler = sampling.make_sample_fn(round_config, model, mesh, desc=f"{num_steps} steps")
    samples = sampler(params, key)
    if jax.process_index() == 0:
        path = os.path.join(workdir, "samples", "rounds", f"student_{num_steps}.png")
        reporting.save_sample_grid(path, np.asarray(samples), config.data.num_bins)
