"""Samplers by name, run over the device mesh in compiled segments with a progress bar.

``SAMPLERS[config.sampling.method]`` builds a ``Chain`` for a config: how to draw the initial
state and how to run a segment of its steps. ``make_sample_fn`` runs chains of
``sampling.batch_size`` samples, ``STEPS_PER_CALL`` steps per compiled call (one compilation:
the segment's first step is an argument), so the progress bar moves while a long chain runs and
the result equals the one-scan loops of the math core (``diffusion.p_sample_loop`` etc.).

The algorithms are ``samplers``', written once over the process of the config's objective
(``process_fn``: the DDPM chain or continuous time); a new sampler is its step there and one
entry in SAMPLERS here: the objectives it applies to and a builder ``(config, model) -> Chain``.
Its network is ``net(config, model, params, labels)``, so class labels and classifier-free
guidance (``sampling.guidance_scale``) reach every sampler the same way. ``ALIASES``: the names
of earlier versions (``vdm_ancestral`` etc.), read as today's.

A class-conditional model (``model.num_classes`` K > 0) draws sample i of class
``sampling.class_label``, or i mod K for -1 (``sample_labels``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import distill as distill_lib
from diffusion_jax import files, input_pipeline, models, objectives, reporting, samplers, sharding
from diffusion_jax import score as score_lib
from diffusion_jax import vdm as vdm_lib

STEPS_PER_CALL = 50  # chain steps per compiled call: a few seconds each for the digits model


def sample_labels(config: ml_collections.ConfigDict, num: int) -> np.ndarray | None:
    """int32 [num] classes of samples 0..num-1: ``sampling.class_label``, or i mod
    ``model.num_classes`` for -1; None for an unconditional model."""
    k, label = config.model.num_classes, config.sampling.class_label
    if not k:
        return None
    i = np.arange(num)
    return (i % k if label < 0 else np.full(num, label)).astype(np.int32)


def net(
    config: ml_collections.ConfigDict, model, params: Any, labels: jax.Array | None
) -> diffusion_lib.ModelFn:
    """The sampler's ``model_fn(x_t, t)``: the model under ``labels`` [B] (None: no class) with
    ``sampling.guidance_scale`` (``models.model_fn``: one batched call per step)."""
    w = config.sampling.guidance_scale if labels is not None else 0.0
    return models.model_fn(model, params, labels=labels, guidance_scale=w)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A sampler bound to a config. ``init(key, shape) -> (state, key)`` draws the initial state
    (x, or a pytree of [B, ...] arrays holding it) and the key of the steps;
    ``run(params, labels, state, key, done, count) -> state`` runs steps done, ...,
    done + count - 1 (those < num_steps), labels [B] or None; ``finish(params, state) -> x``
    ends the chain."""

    num_steps: int
    calls_per_step: int  # network calls per step (for the progress bar)
    init: Callable[[jax.Array, tuple[int, ...]], tuple[jax.Array, jax.Array]]
    run: Callable[[Any, Any, jax.Array, jax.Array, jax.Array, int], jax.Array]
    finish: Callable[[Any, jax.Array], jax.Array] = lambda params, x: x


def _gaussian_init(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """x_T ~ N(0, I) and the steps' key, as ``p_sample_loop(x_T=...)`` splits them."""
    noise_key, key = jax.random.split(key)
    _, key_steps = diffusion_lib.chain_keys(key)
    return jax.random.normal(noise_key, shape), key_steps


def process_fn(config: ml_collections.ConfigDict, model) -> Callable[[Any], samplers.Process]:
    """``process(params)``: the ``samplers.Process`` of the config's objective: the DDPM chain
    (``diffusion.DiscreteProcess``), or for ``vdm`` continuous time under the model's own γ
    (``vdm.ContinuousProcess``)."""
    if config.training.objective == "vdm":
        return lambda params: vdm_lib.ContinuousProcess(objectives.gamma_fn(model, params))
    process = diffusion_lib.DiscreteProcess(objectives.make_diffusion(config))
    return lambda params: process


def _chain(config: ml_collections.ConfigDict, model, eta: float | None) -> Chain:
    """Ancestral sampling (eta None) or DDIM over ``sampling.num_steps`` steps of the process's
    chain (0: diffusion.num_timesteps; the DDPM chain respaced, continuous time on the uniform
    grid in t)."""
    s = config.sampling
    n = s.num_steps or config.diffusion.num_timesteps
    process_of = process_fn(config, model)

    def run(params, labels, x, key_steps, done, count):
        process = process_of(params).chain(n)
        fn = net(config, model, params, labels)
        kw = dict(clip_denoised=s.clip_denoised)
        if eta is None:
            update = functools.partial(samplers.ancestral_update, process, fn, **kw)
        else:
            update = functools.partial(samplers.ddim_update, process, fn, eta=eta, **kw)
        step = samplers.chain_step_fn(process, update, key_steps)
        return samplers.run_steps(lambda i, x: step(i, x)[0], x, done, count, n)

    return Chain(n, 1, _gaussian_init, run, lambda params, x: process_of(params).finish(x))


def _ancestral(config: ml_collections.ConfigDict, model) -> Chain:
    return _chain(config, model, None)


def _ddim(config: ml_collections.ConfigDict, model) -> Chain:
    return _chain(config, model, config.sampling.eta)


def _dpmpp(config: ml_collections.ConfigDict, model, sde: bool = False) -> Chain:
    """DPM-Solver++(2M), or with ``sde`` its SDE (``sampling.sde_eta``), spending
    ``sampling.num_steps`` network calls (0: diffusion.num_timesteps)."""
    s = config.sampling
    calls = s.num_steps or config.diffusion.num_timesteps
    eta = s.sde_eta if sde else 0.0
    process_of = process_fn(config, model)

    def init(key, shape):
        x_T, key = _gaussian_init(key, shape)
        return samplers.dpmpp_2m_init(x_T), key

    def run(params, labels, state, key, done, count):
        fn = net(config, model, params, labels)
        step = samplers.dpmpp_2m_step(
            process_of(params), fn, calls, s.clip_denoised, eta, s.lower_order_final, key
        )
        return samplers.run_steps(step, state, done, count, calls)

    def finish(params, state):
        return samplers.dpmpp_2m_finish(process_of(params), calls, state)

    return Chain(calls, 1, init, run, finish)


def _heun(config: ml_collections.ConfigDict, model) -> Chain:
    """Heun's method on the EDM noise levels: ``sampling.num_steps`` network calls (0:
    diffusion.num_timesteps) buy (calls + 1) // 2 steps of 2 calls each (the last 1)."""
    s = config.sampling
    calls = s.num_steps or config.diffusion.num_timesteps
    process_of = process_fn(config, model)
    num = samplers.heun_num_steps(calls)

    def init(key, shape):
        x_T, key = _gaussian_init(key, shape)
        return samplers.heun_init(x_T), key

    def run(params, labels, state, key, done, count):
        fn = net(config, model, params, labels)
        step = samplers.heun_step(process_of(params), fn, calls, clip_denoised=s.clip_denoised)
        return samplers.run_steps(step, state, done, count, num)

    return Chain(num, 2, init, run, lambda params, state: state["x"])


def _distilled(config: ml_collections.ConfigDict, model) -> Chain:
    """DDIM on the grid a distilled student was trained for (``distill.distilled_step``):
    ``sampling.num_steps`` steps (0: diffusion.num_timesteps) uniform in t, the last to
    sigma = 0. On a teacher (ddpm), its own DDIM on that grid: the distillation's ceiling."""
    s = config.sampling
    n = s.num_steps or config.diffusion.num_timesteps
    process_of = process_fn(config, model)

    def run(params, labels, x, key_steps, done, count):
        del key_steps  # deterministic
        fn = net(config, model, params, labels)
        step = distill_lib.distilled_step(process_of(params), fn, n, s.clip_denoised)
        return samplers.run_steps(step, x, done, count, n)

    return Chain(n, 1, _gaussian_init, run)


def _langevin(config: ml_collections.ConfigDict, model) -> Chain:
    sigmas = objectives.make_sigmas(config)
    c = config.ncsn

    def init(key, shape):
        init_key, key = jax.random.split(key)
        return jax.random.uniform(init_key, shape, minval=-1.0, maxval=1.0), key

    def run(params, labels, x, key, done, count):
        del labels  # the ncsn objective refuses a conditional config
        score_fn = score_lib.ncsn_score_fn(models.model_fn(model, params), sigmas)
        return score_lib.annealed_langevin_levels(
            score_fn, x, sigmas, key, c.n_steps_each, c.step_lr, done, count
        )

    return Chain(int(sigmas.shape[0]), c.n_steps_each, init, run)


@dataclasses.dataclass(frozen=True)
class Sampler:
    objectives: tuple[str, ...]  # the training objectives whose models it samples
    build: Callable[[ml_collections.ConfigDict, Any], Chain]


_GAUSSIAN = ("ddpm", "vdm")  # the objectives whose process is a samplers.Process
SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(_GAUSSIAN, _ancestral),
    "ddim": Sampler(_GAUSSIAN, _ddim),
    "dpmpp_2m": Sampler(_GAUSSIAN, _dpmpp),
    "dpmpp_2m_sde": Sampler(_GAUSSIAN, functools.partial(_dpmpp, sde=True)),
    "heun": Sampler(_GAUSSIAN, _heun),
    "distilled": Sampler(("ddpm", "distill"), _distilled),
    "langevin": Sampler(("ncsn",), _langevin),
}
# Names of earlier versions, when continuous time had samplers of its own: config.json files
# that hold them still sample.
ALIASES = {"vdm_ancestral": "ancestral", "vdm_ddim": "ddim", "vdm_dpmpp_2m": "dpmpp_2m"}


def method(config: ml_collections.ConfigDict) -> str:
    """``sampling.method``, an alias (``ALIASES``) read as the sampler it names."""
    return ALIASES.get(config.sampling.method, config.sampling.method)


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a sampler that does not exist or does not fit the objective."""
    name, objective = method(config), config.training.objective
    if name not in SAMPLERS:
        raise ValueError(
            f"config.sampling.method={name!r} is not one of {tuple(SAMPLERS)} (or an earlier "
            f"name: {tuple(ALIASES)})."
        )
    if objective not in SAMPLERS[name].objectives:
        fits = tuple(n for n, s in SAMPLERS.items() if objective in s.objectives)
        raise ValueError(
            f"config.sampling.method={name!r} does not sample a training.objective="
            f"{objective!r} model; allowed: {fits}."
        )
    s = config.sampling
    num_t = config.diffusion.num_timesteps
    if objective in ("ddpm", "distill") and not 0 <= s.num_steps <= num_t:
        raise ValueError(f"config.sampling.num_steps={s.num_steps} must be in [0, {num_t}].")
    if objective == "vdm" and not (isinstance(s.num_steps, int) and s.num_steps >= 0):
        raise ValueError(
            f"config.sampling.num_steps={s.num_steps!r} must be an integer >= 0 (steps of the "
            f"continuous model's chain; 0: diffusion.num_timesteps = {num_t})."
        )
    if name == "heun" and s.num_steps == 1:
        raise ValueError(
            "config.sampling.num_steps=1 is too few for sampling.method='heun' (a Heun step "
            "costs 2 network calls): give >= 2, or 0 for diffusion.num_timesteps."
        )
    if isinstance(s.num_samples, bool) or not isinstance(s.num_samples, int) or s.num_samples < 1:
        raise ValueError(f"config.sampling.num_samples={s.num_samples!r} must be an integer >= 1.")
    sharding.check_batch_size(s.batch_size, "sampling.batch_size")
    k = config.model.num_classes
    if k and not -1 <= s.class_label < k:
        raise ValueError(
            f"config.sampling.class_label={s.class_label} must be a class in [0, {k}) "
            f"(model.num_classes={k}), or -1 for sample i to get class i mod {k}."
        )
    if not k and (s.guidance_scale or s.class_label != -1):
        raise ValueError(
            f"config.sampling.guidance_scale={s.guidance_scale} and sampling.class_label="
            f"{s.class_label} need a class-conditional model (model.num_classes > 0); an "
            "unconditional one takes 0 and -1."
        )
    if not 0 <= s.sde_eta < float("inf"):
        raise ValueError(
            f"config.sampling.sde_eta={s.sde_eta} must be >= 0 (dpmpp_2m_sde's noise scale; "
            "1: k-diffusion's default, 0: the ODE solver dpmpp_2m)."
        )
    if not 0 <= s.guidance_scale < float("inf"):
        raise ValueError(
            f"config.sampling.guidance_scale={s.guidance_scale} must be finite and >= 0 (0: the "
            "conditional model without guidance)."
        )
    if not 0 <= s.eta < float("inf"):
        raise ValueError(
            f"config.sampling.eta={s.eta} must be finite and >= 0 (DDIM's noise: 0 "
            "deterministic, 1 ancestral)."
        )


def steps_per_call(num_steps: int, calls_per_step: int = 1) -> int:
    """Steps per compiled call: about STEPS_PER_CALL network calls, equal segments."""
    want = max(1, STEPS_PER_CALL // calls_per_step)
    return -(-num_steps // -(-num_steps // want))


def make_sample_fn(
    config: ml_collections.ConfigDict, model, mesh: jax.sharding.Mesh, desc: str = "sample"
) -> Callable[[Any, jax.Array], np.ndarray]:
    """``sample(params, key) -> [sampling.num_samples, ...]`` in model space, on the host.

    Chunks of ``sampling.batch_size`` come from fold_in(key, i), split over the devices; each
    chain runs in segments of ``steps_per_call`` steps, with a progress bar on process 0. A
    conditional model's sample i is of class ``sample_labels(config, num_samples)[i]``.
    """
    s = config.sampling
    chain = SAMPLERS[method(config)].build(config, model)
    shape = (s.batch_size, *input_pipeline.example_shape(config))
    data, repl = sharding.data_sharded(mesh), sharding.replicated(mesh)
    per_call = steps_per_call(chain.num_steps, chain.calls_per_step)
    init = jax.jit(lambda key: chain.init(key, shape), out_shardings=(data, repl))
    run = jax.jit(
        lambda p, y, s, k, done: chain.run(p, y, s, k, done, per_call), out_shardings=data
    )
    finish = jax.jit(chain.finish, out_shardings=data)

    def sample(params, key):
        num_chunks = -(-s.num_samples // s.batch_size)
        # [num_chunks * B] the classes of every chain (those past num_samples are cut off)
        labels = sample_labels(config, num_chunks * s.batch_size)
        chunks = []
        total = num_chunks * chain.num_steps * chain.calls_per_step
        with reporting.progress_bar(total, desc, unit="call") as bar:
            for i in range(num_chunks):
                state, key_steps = init(jax.random.fold_in(key, i))
                y = None
                if labels is not None:
                    y = jax.device_put(labels[i * s.batch_size : (i + 1) * s.batch_size], data)
                for done in range(0, chain.num_steps, per_call):
                    state = jax.block_until_ready(
                        run(params, y, state, key_steps, done)
                    )  # then the bar
                    count = min(per_call, chain.num_steps - done)
                    bar.update(count * chain.calls_per_step)
                chunks.append(to_host(finish(params, state)))
        return np.concatenate(chunks)[: s.num_samples]

    return sample


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-host sharded) array as NumPy, on every process."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def output_folder(config: ml_collections.ConfigDict, workdir: str, kind: str) -> str:
    """``WORKDIR/<kind>`` (samples, eval), or for a distilled run ``WORKDIR/<kind>/student_<N>``:
    one per student, N = ``sampling.num_steps``."""
    if config.training.objective == "distill":
        return os.path.join(workdir, kind, f"student_{config.sampling.num_steps}")
    return os.path.join(workdir, kind)


def nonfinite_cause(params, otherwise: str) -> str:
    """The likely cause of a result that is not finite, for its one-line error: parameters that
    are not finite (a diverged optimiser value), else ``otherwise``."""
    bad = sum(int(np.size(x) - np.isfinite(np.asarray(x)).sum()) for x in jax.tree.leaves(params))
    if bad:
        return (
            f"the parameters read hold {bad} non-finite values (training diverged: check "
            "optim.learning_rate and optim.ema_decay, and resume from an earlier checkpoint)"
        )
    return otherwise


def sample_and_save(
    config: ml_collections.ConfigDict, sampler, params, workdir: str, writer=None
) -> np.ndarray:
    """Draw ``sampling.num_samples`` samples; write samples.npz (``samples``, and ``labels``
    [N] for a conditional model) and, for images, a PNG grid (one class per row), each renamed
    into place (``files``). Samples that are not all finite are not written (the previous files
    stay): FloatingPointError naming how many and the likely cause."""
    samples = sampler(params, objectives.run_keys(config.seed)["sample"])
    labels = sample_labels(config, len(samples))
    out = output_folder(config, workdir, "samples")
    finite = np.isfinite(np.asarray(samples)).reshape(len(samples), -1).all(axis=1)
    if not finite.all():
        raise FloatingPointError(
            f"{int((~finite).sum())} of {len(samples)} samples are not finite (NaN or inf): "
            f"nothing written to {out} (any previous samples are kept); likely cause: "
            + nonfinite_cause(
                params,
                f"the parameters are finite: the sampler diverged (sampling.method="
                f"{config.sampling.method!r}, sampling.num_steps={config.sampling.num_steps}); "
                "try another method or more steps",
            )
            + "."
        )
    if jax.process_index() == 0:
        arrays = {"samples": samples} if labels is None else {"samples": samples, "labels": labels}
        with files.atomic_write(os.path.join(out, "samples.npz")) as f:
            np.savez(f, **arrays)
        if config.data.image_size:
            grid = reporting.save_sample_grid(
                os.path.join(out, "samples.png"), samples, config.data.num_bins, labels
            )
            if writer is not None:
                writer.image(0, "final_samples", grid)
        logging.info("Wrote %d samples to %s.", len(samples), out)
    return samples
