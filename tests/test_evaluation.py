"""The evaluation package on a tiny untrained digits model (T = 20, 2 CPU devices): every
evaluator end to end, metrics.json rewritten after each, and a failing step that keeps the
numbers before it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from diffusion_jax import diffusion as dl
from diffusion_jax import evaluation, models, objectives, reporting, sharding, timesteps
from diffusion_jax.evaluation import plots


@pytest.fixture(scope="module")
def run():
    config = evaluation.prepare(tiny_config())
    model = models.get_model(config)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(0), x, t, train=False)["params"]
    mesh = sharding.make_mesh()
    return config, model, jax.device_put(params, sharding.replicated(mesh)), mesh


def context(run, workdir, **eval_keys):
    """The run's context with these ``eval`` keys (an evaluator's own as a dict: its section)."""
    config, model, params, mesh = run
    config = config.copy_and_resolve_references()
    for key, value in eval_keys.items():
        if isinstance(value, dict):
            config.eval[key].update(value)
        else:
            config.eval[key] = value
    return evaluation.EvalContext(config, model, params, mesh, str(workdir))


def test_bound_sums_equal_calc_bpd_loop(run, tmp_path):
    """Batches of 8 (2 devices), T in segments: the same terms as the one-scan bound."""
    ctx = context(run, tmp_path)
    config, model, params, _ = run
    out = evaluation.evaluate_bpd(config, model, params, ctx.mesh, "test", num_examples=10)
    assert out["num_examples"] == 10 and len(out["terms_bpd_per_t"]) == 20
    from diffusion_jax import input_pipeline

    images = input_pipeline.load_split(config, "test").images[:10]
    x0 = input_pipeline.to_model_space(jnp.asarray(images), config.data.num_bins)
    d, net = objectives.make_diffusion(config), models.model_fn(model, params)
    key = objectives.run_keys(config.seed)["eval"]
    clip = config.eval.clip_denoised
    ref = [dl.calc_bpd_loop(d, net, x0[:8], jax.random.fold_in(key, 0), clip, num_bins=17)]
    ref.append(dl.calc_bpd_loop(d, net, x0[8:], jax.random.fold_in(key, 1), clip, num_bins=17))
    total = np.concatenate([r["total_bpd"] for r in ref])
    assert out["bpd"] == pytest.approx(float(total.mean()), rel=1e-5)
    terms = np.concatenate([r["terms_bpd"] for r in ref]).mean(0)
    np.testing.assert_allclose(out["terms_bpd_per_t"], terms, rtol=1e-4, atol=1e-7)
    assert out["bpd_stderr"] == pytest.approx(float(total.std(ddof=1) / np.sqrt(10)), rel=1e-3)


def test_rate_distortion_reuses_the_bound_of_the_split(run, tmp_path):
    """bits/dim on 13 examples, then the rate-distortion sums on the first 10: the kept terms
    are summed again under the new mask (no network call), equal to a fresh pass on 10."""
    figures = ("rate_distortion",)
    ctx = context(run, tmp_path, figures=figures, rate_distortion={"num_examples": 10})
    whole = ctx.bound_sums("test", 13)
    params, ctx.params = ctx.params, None  # a pass through the network would fail now
    reused = ctx.bound_sums("test", 10)
    ctx.params = params
    fresh = context(run, tmp_path / "fresh", figures=figures).bound_sums("test", 10)
    assert float(whole["count"]) == 13 and float(reused["count"]) == float(fresh["count"]) == 10
    for name in fresh:
        np.testing.assert_allclose(reused[name], fresh[name], rtol=1e-6, atol=1e-9, err_msg=name)
    assert float(reused["bpd"]) != pytest.approx(float(whole["bpd"]), rel=1e-4)
    # Without the figure on this split nothing is kept: the same request runs the network.
    plain = context(run, tmp_path / "plain", figures=())
    plain.bound_sums("test", 13)
    assert ("bound_batches", "test") not in plain.cache
    assert ("bound_batches", "test") in ctx.cache


@pytest.mark.parametrize("sampler", ["stratified", "importance"])
def test_bound_estimate_is_the_sampled_bound_of_each_batch(run, tmp_path, sampler):
    """eval.bound_num_t = 5: bpd, its terms and standard error are those of
    diffusion.sampled_bound_terms on each batch, t drawn from the batch's key (importance: from
    the run's t distribution), L_T exact; metrics say which estimate; no per-t curves."""
    ctx = context(run, tmp_path, bound_num_t=5, bound_t_sampler=sampler)
    config, model, params, _ = run
    d, net = objectives.make_diffusion(ctx.config), models.model_fn(model, params)
    probs = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(20)), jnp.float32)
    ctx.cache["bound_t_probs"] = probs  # what bound_t_probs reads from a checkpoint
    out = evaluation.bpd_lib.bpd_of_split(ctx, "test", 10)
    from diffusion_jax import input_pipeline

    images = input_pipeline.load_split(config, "test").images[:10]
    x0 = input_pipeline.to_model_space(jnp.asarray(images), config.data.num_bins)
    key = jax.random.fold_in(objectives.run_keys(config.seed)["eval"], 0xB0)
    totals, decoder = [], []
    for i, rows in enumerate((slice(0, 8), slice(8, 10))):
        t_key, noise_key = jax.random.split(jax.random.fold_in(key, i))
        if sampler == "stratified":
            t, w = timesteps.stratified_bound_timesteps(t_key, 8, 20, 5)
        else:
            t, w = timesteps.importance_bound_timesteps(t_key, probs, 8, 5)
        xb = x0[rows] if i == 0 else jnp.concatenate([x0[rows], jnp.repeat(x0[:1], 6, 0)])
        o = dl.sampled_bound_terms(d, net, xb, noise_key, t, w, config.eval.clip_denoised, 17)
        n = 8 if i == 0 else 2
        totals.append((o["decoder_bpd"] + o["kl_bpd"] + dl.prior_bpd(d, xb))[:n])
        decoder.append(o["decoder_bpd"][:n])
    total = np.concatenate(totals)
    assert out["bound_estimate"] == {"kind": sampler, "num_t": 5}
    assert out["bpd"] == pytest.approx(float(total.mean()), rel=1e-5)
    assert out["bpd_stderr"] == pytest.approx(float(total.std(ddof=1) / np.sqrt(10)), rel=1e-3)
    L0 = float(np.concatenate(decoder).mean())
    assert out["bpd_terms"]["decoder_L0"] == pytest.approx(L0, rel=1e-3, abs=1e-8)
    assert "terms_bpd_per_t" not in out and out["num_examples"] == 10
    assert evaluation.EVALUATORS["lt_curve"].skip(ctx) is None


def test_every_evaluator_end_to_end(run, tmp_path):
    """Another split's bpd, L_t plot, rate-distortion, progressive strip; FID requested without
    weights -> skipped with a reason, no number."""
    ctx = context(
        run,
        tmp_path,
        metrics=("bpd", "fid", "is"),
        figures=("lt_curve", "rate_distortion", "progressive"),
        bpd_splits=("train",),
        rate_distortion={"num_examples": 8},
        progressive={"num_samples": 2, "num_frames": 4},
    )
    assert evaluation.wanted(ctx.config) == [
        "bpd",
        "bpd_splits",
        "lt_curve",
        "rate_distortion",
        "progressive",
        "fid",
        "is",
    ]
    out = evaluation.run_evaluators(ctx)
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["bpd"] == out["bpd"]
    train = out["bpd_by_split"]["train"]
    assert train["split"] == "train" and train["num_examples"] == 16
    assert out["bpd_by_split"]["test"]["bpd"] == out["bpd"]
    rd = json.load(open(out["rate_distortion"]["path"]))
    assert rd["num_examples"] == 8 and len(rd["rate_bpd"]) == 20
    assert np.all(np.diff(rd["rate_bpd"]) <= 1e-7)
    assert out["progressive"]["t_of_columns"] == [15, 10, 5, 0]
    assert tuple(out["progressive"]["shape"]) == (2 * 9 + 1, 4 * 9 + 1, 1)
    for name in ("lt_curve", "rate_distortion", "progressive"):
        assert 0 < os.path.getsize(out["figures"][name]) < 200_000
    assert "fid" not in out and "inception_score" not in out
    assert "No Inception weights configured" in out["fid_skipped"]


def test_with_an_estimated_bound_the_lt_curve_is_the_rate_distortion_pass(
    run, tmp_path, monkeypatch
):
    """eval.bound_num_t = 5: bits/dim from 5 t per example; the L_t curve and the rate-distortion
    curve share one full per-t pass over eval.rate_distortion.num_examples = 8 examples."""
    ctx = context(
        run,
        tmp_path,
        bound_num_t=5,
        figures=("lt_curve", "rate_distortion"),
        rate_distortion={"num_examples": 8},
    )
    drawn = {}

    def plot(terms, path, mse=None, title=None):
        drawn.update(terms=np.asarray(terms), mse=np.asarray(mse), title=title)

    monkeypatch.setattr(plots, "plot_lt_curve", plot)
    out = evaluation.run_evaluators(ctx)
    assert out["bound_estimate"] == {"kind": "stratified", "num_t": 5}
    assert [k for k in ctx.cache if k[0] == "bound"] == [("bound", "test", 8)]  # one pass
    total = ctx.cache[("bound", "test", 8)]
    np.testing.assert_allclose(drawn["terms"], total["terms_bpd"] / 8)
    np.testing.assert_allclose(drawn["mse"], total["mse"] / 8)
    assert drawn["title"] == (
        f"L_t on 8 test examples, sum {float(total['kl_bpd']) / 8:.4f} bits/dim"
    )
    rd = json.load(open(out["rate_distortion"]["path"]))
    np.testing.assert_allclose(rd["terms_bpd"], drawn["terms"], rtol=1e-6)
    assert "lt_curve" in out["figures"] and "failed" not in out


def test_a_failing_step_keeps_the_numbers_before_it(run, tmp_path, monkeypatch):
    """matplotlib missing: the bound is on disk, both plots are named as failed in one line,
    the progressive strip (no matplotlib) is still drawn, and evaluate raises at the end."""

    def no_matplotlib():
        raise ModuleNotFoundError("No module named 'matplotlib'")

    monkeypatch.setattr(plots, "_pyplot", no_matplotlib)
    writes = []
    real_write = reporting.write_json
    monkeypatch.setattr(
        reporting, "write_json", lambda path, obj: (writes.append(dict(obj)), real_write(path, obj))
    )
    ctx = context(run, tmp_path, figures=("lt_curve", "rate_distortion", "progressive"))
    with pytest.raises(evaluation.EvaluationError) as e:
        evaluation.run_evaluators(ctx)
    message = str(e.value)
    assert "\n" not in message and message.startswith("2 evaluation step(s) failed: lt_curve (")
    assert "rate_distortion (ModuleNotFoundError: No module named 'matplotlib')" in message
    assert "bpd" in writes[0] and "progressive" not in writes[0]  # written as soon as known
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert np.isfinite(saved["bpd"]) and "progressive" in saved
    assert set(saved["failed"]) == {"lt_curve", "rate_distortion"}
    assert os.path.exists(saved["figures"]["progressive"])


def test_the_eval_config_is_checked():
    evaluation.check_config(evaluation.prepare(tiny_config()))
    config = evaluation.prepare(tiny_config())
    config.eval.figures = ("rate_distortion", "fig7")
    with pytest.raises(ValueError, match=r"\['fig7'\]; allowed: \('lt_curve', 'rate_distortion'"):
        evaluation.check_config(config)
    config = evaluation.prepare(tiny_config())
    config.eval.metrics = ("bpd", "fid")
    config.eval.inception.sha256 = "abc"
    with pytest.raises(ValueError, match="64 hex digits"):
        evaluation.check_config(config)
    config.eval.inception.sha256 = ""
    config.eval.inception.batch_size = 3  # 2 devices
    with pytest.raises(ValueError, match="eval.inception.batch_size=3"):
        evaluation.check_config(config)
    config = evaluation.prepare(tiny_config())  # T = 20
    for bad in (-1, 20):
        config.eval.bound_num_t = bad
        with pytest.raises(ValueError, match=r"eval.bound_num_t=.* must be 0 .* \[1, T - 1 = 19\]"):
            evaluation.check_config(config)
    config.eval.bound_num_t, config.eval.bound_t_sampler = 5, "sobol"
    with pytest.raises(ValueError, match=r"bound_t_sampler='sobol' is not one of \('strat"):
        evaluation.check_config(config)
    config.eval.bound_t_sampler, config.diffusion.t_sampler = "importance", "uniform"
    config.diffusion.loss_type = "simple"
    with pytest.raises(ValueError, match=r"only a loss-aware run keeps .*'uniform'"):
        evaluation.check_config(config)


def test_a_config_without_the_eval_keys_gets_their_defaults():
    config = tiny_config()
    with config.unlocked():
        for key in ("figures", "bpd_splits", "rate_distortion", "inception"):
            del config.eval[key]
    prepared = evaluation.prepare(config)
    assert prepared.eval.figures == ("lt_curve", "rate_distortion", "progressive")
    assert evaluation.wanted(prepared) == ["bpd", "lt_curve", "rate_distortion", "progressive"]


def test_bpd_ode_is_the_mean_of_ode_bpd_over_the_examples(run, tmp_path):
    """The evaluator (batches of 8, the last padded, 2 devices) against ``ode.ode_bpd`` called
    here batch by batch with the evaluator's keys."""
    from diffusion_jax import input_pipeline, ode

    ctx = context(run, tmp_path, bpd_ode={"num_examples": 10, "rtol": 1e-3, "atol": 1e-3})
    out = evaluation.EVALUATORS["bpd_ode"].run(ctx)
    config, model, params, _ = run
    images = input_pipeline.load_split(config, "test").images[:16]
    x0 = input_pipeline.to_model_space(jnp.asarray(images), config.data.num_bins)
    x0 = jnp.concatenate([x0[:10], jnp.repeat(x0[:1], 6, axis=0)])  # eval_batches' padding
    key = jax.random.fold_in(objectives.run_keys(config.seed)["eval"], 0x0DE)
    d, net = objectives.make_diffusion(config), models.model_fn(model, params)
    ref = [
        ode.ode_bpd(d, net, x0[8 * i : 8 * i + 8], jax.random.fold_in(key, i), 17, 1e-3, 1e-3)
        for i in range(2)
    ]
    values = np.concatenate([ref[0]["bpd"], ref[1]["bpd"][:2]])
    assert out["bpd_ode_num_examples"] == 10
    assert out["bpd_ode"] == pytest.approx(float(values.mean()), rel=1e-4)
    assert out["bpd_ode_stderr"] == pytest.approx(float(values.std(ddof=1) / np.sqrt(10)), rel=1e-3)
    assert out["bpd_ode_nfe_per_batch"] == [int(r["nfe"]) for r in ref]


def test_a_bound_that_is_not_finite_is_not_the_result(run, tmp_path, monkeypatch):
    """Issue 41 row 4: a NaN bpd is a failed evaluator naming the likely cause, not a number."""
    import dataclasses
    import json

    fake = evaluation.EVALUATORS["bpd"]
    fake = dataclasses.replace(fake, run=lambda ctx: {"bpd": float("nan"), "bpd_stderr": 0.1})
    monkeypatch.setitem(evaluation.EVALUATORS, "bpd", fake)
    ctx = context(run, tmp_path, metrics=("bpd",), figures=())
    for params, cause in (
        (ctx.params, "the parameters are finite"),
        ({"w": np.array([np.nan, 1.0])}, "the parameters read hold 1 non-finite values"),
    ):
        with pytest.raises(evaluation.EvaluationError) as e:
            evaluation.run_evaluators(dataclasses.replace(ctx, params=params, metrics={}))
        assert "bpd (bpd = nan is not finite, not reported as the result; likely cause: " in str(
            e.value
        )
        assert cause in str(e.value) and "\n" not in str(e.value)
        saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert "bpd" not in saved and "bpd" in saved["failed"]
    # Any result of an evaluator (not its spread: one example has no standard error).
    for out, failed in (
        ({"bpd": 1.5, "bpd_stderr": float("nan")}, None),
        ({"bpd": 1.5, "inception_score": float("inf")}, "inception_score = inf is not finite"),
    ):
        monkeypatch.setitem(
            evaluation.EVALUATORS, "bpd", dataclasses.replace(fake, run=lambda ctx, out=out: out)
        )
        if failed is None:
            assert evaluation.run_evaluators(dataclasses.replace(ctx, metrics={}))["bpd"] == 1.5
        else:
            with pytest.raises(evaluation.EvaluationError, match=failed):
                evaluation.run_evaluators(dataclasses.replace(ctx, metrics={}))


def test_a_full_disk_keeps_the_previous_metrics_and_is_one_line(run, tmp_path, monkeypatch):
    """Issue 41 row 9: ENOSPC from the write of metrics.json: the old file whole, one line."""
    import dataclasses
    import errno
    import os

    from diffusion_jax import files

    fake = evaluation.EVALUATORS["bpd"]
    monkeypatch.setitem(
        evaluation.EVALUATORS, "bpd", dataclasses.replace(fake, run=lambda ctx: {"bpd": 1.5})
    )
    ctx = context(run, tmp_path, metrics=("bpd",), figures=())
    evaluation.run_evaluators(ctx)
    path = tmp_path / "eval" / "metrics.json"
    old = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.WriteError) as e:
        evaluation.run_evaluators(dataclasses.replace(ctx, metrics={"checkpoint_step": 9}))
    assert str(e.value) == (
        f"cannot write {path}: No space left on device (ENOSPC); any previous version of it is "
        "kept."
    )
    assert path.read_bytes() == old and os.listdir(path.parent) == ["metrics.json"]
