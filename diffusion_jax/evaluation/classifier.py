"""Sample quality with no download: a small classifier trained on the data set's own labels.

FID needs Inception weights that an offline machine cannot fetch; for a labelled data set this
module trains its own judge instead (``models.classifier.Classifier``, a few conv layers and two
dense ones) and reports, for a set of samples,

- ``fd_classifier``: the Fréchet distance (``fid.frechet_distance``) between the Gaussians fitted
  (``fid.FeatureStats``) to the classifier's penultimate features of the samples and of the
  reference split (``eval.classifier.split``, "" = ``eval.split``);
- ``is_classifier``: exp(E_x KL(p(y | x) || p(y))), p(y) the mean of p(y | x) over the samples:
  ``fid.inception_score`` over one split, so between 1 and the number of classes K;
- ``kid_classifier``: the Kernel Inception Distance (``sample_metrics.kid_with_stderr``: the
  unbiased cubic-kernel MMD², its standard error by the jackknife over the samples) of the same
  features against the reference split's;
- ``precision_classifier`` / ``recall_classifier`` (the evaluator ``precision_recall_classifier``):
  the k-NN manifold precision and recall, k = 3 (``sample_metrics.precision_recall``, binomial
  standard errors), on equal numbers of samples and reference images; KID and these two on the
  features in units of the reference's RMS coordinate (``_kid_pr``);

each with, for scale, the same statistic of as many real training images as samples (``_real``:
FD real train vs the reference split; IS of those real images), and for FD and IS a bootstrap
standard error
(``_stderr``): the standard deviation (ddof 1) of the statistic over
``eval.classifier.num_bootstrap`` resamplings of the samples with replacement (the reference
statistics held fixed), rows from key fold_in(fold_in(key(seed), 0xB007), N). It measures the
spread due to the finite sample set only; a resampled set repeats rows, so the bootstrap FDs sit a
little above the FD itself.

The classifier, trained once and cached, is ``evaluation.judge``'s. The reference split's
statistics and the real-vs-real values are cached beside it, so ``classifier_metrics`` called
for sample set after sample set (one per sampler, say) costs one forward pass of the samples and
the bootstrap. Samples are first rounded to the data's levels
(``input_pipeline.to_uint8_levels``), so samples and data are judged on the same footing.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import files, input_pipeline, objectives, reporting, sampling
from diffusion_jax.evaluation import fid as fid_lib
from diffusion_jax.evaluation import sample_metrics
from diffusion_jax.evaluation.context import EvalContext
from diffusion_jax.evaluation.judge import (
    _digest,
    _labelled_split,
    classifier_dir,
    get_classifier,
    load_or_train,
    predict,
    reference_split,
)
from diffusion_jax.models.classifier import Classifier

FD_KEYS = (
    "fd_classifier",
    "fd_classifier_stderr",
    "fd_classifier_real",
    "classifier_test_accuracy",
    "classifier_num_samples",
    "classifier_num_real",
    "classifier_reference",
)
IS_KEYS = (
    "is_classifier",
    "is_classifier_stderr",
    "is_classifier_real",
    "classifier_class_shares",  # [K] the share of the samples the classifier puts in each class
    "classifier_test_accuracy",
    "classifier_num_samples",
    "classifier_num_real",
)
KID_KEYS = (
    "kid_classifier",
    "kid_classifier_stderr",
    "kid_classifier_real",
    "classifier_test_accuracy",
    "classifier_num_samples",
    "classifier_num_real",
    "classifier_reference",
)
PR_KEYS = (
    "precision_classifier",
    "precision_classifier_stderr",
    "precision_classifier_real",
    "recall_classifier",
    "recall_classifier_stderr",
    "recall_classifier_real",
    "classifier_pr_k",
    "classifier_pr_num",
    "classifier_test_accuracy",
    "classifier_num_samples",
    "classifier_num_real",
    "classifier_reference",
)
METRICS = ("fd_classifier", "is_classifier", "kid_classifier", "precision_recall_classifier")


_SAMPLE_TAG = 0xC15A  # fold_in(run sample key, ·): the samples judged
_REAL_TAG = 0x5EA1  # fold_in(key(seed), ·): the real training images of the real-vs-real values
_BOOTSTRAP_TAG = 0xB007  # fold_in(key(seed), ·): the bootstrap resamplings
_PR_TAG = 0x9E  # fold_in(key(seed), ·): the equal-size subsets of precision / recall
_REAL_VERSION = 2  # of the cached real-vs-real values: another value computes them again


# ----------------------------------------------------------------------------- statistics


def _cache_tag(info: dict) -> str:
    """Names the statistics of one classifier (its parameters) on one data set and split."""
    return _digest([info["fingerprint"], info["params_sha256"]])[:16]


def _stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    stats = fid_lib.FeatureStats(features.shape[1])
    stats.update(features)
    return stats.mean, stats.covariance()


def _reference(
    config: ml_collections.ConfigDict, model: Classifier, params: Any, info: dict, cache_dir: str
) -> dict[str, np.ndarray]:
    """mu [F], sigma [F, F] and the features [N, F] of the reference split, cached beside the
    classifier (a cache of an earlier version, without the features, is computed again)."""
    path = os.path.join(cache_dir, f"reference_{_cache_tag(info)}.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            if "features" in f.files:
                return {k: f[k] for k in f.files}
    test = _labelled_split(config, reference_split(config))
    _, features = predict(model, params, test.images, config.data.num_bins)
    mu, sigma = _stats(features)
    out = dict(mu=mu, sigma=sigma, features=features, num_examples=np.int64(len(features)))
    _save_npz(path, out)
    return out


def _real_values(
    config: ml_collections.ConfigDict,
    model: Classifier,
    params: Any,
    info: dict,
    reference: dict[str, np.ndarray],
    num: int,
    cache_dir: str,
) -> dict[str, Any]:
    """The statistics of min(num, N) real images held out from the reference (a seeded subset,
    no repeats), cached per ``num``: what ``num`` perfect samples would score. They are training
    images, or the ``eval.split`` images when the reference is the training split itself."""
    path = os.path.join(cache_dir, f"real_{num}_{_cache_tag(info)}.json")
    if os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
        if cached.get("version") == _REAL_VERSION:  # else an earlier version's: again
            return cached
    real_split = config.data.train_split
    if reference_split(config) == real_split:
        real_split = config.eval.split
    train = _labelled_split(config, real_split)
    key = jax.random.fold_in(jax.random.key(config.seed), _REAL_TAG)
    rows = np.asarray(jax.random.permutation(key, train.num_examples))[:num]
    logits, features = predict(model, params, train.images[rows], config.data.num_bins)
    mu, sigma = _stats(features)
    out = dict(
        fd_classifier_real=fid_lib.frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        is_classifier_real=fid_lib.inception_score(_softmax(logits), 1)[0],
        **{
            f"{k}_real": v
            for k, v in _kid_pr(config, features, reference["features"]).items()
            if k in ("kid_classifier", "precision_classifier", "recall_classifier")
        },
        classifier_num_real=len(rows),
        version=_REAL_VERSION,
    )
    reporting.write_json(path, out)
    return out


def _kid_pr(config: ml_collections.ConfigDict, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """KID (± jackknife) and precision / recall (± binomial) of features x [m, F] against the
    reference's y [n, F], under this module's key names.

    Both on features divided by the reference's root-mean-square coordinate (one fixed scale
    per judge, so that y·y / F averages 1, the scale of Inception features for which KID's
    kernel (a·b / F + 1)^3 was made; unscaled, this classifier's features make it a sum of huge
    powers). Precision and recall on sets of equal size (Kynkäänniemi et al. compare equal
    numbers: a k-NN manifold of fewer points has larger balls): the larger set is cut to the
    smaller's size by a seeded permutation (key fold_in(key(seed), 0x9E)).
    """
    scale = np.sqrt(np.mean(np.square(np.asarray(y, np.float64))))
    x, y = np.asarray(x, np.float64) / scale, np.asarray(y, np.float64) / scale
    kid, kid_stderr = sample_metrics.kid_with_stderr(x, y)
    n = min(len(x), len(y))
    key = jax.random.fold_in(jax.random.key(config.seed), _PR_TAG)
    x_pr = x[np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), len(x)))[:n]]
    y_pr = y[np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), len(y)))[:n]]
    pr = sample_metrics.precision_recall(x_pr, y_pr)
    return dict(
        kid_classifier=kid,
        kid_classifier_stderr=kid_stderr,
        precision_classifier=pr["precision"],
        precision_classifier_stderr=pr["precision_stderr"],
        recall_classifier=pr["recall"],
        recall_classifier_stderr=pr["recall_stderr"],
        classifier_pr_num=n,
    )


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)  # [N, K]


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    if jax.process_index() != 0:
        return
    with files.atomic_write(path) as f:
        np.savez(f, **arrays)


def _check_samples(config: ml_collections.ConfigDict, samples: np.ndarray) -> None:
    shape = input_pipeline.example_shape(config)
    if (
        not isinstance(samples, np.ndarray)
        or samples.dtype != np.uint8
        or samples.shape[1:] != shape
        or len(samples) < 2
        or samples.max(initial=0) >= config.data.num_bins
    ):
        got = (
            f"{samples.dtype} {samples.shape}, max {samples.max(initial=0)}"
            if isinstance(samples, np.ndarray)
            else type(samples).__name__
        )
        raise ValueError(
            f"samples must be uint8 levels below data.num_bins={config.data.num_bins} of shape "
            f"[N >= 2, {', '.join(map(str, shape))}] (input_pipeline.to_uint8_levels of model "
            f"space); got {got}."
        )


def class_match(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """How often the classifier's top class (``probs`` [N, K]) is the requested one (``labels``
    [N]): the share, its binomial standard error sqrt(p (1 - p) / N), and the share of each
    requested class 0..num_classes-1 (None for a class not requested)."""
    hit = np.argmax(probs, axis=1) == labels  # [N]
    p = float(hit.mean())
    per_class = [
        float(hit[labels == k].mean()) if np.any(labels == k) else None for k in range(num_classes)
    ]
    return dict(
        class_match=p,
        class_match_stderr=float(np.sqrt(p * (1 - p) / len(hit))),
        class_match_per_class=per_class,
    )


def classifier_metrics(
    config: ml_collections.ConfigDict,
    samples: np.ndarray,
    workdir: str,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Every number of the classifier metrics for ``samples`` (uint8 levels [N, H, W, C], e.g.
    ``input_pipeline.to_uint8_levels(x, num_bins)``), no run context needed.

    ``workdir``: a run's workdir or any folder; the classifier, the reference statistics and the
    real-vs-real values are cached in ``workdir/eval/classifier`` (trained and computed on the
    first call, read by every later one). Returns the keys of FD_KEYS and IS_KEYS, and with
    ``labels`` [N] (the classes the samples were drawn for) those of ``class_match``.
    """
    _check_samples(config, samples)
    cache_dir = classifier_dir(workdir)
    model, params, info = load_or_train(config, cache_dir)
    reference = _reference(config, model, params, info, cache_dir)
    real = _real_values(config, model, params, info, reference, len(samples), cache_dir)
    logits, features = predict(model, params, samples, config.data.num_bins)
    probs = _softmax(logits)  # [N, K]
    mu, sigma = _stats(features)
    fd = fid_lib.frechet_distance(mu, sigma, reference["mu"], reference["sigma"])
    score = fid_lib.inception_score(probs, 1)[0]
    kid_pr = _kid_pr(config, features, reference["features"])

    num_boot = config.eval.classifier.num_bootstrap
    key = jax.random.fold_in(jax.random.key(config.seed), _BOOTSTRAP_TAG)
    n = len(samples)
    rows = np.asarray(jax.random.randint(jax.random.fold_in(key, n), (num_boot, n), 0, n))
    fds, scores = [], []
    for r in rows:  # [N] indices with repeats
        m, s = _stats(features[r])
        fds.append(fid_lib.frechet_distance(m, s, reference["mu"], reference["sigma"]))
        scores.append(fid_lib.inception_score(probs[r], 1)[0])
    out = dict(
        fd_classifier=fd,
        fd_classifier_stderr=float(np.std(fds, ddof=1)),
        fd_classifier_real=float(real["fd_classifier_real"]),
        is_classifier=score,
        is_classifier_stderr=float(np.std(scores, ddof=1)),
        is_classifier_real=float(real["is_classifier_real"]),
        **kid_pr,
        kid_classifier_real=float(real["kid_classifier_real"]),
        precision_classifier_real=float(real["precision_classifier_real"]),
        recall_classifier_real=float(real["recall_classifier_real"]),
        classifier_pr_k=sample_metrics.PR_K,
        classifier_test_accuracy=float(info["test_accuracy"]),
        classifier_class_shares=[
            float(v) for v in np.bincount(probs.argmax(axis=1), minlength=probs.shape[1]) / n
        ],
        classifier_num_samples=len(samples),
        classifier_num_real=int(real["classifier_num_real"]),
        classifier_reference=dict(
            split=info["test_split"], num_examples=int(reference["num_examples"])
        ),
    )
    if labels is not None:
        out |= class_match(probs, np.asarray(labels), probs.shape[1])
        logging.info(
            "The classifier puts %.4g ± %.2g of the samples in their requested class.",
            out["class_match"],
            out["class_match_stderr"],
        )
    logging.info(
        "Classifier metrics of %d samples vs %d %s examples: FD %.4g ± %.2g (real %.4g), "
        "IS %.4g ± %.2g (real %.4g), KID %.4g ± %.2g (real %.4g), precision %.4g (real %.4g), "
        "recall %.4g (real %.4g).",
        len(samples),
        int(reference["num_examples"]),
        info["test_split"],
        fd,
        out["fd_classifier_stderr"],
        out["fd_classifier_real"],
        score,
        out["is_classifier_stderr"],
        out["is_classifier_real"],
        out["kid_classifier"],
        out["kid_classifier_stderr"],
        out["kid_classifier_real"],
        out["precision_classifier"],
        out["precision_classifier_real"],
        out["recall_classifier"],
        out["recall_classifier_real"],
    )
    return out


# ----------------------------------------------------------------------------- evaluators


def needs_labels(ctx: EvalContext) -> str | None:
    """Why the classifier metrics do not apply to the run's data, or None."""
    try:
        reason = input_pipeline.unlabelled_reason(ctx.config)
    except Exception:  # then the evaluator itself fails, naming the reason in one line
        reason = None
    if reason is None and not ctx.config.data.image_size:
        reason = "data.image_size=0: vector data"
    return None if reason is None else f"needs labelled images ({reason})"


def classifier_samples(ctx: EvalContext) -> np.ndarray:
    """uint8 levels [eval.classifier.num_samples, H, W, C] drawn with the config's sampler.

    Key fold_in(run sample key, 0xC15A); cached in ``WORKDIR/eval/classifier/samples_TAG.npz``,
    TAG hashing the parameters (``fid.params_fingerprint``), the sampler's and the diffusion's
    settings, the seed and the number of samples.
    """
    config = ctx.config
    num = config.eval.classifier.num_samples
    run_tag = dict(
        params=fid_lib.params_fingerprint(ctx.params),
        seed=config.seed,
        num_samples=num,
        num_bins=config.data.num_bins,
        sampling={k: v for k, v in config.sampling.to_dict().items() if k != "num_samples"},
        diffusion=config.diffusion.to_dict(),
    )
    path = os.path.join(classifier_dir(ctx.workdir), f"samples_{_digest(run_tag)[:16]}.npz")
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                images = f["images"]
            if images.dtype == np.uint8 and len(images) == num:
                logging.info("Classifier samples from the cache %s.", path)
                return images
        except (OSError, ValueError, KeyError) as e:
            logging.warning("Classifier samples %s unreadable (%s); drawing them again.", path, e)
    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.sampling.num_samples = num
    sampler = sampling.make_sample_fn(cfg, ctx.model, ctx.mesh, desc="classifier samples")
    key = jax.random.fold_in(objectives.run_keys(config.seed)["sample"], _SAMPLE_TAG)
    x = sampler(ctx.params, key)  # [N, H, W, C] model space
    images = input_pipeline.to_uint8_levels(x, config.data.num_bins)
    _save_npz(path, dict(images=images))
    return images


def _metrics(ctx: EvalContext) -> dict[str, Any]:
    """Every classifier number of the run's samples; computed once for all the evaluators.
    A conditional model's sample i was drawn for class ``sampling.sample_labels``'s i."""
    if "classifier_metrics" not in ctx.cache:
        get_classifier(ctx)  # first: a data set it cannot learn fails before any sampling
        samples = classifier_samples(ctx)
        labels = sampling.sample_labels(ctx.config, len(samples))
        ctx.cache["classifier_metrics"] = classifier_metrics(
            ctx.config, samples, ctx.workdir, labels
        )
    return ctx.cache["classifier_metrics"]


def _evaluator(keys: tuple[str, ...], doc: str):
    """An evaluator returning ``keys`` of the run's classifier numbers (``_metrics``)."""

    def run(ctx: EvalContext) -> dict[str, Any]:
        m = _metrics(ctx)
        return {k: m[k] for k in keys}

    run.__doc__ = doc
    return run


_SCALE = "(± ``_stderr``, ``_real`` for scale) and the classifier's accuracy."
fd_classifier = _evaluator(FD_KEYS, f"``fd_classifier`` {_SCALE}")
is_classifier = _evaluator(IS_KEYS, f"``is_classifier`` {_SCALE}")
kid_classifier = _evaluator(KID_KEYS, f"``kid_classifier`` {_SCALE}")
precision_recall_classifier = _evaluator(
    PR_KEYS, f"``precision_classifier`` and ``recall_classifier``, k = 3, {_SCALE}"
)


def needs_conditional(ctx: EvalContext) -> str | None:
    """Why ``class_match`` does not apply, or None."""
    if not ctx.config.model.num_classes:
        return "needs a class-conditional model (model.num_classes > 0)"
    return needs_labels(ctx)


def class_match_classifier(ctx: EvalContext) -> dict[str, Any]:
    """``class_match``: the share of a conditional model's samples (``classifier_samples``,
    sample i of class ``sampling.sample_labels``'s i) that the classifier puts in the requested
    class, ± its binomial standard error, and per class."""
    m = _metrics(ctx)
    keys = ("class_match", "class_match_stderr", "class_match_per_class")
    return {k: m[k] for k in keys + ("classifier_test_accuracy", "classifier_num_samples")}
