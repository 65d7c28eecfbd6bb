"""Samplers by name: the chains that ``make_sample_fn`` runs in compiled segments give the
math core's one-scan loops, and the registry refuses what does not fit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from diffusion_jax import diffusion as dl
from diffusion_jax import models, objectives, ode, samplers, sampling, schedules, sharding
from diffusion_jax import score as score_lib

SHAPE = (4, 3)
D = dl.GaussianDiffusion.create(schedules.get_beta_schedule("linear", 37))


def toy_eps(x, t):
    return 0.3 * x * jnp.cos(t.astype(jnp.float32)[:, None] / 7.0)


@pytest.mark.parametrize("num_steps", [None, 10])
@pytest.mark.parametrize("count", [1, 5, 16, 37])
def test_segments_of_the_chain_give_the_whole_loop(num_steps, count):
    key = jax.random.key(3)
    x_T = jax.random.normal(jax.random.key(4), SHAPE)
    whole = dl.p_sample_loop(D, toy_eps, SHAPE, key, x_T=x_T, num_steps=num_steps)
    whole_ddim = dl.ddim_sample_loop(D, toy_eps, SHAPE, key, num_steps or 37, 0.5, x_T=x_T)
    process = dl.DiscreteProcess(D).chain(num_steps)
    _, key_steps = dl.chain_keys(key)
    k = process.chain_length()

    def segment(update):
        step = samplers.chain_step_fn(process, update, key_steps)
        return jax.jit(
            lambda x, done: samplers.run_steps(lambda i, x: step(i, x)[0], x, done, count, k)
        )

    steps = segment(functools.partial(samplers.ancestral_update, process, toy_eps))
    ddim = segment(functools.partial(samplers.ddim_update, process, toy_eps, eta=0.5))
    x, y = x_T, x_T
    for done in range(0, k, count):  # the last segment runs past the end: those steps skipped
        x, y = steps(x, done), ddim(y, done)
    np.testing.assert_allclose(x, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, whole_ddim, rtol=1e-5, atol=1e-6)


def test_langevin_levels_in_segments_give_annealed_langevin():
    sigmas = score_lib.ncsn_sigmas(1.0, 0.05, 7)
    score_fn = lambda x, i: -x / (1.0 + sigmas[i][:, None] ** 2)
    x0 = jax.random.uniform(jax.random.key(0), SHAPE)
    key = jax.random.key(1)
    whole = score_lib.annealed_langevin(score_fn, x0, sigmas, key, 3, 0.01)
    x = x0
    for start in range(0, 7, 3):
        x = score_lib.annealed_langevin_levels(score_fn, x, sigmas, key, 3, 0.01, start, 3)
    np.testing.assert_allclose(x, whole, rtol=1e-5, atol=1e-6)


def test_steps_per_call_splits_evenly():
    assert sampling.steps_per_call(1000) == 50
    assert sampling.steps_per_call(20) == 20
    assert sampling.steps_per_call(101) == 34  # 3 calls of <= 34, not 50 + 50 + 1
    assert sampling.steps_per_call(10, calls_per_step=100) == 1


def test_make_sample_fn_equals_the_one_scan_chain():
    """The product's sampler (segments of 2 steps, 2 devices) against ``p_sample_loop``."""
    config = tiny_config(**{"sampling.num_samples": 6, "sampling.batch_size": 4})
    model = models.get_model(config)
    params = model.init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]
    mesh = sharding.make_mesh()
    old = sampling.STEPS_PER_CALL
    sampling.STEPS_PER_CALL = 3  # 20 steps in 7 calls, the last one partly past t = 0
    try:
        samples = sampling.make_sample_fn(config, model, mesh)(params, jax.random.key(5))
    finally:
        sampling.STEPS_PER_CALL = old
    assert samples.shape == (6, 8, 8, 1)
    d = objectives.make_diffusion(config)
    net = models.model_fn(model, params)
    for i in range(2):  # chunk i from fold_in(key, i): noise key, then the chain's key
        noise_key, key = jax.random.split(jax.random.fold_in(jax.random.key(5), i))
        x_T = jax.random.normal(noise_key, (4, 8, 8, 1))
        ref = dl.p_sample_loop(d, net, (4, 8, 8, 1), key, x_T=x_T)
        np.testing.assert_allclose(
            samples[4 * i : 4 * i + 4], ref[: len(samples) - 4 * i], atol=2e-5
        )


def test_the_registry_refuses_what_does_not_fit():
    config = tiny_config(**{"sampling.method": "euler"})
    allowed = (
        r"\('ancestral', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', 'heun', 'distilled', 'langevin'\) "
        r"\(or an "
        r"earlier name: \('vdm_ancestral', 'vdm_ddim', 'vdm_dpmpp_2m'\)\)"
    )
    with pytest.raises(ValueError, match=r"'euler' is not one of " + allowed):
        sampling.check_config(config)
    config = tiny_config(**{"sampling.method": "langevin"})
    with pytest.raises(
        ValueError,
        match=r"objective='ddpm'.*'ddim', 'dpmpp_2m', 'dpmpp_2m_sde', 'heun', 'distilled'\)",
    ):
        sampling.check_config(config)
    config = tiny_config(**{"training.objective": "ncsn"})
    with pytest.raises(ValueError, match=r"allowed: \('langevin',\)"):
        sampling.check_config(config)
    config = tiny_config(**{"sampling.num_steps": 21})
    with pytest.raises(ValueError, match=r"num_steps=21 must be in \[0, 20\]"):
        sampling.check_config(config)


def _in_segments(config, model, params, calls_per_segment):
    """The registry's samples (key 5) with ``sampling.STEPS_PER_CALL`` network calls per
    compiled segment."""
    old = sampling.STEPS_PER_CALL
    sampling.STEPS_PER_CALL = calls_per_segment
    try:
        return sampling.make_sample_fn(config, model, sharding.make_mesh())(
            params, jax.random.key(5)
        )
    finally:
        sampling.STEPS_PER_CALL = old


@pytest.mark.parametrize(
    "method, calls", [("dpmpp_2m", 7), ("dpmpp_2m_sde", 7), ("heun", 9), ("dpmpp_2m_lof", 7)]
)
def test_ode_samplers_in_segments_equal_their_one_scan_solvers(method, calls):
    """The registry's ODE / SDE chains (segments of 2 steps, 2 devices) against
    ``ode.*_sample``: the SDE's noise from the chain's step key, ``sampling.sde_eta`` and
    ``sampling.lower_order_final`` ("_lof") passed through."""
    lof = method.endswith("_lof")
    method = method.removesuffix("_lof")
    config = tiny_config(
        **{"sampling.method": method, "sampling.num_steps": calls, "sampling.batch_size": 4},
        **{"sampling.sde_eta": 0.7, "sampling.lower_order_final": lof},
    )
    model = models.get_model(config)
    params = model.init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]
    samples = _in_segments(config, model, params, 4 if method == "heun" else 2)  # 2 steps
    d, net = objectives.make_diffusion(config), models.model_fn(model, params)
    noise_key, key = jax.random.split(jax.random.fold_in(jax.random.key(5), 0))
    x_T = jax.random.normal(noise_key, (4, 8, 8, 1))
    if method == "heun":
        ref = ode.heun_sample(d, net, x_T, calls)
    elif method == "dpmpp_2m":
        ref = ode.dpmpp_2m_sample(d, net, x_T, calls, lower_order_final=lof)
    else:
        _, key_steps = dl.chain_keys(key)
        ref = ode.dpmpp_2m_sde_sample(d, net, x_T, key_steps, calls, eta=0.7)
        assert not np.allclose(ref, ode.dpmpp_2m_sample(d, net, x_T, calls), atol=1e-3)
    np.testing.assert_allclose(samples, ref, atol=2e-5)
    assert np.abs(np.asarray(ref)).max() <= 1.0  # clip_denoised: the last x0_hat is clipped


def test_the_distilled_sampler_is_ddim_on_its_grid_uniform_in_t():
    """The registry's ``distilled`` chain (segments of 2 steps) on a DDPM run against DDIM steps
    written here: x_{i+1} = alpha_{i+1} x0_hat + sigma_{i+1} eps_hat at t_i = 19 (5 - i) / 5,
    the last one x0_hat."""
    calls = 5
    config = tiny_config(
        **{"sampling.method": "distilled", "sampling.num_steps": calls, "sampling.batch_size": 4}
    )
    model = models.get_model(config)
    params = _random_params(model)
    samples = _in_segments(config, model, params, 2)
    d, net = objectives.make_diffusion(config), models.model_fn(model, params)
    noise_key, _ = jax.random.split(jax.random.fold_in(jax.random.key(5), 0))
    x = jax.random.normal(noise_key, (4, 8, 8, 1))
    times = 19.0 * np.arange(calls, 0, -1) / calls
    for i, t in enumerate(times):
        eps, x0 = dl.eps_and_x0(d, net, x, jnp.full((4,), t), clip_denoised=True)
        if i == calls - 1:
            x = x0
        else:
            alpha, sigma = (float(v) for v in dl.alpha_sigma(d, jnp.asarray(times[i + 1])))
            x = alpha * x0 + sigma * eps
    np.testing.assert_allclose(samples, x, atol=2e-5)


def _random_params(model, seed=1):
    """Initial parameters plus noise, so that the zero-initialised output layer hides nothing
    (small: a random network's chain amplifies rounding, x3 a step at 5 times this noise)."""
    params = model.init(
        jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32), train=False
    )["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + 0.01 * rng.standard_normal(p.shape, np.float32), params)


@pytest.mark.parametrize("method, calls", [("ancestral", 0), ("ddim", 5), ("dpmpp_2m", 6)])
@pytest.mark.parametrize("w", [0.0, 2.0])
def test_every_sampler_draws_class_i_mod_k_with_guidance(method, calls, w):
    """A conditional model's chunks (8 samples, chunks of 4 on 2 devices, sample i of class
    i mod 10) against the math core's loops with a network built here: the conditional output,
    and for w > 0 (1 + w) of it minus w times the output under "no class" (index 10)."""
    config = tiny_config(
        **{"model.num_classes": 10, "sampling.guidance_scale": w, "sampling.method": method},
        **{"sampling.num_steps": calls, "sampling.num_samples": 8, "sampling.batch_size": 4},
    )
    sampling.check_config(config)
    model = models.get_model(config)
    params = _random_params(model)
    samples = sampling.make_sample_fn(config, model, sharding.make_mesh())(
        params, jax.random.key(5)
    )
    np.testing.assert_array_equal(sampling.sample_labels(config, 8), np.arange(8) % 10)
    d = objectives.make_diffusion(config)

    def reference_net(labels):
        def fn(x, t):
            t = jnp.broadcast_to(t, (x.shape[0],))
            out = model.apply({"params": params}, x, t, labels)
            if not w:
                return out
            null = model.apply({"params": params}, x, t, jnp.full_like(labels, 10))
            mean = (1 + w) * out[..., :1] - w * null[..., :1]
            return jnp.concatenate([mean, out[..., 1:]], axis=-1)  # the variance: conditional

        return fn

    def reference(i, labels):
        net = reference_net(jnp.asarray(labels, jnp.int32))
        noise_key, key = jax.random.split(jax.random.fold_in(jax.random.key(5), i))
        x_T = jax.random.normal(noise_key, (4, 8, 8, 1))
        if method == "ancestral":
            return dl.p_sample_loop(d, net, (4, 8, 8, 1), key, x_T=x_T)
        if method == "ddim":
            return dl.ddim_sample_loop(d, net, (4, 8, 8, 1), key, calls, 0.0, x_T=x_T)
        return ode.dpmpp_2m_sample(d, net, x_T, calls)

    for i in range(2):
        labels = np.arange(4 * i, 4 * i + 4)
        np.testing.assert_allclose(samples[4 * i : 4 * i + 4], reference(i, labels), atol=1e-4)
    # The classes matter far beyond that tolerance: other labels give other samples.
    other = np.asarray(reference(0, [9, 8, 7, 6]))
    assert np.abs(other - samples[:4]).max() > 1e-3


def test_class_label_and_guidance_are_checked():
    config = tiny_config(**{"model.num_classes": 10, "sampling.class_label": 3})
    np.testing.assert_array_equal(sampling.sample_labels(config, 5), [3] * 5)
    assert sampling.sample_labels(tiny_config(), 5) is None  # unconditional: no labels
    config.sampling.class_label = 10
    with pytest.raises(ValueError, match=r"class_label=10 must be a class in \[0, 10\)"):
        sampling.check_config(config)
    config = tiny_config(**{"sampling.guidance_scale": 1.0})
    with pytest.raises(ValueError, match=r"need a class-conditional model"):
        sampling.check_config(config)
    config = tiny_config(**{"model.num_classes": 10, "sampling.guidance_scale": -1.0})
    with pytest.raises(ValueError, match=r"guidance_scale=-1.0 must be finite and >= 0"):
        sampling.check_config(config)


def _sample_config():
    from configs import digits
    from diffusion_jax import config as config_lib

    return config_lib.with_defaults(digits.get_config())


def _write_good_samples(config, workdir):
    good = np.linspace(-1, 1, 4 * 8 * 8).reshape(4, 8, 8, 1).astype(np.float32)
    sampling.sample_and_save(config, lambda p, k: good, {"w": np.ones(3)}, workdir)
    out = {n: (workdir / "samples" / n).read_bytes() for n in ("samples.npz", "samples.png")}
    assert len(out["samples.npz"]) > 1000 and out["samples.png"][:4] == b"\x89PNG"
    return out


def test_samples_that_are_not_finite_are_not_written_and_name_the_likely_cause(tmp_path):
    config = _sample_config()
    before = _write_good_samples(config, tmp_path)
    nan = np.zeros((4, 8, 8, 1), np.float32)
    nan[1, 2, 3] = np.nan
    for params, cause in (
        ({"w": np.ones(3)}, "the parameters are finite: the sampler diverged (sampling.method="),
        ({"w": np.array([1.0, np.nan, np.inf])}, "the parameters read hold 2 non-finite values"),
    ):
        with pytest.raises(FloatingPointError) as e:
            sampling.sample_and_save(config, lambda p, k: nan, params, str(tmp_path))
        message = str(e.value)
        assert "\n" not in message and message.startswith("1 of 4 samples are not finite")
        assert cause in message and f"nothing written to {tmp_path}/samples" in message
        for name, data in before.items():
            assert (tmp_path / "samples" / name).read_bytes() == data  # the previous ones


def test_a_full_disk_or_a_kill_while_writing_samples_keeps_the_previous_files(
    tmp_path, monkeypatch
):
    import errno
    import os

    from diffusion_jax import files

    config = _sample_config()
    before = _write_good_samples(config, tmp_path)
    other = np.zeros((4, 8, 8, 1), np.float32)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def killed(src, dst):
        raise KeyboardInterrupt  # between the temporary write and the rename

    for name, fault, error in (
        ("fsync", full, files.WriteError),
        ("replace", killed, KeyboardInterrupt),
    ):
        with monkeypatch.context() as m:
            m.setattr(os, name, fault)
            with pytest.raises(error) as e:
                sampling.sample_and_save(config, lambda p, k: other, {}, str(tmp_path))
        if error is files.WriteError:
            assert str(e.value) == (
                f"cannot write {tmp_path}/samples/samples.npz: No space left on device (ENOSPC); "
                "any previous version of it is kept."
            )
        assert sorted(os.listdir(tmp_path / "samples")) == ["samples.npz", "samples.png"]
        for n, data in before.items():
            assert (tmp_path / "samples" / n).read_bytes() == data
