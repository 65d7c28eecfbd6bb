"""Samplers by name, run over the device mesh in compiled segments with a progress bar.

``SAMPLERS[config.sampling.method]`` builds a ``Chain`` for a config: how to draw the initial
state and how to run a segment of its steps. ``make_sample_fn`` runs chains of
``sampling.batch_size`` samples, ``STEPS_PER_CALL`` steps per compiled call (one compilation:
the segment's first step is an argument), so the progress bar moves while a long chain runs and
the result equals the one-scan loops of the math core (``diffusion.p_sample_loop`` etc.).

A new sampler is one new entry in SAMPLERS: the objectives it applies to and a builder
``(config, model) -> Chain``; its network is ``net(config, model, params, labels)``, so
class labels and classifier-free guidance (``sampling.guidance_scale``) reach every sampler the
same way.

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
from diffusion_jax import input_pipeline, models, objectives, ode, reporting, sharding
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


def _reverse_chain(config: ml_collections.ConfigDict, model, steps_fn: Callable) -> Chain:
    d = objectives.make_diffusion(config)
    d = diffusion_lib.maybe_respace(d, config.sampling.num_steps or None)
    k = d.num_timesteps

    def run(params, labels, x, key_steps, done, count):
        return steps_fn(d, net(config, model, params, labels), x, key_steps, k - done, count)

    return Chain(k, 1, _gaussian_init, run)


def _ancestral(config: ml_collections.ConfigDict, model) -> Chain:
    clip = config.sampling.clip_denoised
    return _reverse_chain(
        config,
        model,
        lambda d, net, x, key, start, count: diffusion_lib.p_sample_steps(
            d, net, x, key, start, count, clip
        ),
    )


def _ddim(config: ml_collections.ConfigDict, model) -> Chain:
    s = config.sampling
    return _reverse_chain(
        config,
        model,
        lambda d, net, x, key, start, count: diffusion_lib.ddim_sample_steps(
            d, net, x, key, start, count, s.eta, s.clip_denoised
        ),
    )


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


def _ode_chain(
    config: ml_collections.ConfigDict,
    model,
    init_fn: Callable,
    steps_fn: Callable,
    num_steps_of: Callable[[int], int],
    calls_per_step: int,
    options: Callable[[ml_collections.ConfigDict], dict] = lambda config: {},
    stochastic: bool = False,
) -> Chain:
    """A solver of ``ode`` (its ``*_init`` and ``*_steps``), spending ``sampling.num_steps``
    network calls (0: T) in ``num_steps_of(calls)`` steps; the network is called at fractional t
    between the integer steps. ``options(config)``: the solver's keyword arguments from the
    config; ``stochastic``: the steps take the chain's key for their noise."""
    d = objectives.make_diffusion(config)
    calls = config.sampling.num_steps or d.num_timesteps
    clip = config.sampling.clip_denoised
    kw = options(config)

    def init(key, shape):
        x_T, key = _gaussian_init(key, shape)
        return init_fn(d, x_T, calls), key

    def run(params, labels, state, key, done, count):
        fn = net(config, model, params, labels)
        noise = dict(key=key) if stochastic else {}
        return steps_fn(d, fn, state, done, count, calls, clip_denoised=clip, **kw, **noise)

    return Chain(num_steps_of(calls), calls_per_step, init, run, lambda params, s: s["x"])


def _dpmpp_options(config: ml_collections.ConfigDict, sde: bool = False) -> dict:
    s = config.sampling
    kw = dict(lower_order_final=s.lower_order_final)
    return dict(kw, eta=s.sde_eta) if sde else kw


_DPMPP = dict(
    init_fn=ode.dpmpp_2m_init,
    steps_fn=ode.dpmpp_2m_steps,
    num_steps_of=lambda calls: calls,
    calls_per_step=1,
)


def _vdm_chain(config: ml_collections.ConfigDict, model, kind: str) -> Chain:
    """A continuous-time model's chain of ``sampling.num_steps`` steps (0: diffusion.num_timesteps)
    from t = 1 to 0 on the uniform grid in t, γ the model's own schedule: ``ancestral`` (VDM's
    sampler), ``ddim`` (``sampling.eta``) or ``dpmpp_2m`` (DPM-Solver++(2M))."""
    s = config.sampling
    n = s.num_steps or config.diffusion.num_timesteps
    clip = s.clip_denoised

    def init(key, shape):
        z, key = _gaussian_init(key, shape)
        return (vdm_lib.dpmpp_2m_init(z) if kind == "dpmpp_2m" else z), key

    def run(params, labels, state, key, done, count):
        fn, gamma = net(config, model, params, labels), objectives.gamma_fn(model, params)
        if kind == "dpmpp_2m":
            return vdm_lib.dpmpp_2m_steps(fn, gamma, state, done, count, n, clip)
        eta = s.eta if kind == "ddim" else None
        return vdm_lib.ancestral_steps(fn, gamma, state, key, done, count, n, clip, eta)

    def finish(params, state):
        z = state["x"] if kind == "dpmpp_2m" else state
        return vdm_lib.finish(objectives.gamma_fn(model, params), z)

    return Chain(n, 1, init, run, finish)


@dataclasses.dataclass(frozen=True)
class Sampler:
    objectives: tuple[str, ...]  # the training objectives whose models it samples
    build: Callable[[ml_collections.ConfigDict, Any], Chain]


SAMPLERS: dict[str, Sampler] = {
    "ancestral": Sampler(("ddpm",), _ancestral),
    "ddim": Sampler(("ddpm",), _ddim),
    "dpmpp_2m": Sampler(("ddpm",), functools.partial(_ode_chain, **_DPMPP, options=_dpmpp_options)),
    "dpmpp_2m_sde": Sampler(
        ("ddpm",),
        functools.partial(
            _ode_chain,
            **_DPMPP,
            options=functools.partial(_dpmpp_options, sde=True),
            stochastic=True,
        ),
    ),
    "heun": Sampler(
        ("ddpm",),
        functools.partial(
            _ode_chain,
            init_fn=ode.heun_init,
            steps_fn=ode.heun_steps,
            num_steps_of=ode.heun_num_steps,
            calls_per_step=2,
        ),
    ),
    "langevin": Sampler(("ncsn",), _langevin),
    "vdm_ancestral": Sampler(("vdm",), functools.partial(_vdm_chain, kind="ancestral")),
    "vdm_ddim": Sampler(("vdm",), functools.partial(_vdm_chain, kind="ddim")),
    "vdm_dpmpp_2m": Sampler(("vdm",), functools.partial(_vdm_chain, kind="dpmpp_2m")),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a sampler that does not exist or does not fit the objective."""
    method, objective = config.sampling.method, config.training.objective
    if method not in SAMPLERS:
        raise ValueError(f"config.sampling.method={method!r} is not one of {tuple(SAMPLERS)}.")
    if objective not in SAMPLERS[method].objectives:
        fits = tuple(n for n, s in SAMPLERS.items() if objective in s.objectives)
        raise ValueError(
            f"config.sampling.method={method!r} does not sample a training.objective="
            f"{objective!r} model; allowed: {fits}."
        )
    s = config.sampling
    num_t = config.diffusion.num_timesteps
    if objective == "ddpm" and not 0 <= s.num_steps <= num_t:
        raise ValueError(f"config.sampling.num_steps={s.num_steps} must be in [0, {num_t}].")
    if objective == "vdm" and not (isinstance(s.num_steps, int) and s.num_steps >= 0):
        raise ValueError(
            f"config.sampling.num_steps={s.num_steps!r} must be an integer >= 0 (steps of the "
            f"continuous model's chain; 0: diffusion.num_timesteps = {num_t})."
        )
    if method == "heun" and s.num_steps == 1:
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
    chain = SAMPLERS[s.method].build(config, model)
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


def sample_and_save(
    config: ml_collections.ConfigDict, sampler, params, workdir: str, writer=None
) -> np.ndarray:
    """Draw ``sampling.num_samples`` samples; write samples.npz (``samples``, and ``labels``
    [N] for a conditional model) and, for images, a PNG grid (one class per row)."""
    samples = sampler(params, objectives.run_keys(config.seed)["sample"])
    labels = sample_labels(config, len(samples))
    out = os.path.join(workdir, "samples")
    if jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        arrays = {"samples": samples} if labels is None else {"samples": samples, "labels": labels}
        np.savez(os.path.join(out, "samples.npz"), **arrays)
        if config.data.image_size:
            grid = reporting.save_sample_grid(
                os.path.join(out, "samples.png"), samples, config.data.num_bins, labels
            )
            if writer is not None:
                writer.image(0, "final_samples", grid)
        logging.info("Wrote %d samples to %s.", len(samples), out)
    return samples
