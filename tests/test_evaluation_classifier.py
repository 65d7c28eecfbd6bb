"""The offline sample-quality metric: a small classifier trained on the digits' labels (2 CPU
devices), its cache, the Fréchet distance and IS of its features against independent NumPy/SciPy
references, and the two evaluators end to end on a tiny untrained model."""

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from helpers import tiny_config

from configs import toy_moons
from diffusion_jax import evaluation, input_pipeline, models, objectives, sampling, sharding
from diffusion_jax.evaluation import classifier as clf
from diffusion_jax.evaluation import judge

FAST = {"train_steps": 150, "num_bootstrap": 10}


def digits_config(metrics=None, **classifier_keys):
    """The tiny digits config with these ``eval.classifier`` keys (and ``eval.metrics``)."""
    config = evaluation.prepare(tiny_config())
    if metrics is not None:
        config.eval.metrics = metrics
    for key, value in {**FAST, **classifier_keys}.items():
        config.eval.classifier[key] = value
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained on the training digits, cached in a module-wide workdir."""
    config = digits_config()
    workdir = str(tmp_path_factory.mktemp("classifier"))
    model, params, info = judge.load_or_train(config, judge.classifier_dir(workdir))
    return config, workdir, model, params, info


def test_the_classifier_is_accurate_on_the_test_digits(trained):
    config, _, model, params, info = trained
    test = input_pipeline.load_split(config, "test")
    logits, features = judge.predict(model, params, test.images, config.data.num_bins)
    assert logits.shape == (297, 10) and features.shape == (297, config.eval.classifier.feature_dim)
    accuracy = float(np.mean(logits.argmax(axis=1) == test.labels))
    assert accuracy >= 0.95
    assert info["test_accuracy"] == pytest.approx(accuracy)
    assert info["num_test_examples"] == 297 and info["num_classes"] == 10


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3)])
def test_the_network_takes_mnist_and_cifar_sizes(size, channels):
    from diffusion_jax.models.classifier import Classifier

    model = Classifier(10, width=4, feature_dim=8)
    x = jnp.zeros((2, size, size, channels))
    (logits, features), _ = jax.eval_shape(model.init_with_output, jax.random.key(0), x)
    assert logits.shape == (2, 10) and features.shape == (2, 8)


def test_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    config = digits_config(train_steps=5)
    a = judge.load_or_train(config, str(tmp_path / "a"))
    b = judge.load_or_train(config, str(tmp_path / "b"))
    jax.tree.map(np.testing.assert_array_equal, a[1], b[1])  # same seed: the same parameters
    info = json.load(open(tmp_path / "a" / "classifier.json"))
    assert info["fingerprint"]["seed"] == config.seed and info["train_steps"] == 5
    assert info["test_accuracy"] == a[2]["test_accuracy"]

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(judge, "train_classifier", no_training)
    model, params, cached = judge.load_or_train(config, str(tmp_path / "a"))  # from the cache
    jax.tree.map(np.testing.assert_array_equal, params, a[1])
    assert cached["params_sha256"] == a[2]["params_sha256"]
    # Another fingerprint (seed, settings) or parameters failing their checksum: trained again.
    with pytest.raises(AssertionError, match="trained again"):
        judge.load_or_train(digits_config(train_steps=6), str(tmp_path / "a"))
    other_seed = digits_config(train_steps=5)
    other_seed.seed = 1
    with pytest.raises(AssertionError, match="trained again"):
        judge.load_or_train(other_seed, str(tmp_path / "a"))
    with open(tmp_path / "a" / "classifier.msgpack", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(AssertionError, match="trained again"):
        judge.load_or_train(config, str(tmp_path / "a"))


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance with tr((S1 S2)^(1/2)) = tr((S1^(1/2) S2 S1^(1/2))^(1/2)), both square
    roots from np.linalg.eigh (exact for the singular covariances of ReLU features)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)

    def psd_sqrt(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    root = psd_sqrt(s1)
    tr_covmean = np.trace(psd_sqrt(root @ s2 @ root))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def reference_is(logits: np.ndarray) -> float:
    p = scipy.special.softmax(logits.astype(np.float64), axis=1)
    p_y = p.mean(0)
    return float(np.exp(np.mean(np.sum(p * (np.log(p + 1e-300) - np.log(p_y)), axis=1))))


def test_fd_and_is_against_textbook_formulas_and_scale(trained):
    config, workdir, model, params, _ = trained
    bins = config.data.num_bins
    train = input_pipeline.load_split(config, "train").images
    test = input_pipeline.load_split(config, "test").images
    noise = np.random.default_rng(0).integers(0, bins, (400, 8, 8, 1), dtype=np.uint8)
    _, test_features = judge.predict(model, params, test, bins)

    same = clf.classifier_metrics(config, test, workdir)
    assert abs(same["fd_classifier"]) < 1e-6  # the test set against itself

    real = clf.classifier_metrics(config, train[:400], workdir)
    logits, features = judge.predict(model, params, train[:400], bins)
    assert real["fd_classifier"] == pytest.approx(reference_fd(features, test_features), rel=1e-4)
    assert real["is_classifier"] == pytest.approx(reference_is(logits), rel=1e-6)
    shares = [np.mean(np.argmax(logits, axis=1) == c) for c in range(10)]  # the judge's classes
    np.testing.assert_allclose(real["classifier_class_shares"], shares, rtol=1e-12)
    assert min(shares) > 0.05  # 400 real training digits: every class present
    assert real["classifier_num_samples"] == real["classifier_num_real"] == 400
    assert real["classifier_reference"] == {"split": "test", "num_examples": 297}

    fake = clf.classifier_metrics(config, noise, workdir)
    logits, features = judge.predict(model, params, noise, bins)
    assert fake["fd_classifier"] == pytest.approx(reference_fd(features, test_features), rel=1e-4)
    assert fake["is_classifier"] == pytest.approx(reference_is(logits), rel=1e-6)
    # Real training digits are close to the test digits on the scale of noise images.
    assert real["fd_classifier"] < 0.1 * fake["fd_classifier"]
    assert real["is_classifier"] > fake["is_classifier"]
    # The real-vs-real value: a seeded subset of 400 training digits, whatever the samples.
    assert fake["fd_classifier_real"] == real["fd_classifier_real"] < 0.1 * fake["fd_classifier"]
    assert 8 < fake["is_classifier_real"] <= 10  # about 10 equally frequent, confident classes
    # Bootstrap errors: positive, reproducible, smaller than the gap between real and noise.
    again = clf.classifier_metrics(config, noise, workdir)
    assert again == fake
    for m in (real, fake):
        assert 0 < m["fd_classifier_stderr"] < 0.5 * (fake["fd_classifier"] - real["fd_classifier"])
        assert 0 < m["is_classifier_stderr"] < 0.5 * (real["is_classifier"] - fake["is_classifier"])


def test_kid_and_precision_recall_of_the_classifier_features(trained):
    """KID on the features in units of the reference's RMS coordinate (an independent unbiased
    MMD² here), precision / recall on equal-size sets; real digits score near the real-vs-real
    values, noise images far from them, apart by many standard errors."""
    config, workdir, model, params, _ = trained
    bins = config.data.num_bins
    train = input_pipeline.load_split(config, "train").images
    test = input_pipeline.load_split(config, "test").images
    noise = np.random.default_rng(0).integers(0, bins, (400, 8, 8, 1), dtype=np.uint8)
    _, ref = judge.predict(model, params, test, bins)
    scale = np.sqrt(np.mean(np.square(ref.astype(np.float64))))
    real = clf.classifier_metrics(config, train[:400], workdir)
    fake = clf.classifier_metrics(config, noise, workdir)
    for m, images in ((real, train[:400]), (fake, noise)):
        _, feats = judge.predict(model, params, images, bins)
        x, y = feats / scale, ref / scale
        k = lambda a, b: (a @ b.T / a.shape[1] + 1.0) ** 3
        kxx, kyy = k(x, x), k(y, y)
        want = (
            (kxx.sum() - np.trace(kxx)) / (len(x) * (len(x) - 1))
            + (kyy.sum() - np.trace(kyy)) / (len(y) * (len(y) - 1))
            - 2 * k(x, y).mean()
        )
        assert m["kid_classifier"] == pytest.approx(want, rel=1e-6)
        assert m["classifier_pr_num"] == 297  # the 400 samples cut to the reference's size
        for key in clf.KID_KEYS + clf.PR_KEYS:
            assert key in m
    assert fake["kid_classifier"] > real["kid_classifier"] + 10 * fake["kid_classifier_stderr"]
    assert fake["precision_classifier"] < 0.1 < 0.8 < real["precision_classifier"]
    assert real["precision_classifier"] - fake["precision_classifier"] > 10 * (
        real["precision_classifier_stderr"] + fake["precision_classifier_stderr"]
    )
    assert real["recall_classifier"] > 0.8 and fake["recall_classifier"] < 0.5
    assert abs(real["kid_classifier_real"]) < 0.1 * fake["kid_classifier"]
    assert real["precision_classifier_real"] > 0.8 and real["recall_classifier_real"] > 0.8


def test_samples_that_are_not_levels_are_refused(trained):
    config, workdir, *_ = trained
    with pytest.raises(ValueError, match=r"uint8 levels below data.num_bins=17.*got float32"):
        clf.classifier_metrics(config, np.zeros((4, 8, 8, 1), np.float32), workdir)
    with pytest.raises(ValueError, match=r"max 200"):
        clf.classifier_metrics(config, np.full((4, 8, 8, 1), 200, np.uint8), workdir)


def untrained(config):
    model = models.get_model(config)
    x, t = jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32)
    params = model.init(jax.random.key(0), x, t, train=False)["params"]
    mesh = sharding.make_mesh()
    return model, jax.device_put(params, sharding.replicated(mesh)), mesh


def test_the_evaluators_end_to_end(tmp_path, monkeypatch):
    config = digits_config(
        metrics=("bpd", *clf.METRICS),
        num_samples=8,
        train_steps=20,
        num_bootstrap=5,
    )
    model, params, mesh = untrained(config)
    calls = []
    real_make = sampling.make_sample_fn
    monkeypatch.setattr(
        sampling, "make_sample_fn", lambda *a, **k: (calls.append(a[0]), real_make(*a, **k))[1]
    )
    out = evaluation.run_evaluators(
        evaluation.EvalContext(config, model, params, mesh, str(tmp_path))
    )
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    for key in clf.FD_KEYS + clf.IS_KEYS + clf.KID_KEYS + clf.PR_KEYS + ("bpd",):
        assert key in saved and saved[key] == out[key]
    assert out["classifier_num_samples"] == 8 and "failed" not in saved
    assert np.isfinite(out["fd_classifier"]) and 1 <= out["is_classifier"] <= 10
    # One sample set for the four evaluators, drawn by the config's sampler, 8 samples.
    assert len(calls) == 1 and calls[0].sampling.num_samples == 8
    folder = tmp_path / "eval" / "classifier"
    (npz,) = [f for f in os.listdir(folder) if f.startswith("samples_")]
    with np.load(folder / npz) as f:
        samples = f["images"]
    # The cached samples are the sampler's with the documented key, rounded to the data's levels.
    cfg = config.copy_and_resolve_references()
    cfg.sampling.num_samples = 8
    key = jax.random.fold_in(objectives.run_keys(config.seed)["sample"], 0xC15A)
    x = real_make(cfg, model, mesh)(params, key)
    np.testing.assert_array_equal(samples, input_pipeline.to_uint8_levels(x, 17))
    assert out == {**out, **clf.classifier_metrics(config, samples, str(tmp_path))}

    # A second evaluation of the same parameters reads the classifier and the samples.
    monkeypatch.setattr(sampling, "make_sample_fn", lambda *a, **k: pytest.fail("sampled again"))
    monkeypatch.setattr(judge, "train_classifier", lambda *a, **k: pytest.fail("trained again"))
    again = evaluation.run_evaluators(
        evaluation.EvalContext(config, model, params, mesh, str(tmp_path))
    )
    assert again["fd_classifier"] == out["fd_classifier"]


def test_unlabelled_data_skips_both_with_one_line(tmp_path, caplog):
    config = toy_moons.get_config()
    config.eval.metrics, config.eval.figures = ("fd_classifier", "is_classifier"), ()
    config = evaluation.prepare(config)
    ctx = evaluation.EvalContext(config, None, None, sharding.make_mesh(), str(tmp_path))
    with caplog.at_level(logging.WARNING):
        out = evaluation.run_evaluators(ctx)
    assert out == {}
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert lines[0] == (
        "eval fd_classifier: skipped, it needs labelled images "
        "(data.dataset='moons' is a toy data set, which has no labels)."
    )

    # Images without labels (an .npz of digits with no `labels`): skipped, saying why.
    images = input_pipeline.load_split(tiny_config(), "train").images
    np.savez(tmp_path / "nolabels.npz", images=images)
    config = digits_config(metrics=("fd_classifier",))
    config.data.dataset = str(tmp_path / "nolabels.npz")
    ctx = evaluation.EvalContext(config, None, None, sharding.make_mesh(), str(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluation.run_evaluators(ctx) == {}
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "needs labelled images" in line and "nolabels.npz holds no 'labels' array" in line


def test_bad_classifier_keys_are_named():
    config = digits_config(num_samples=1)
    with pytest.raises(
        ValueError, match=r"eval.classifier.num_samples=1; allowed: an integer >= 2"
    ):
        judge.check_config(config)
    config = digits_config(learning_rate=0.0)
    with pytest.raises(ValueError, match=r"classifier.learning_rate=0.0; allowed: a number > 0"):
        judge.check_config(config)


def test_against_the_training_split_the_real_values_come_from_held_out_digits(tmp_path):
    """With eval.classifier.split = the training split, the real-vs-real value is that of the
    test digits (all 297: fewer than asked), never of training digits inside the reference."""
    config = digits_config(split="train")
    samples = input_pipeline.load_split(config, "test").images[:50]
    out = clf.classifier_metrics(config, samples, str(tmp_path))
    assert out["classifier_reference"] == {"split": "train", "num_examples": 1500}
    assert out["classifier_num_real"] == 50
    # the first 50 test digits scored as samples, and a seeded 50 of them as the real set:
    # both are test digits, so their distances to the training digits are of one size
    assert out["fd_classifier_real"] == pytest.approx(out["fd_classifier"], rel=0.5)
    config = digits_config(split="train", num_samples=400)
    many = clf.classifier_metrics(
        config, input_pipeline.load_split(config, "train").images[:400], str(tmp_path)
    )
    assert many["classifier_num_real"] == 297  # the whole test split


def test_class_match_of_real_digits_with_their_labels_and_with_others(trained):
    """The test digits asked for their own class match as often as the classifier is right;
    asked for the next class, almost never; the share and its error by their formulas."""
    config, workdir, model, params, info = trained
    test = input_pipeline.load_split(config, "test")
    logits, _ = judge.predict(model, params, test.images, config.data.num_bins)
    right = logits.argmax(axis=1) == test.labels  # [297]
    own = clf.classifier_metrics(config, test.images, workdir, labels=test.labels)
    assert own["class_match"] == pytest.approx(right.mean()) == pytest.approx(info["test_accuracy"])
    p = right.mean()
    assert own["class_match_stderr"] == pytest.approx(np.sqrt(p * (1 - p) / 297))
    for k, share in enumerate(own["class_match_per_class"]):
        assert share == pytest.approx(right[test.labels == k].mean())
    other = clf.classifier_metrics(config, test.images, workdir, labels=(test.labels + 1) % 10)
    assert other["class_match"] < 0.05
    # Classes never asked for are None; the FD and IS do not depend on the labels.
    some = clf.class_match(np.eye(10)[[1, 1, 2]], np.array([1, 0, 2]), 10)
    assert some["class_match_per_class"][:3] == [0.0, 1.0, 1.0]
    assert some["class_match_per_class"][3:] == [None] * 7
    assert other["fd_classifier"] == own["fd_classifier"]
