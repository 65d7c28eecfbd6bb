"""The judge of the classifier metrics (``evaluation.classifier``): a small classifier trained on
the data set's own labels (``models.classifier.Classifier``, a few conv layers and two dense
ones), trained once per (data set, image size, levels, seed, settings) and cached in
``WORKDIR/eval/classifier/``: ``classifier.msgpack`` (flax.serialization) and ``classifier.json``
(test accuracy, steps, the fingerprint of what it was trained on, the parameters' SHA-256); a
cache whose fingerprint or checksum differs is trained again.

Training: ``eval.classifier.train_steps`` Adam steps (cosine-decayed ``learning_rate``) on
batches of ``eval.classifier.batch_size`` drawn with replacement from the training split, batch s
from fold_in(data key, s); init and data keys split from fold_in(key(seed), 0xC1A5). Images go
through ``input_pipeline.to_model_space`` exactly as they reach the diffusion model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import serialization

from diffusion_jax import files, input_pipeline, reporting
from diffusion_jax.evaluation.context import EvalContext
from diffusion_jax.models.classifier import Classifier

__all__ = [
    "CACHE_VERSION",
    "build_classifier",
    "check_config",
    "classifier_dir",
    "fingerprint",
    "get_classifier",
    "load_or_train",
    "predict",
    "reference_split",
    "train_classifier",
]

CACHE_VERSION = 1  # part of the fingerprint: bump when the architecture or training changes
_TRAIN_TAG = 0xC1A5  # fold_in(key(seed), ·): the classifier's init and batches
_LOG_STEPS = 100  # training steps between progress-bar updates
_EVAL_BATCH = 500  # images per forward pass when judging


def classifier_dir(workdir: str) -> str:
    """Where a run's classifier and its statistics are cached: ``WORKDIR/eval/classifier``."""
    return os.path.join(workdir, "eval", "classifier")


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming a bad ``eval.classifier.*`` key, its value and what is allowed."""
    e = config.eval
    minimum = {
        "num_samples": 2,
        "train_steps": 1,
        "batch_size": 1,
        "width": 1,
        "feature_dim": 1,
        "num_bootstrap": 2,
    }
    for key, low in minimum.items():
        v = e.classifier[key]
        if not isinstance(v, int) or v < low:
            raise ValueError(f"config.eval.classifier.{key}={v!r}; allowed: an integer >= {low}.")
    if not e.classifier.learning_rate > 0:
        raise ValueError(
            f"config.eval.classifier.learning_rate={e.classifier.learning_rate!r}; "
            "allowed: a number > 0."
        )


def reference_split(config: ml_collections.ConfigDict) -> str:
    """The split the samples are compared with: ``eval.classifier.split``, "" = ``eval.split``."""
    return config.eval.classifier.split or config.eval.split


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the cached classifier was trained and tested on; another value retrains it."""
    d, e = config.data, config.eval
    return dict(
        version=CACHE_VERSION,
        dataset=d.dataset,
        train_split=d.train_split,
        test_split=reference_split(config),
        image_size=d.image_size,
        num_channels=d.num_channels,
        num_bins=d.num_bins,
        seed=config.seed,
        train_steps=e.classifier.train_steps,
        batch_size=e.classifier.batch_size,
        learning_rate=e.classifier.learning_rate,
        width=e.classifier.width,
        feature_dim=e.classifier.feature_dim,
    )


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def build_classifier(config: ml_collections.ConfigDict, num_classes: int) -> Classifier:
    e = config.eval
    return Classifier(num_classes, width=e.classifier.width, feature_dim=e.classifier.feature_dim)


def _labelled_split(config: ml_collections.ConfigDict, split: str) -> input_pipeline.DataSource:
    source = input_pipeline.load_split(config, split)
    if source.labels is None or source.images is None:
        reason = input_pipeline.unlabelled_reason(config) or "it has no labels"
        raise ValueError(
            f"The classifier metrics need labelled images; data.dataset="
            f"{config.data.dataset!r} split {split!r} has none: {reason}."
        )
    return source


# ----------------------------------------------------------------------------- training


def train_classifier(
    config: ml_collections.ConfigDict, train: input_pipeline.DataSource
) -> tuple[Classifier, Any]:
    """(model, params) trained on ``train``'s images and labels; a pure function of the config
    and the data (see the module docstring for the keys)."""
    e = config.eval
    model = build_classifier(config, train.num_classes)
    key = jax.random.fold_in(jax.random.key(config.seed), _TRAIN_TAG)
    init_key, data_key = jax.random.split(key)
    example = jnp.zeros((1, *train.images.shape[1:]), jnp.float32)  # [1, H, W, C]
    params = model.init(init_key, example)["params"]
    opt_state = _ADAM.init(params)
    total = e.classifier.train_steps
    schedule = optax.cosine_decay_schedule(e.classifier.learning_rate, total)
    rates = np.asarray(schedule(np.arange(total)), np.float32)  # [steps]
    images, labels = jnp.asarray(train.images), jnp.asarray(train.labels)  # on one device
    static = (model, e.classifier.batch_size, config.data.num_bins)
    with reporting.progress_bar(total, "classifier", unit="step") as bar:
        for s in range(total):
            params, opt_state, loss = _train_step(
                *static, params, opt_state, images, labels, data_key, s, rates[s]
            )
            if (s + 1) % _LOG_STEPS == 0 or s + 1 == total:
                bar.update((s + 1) - bar.n)
                bar.set_postfix(loss=f"{float(loss):.4f}")
    return model, jax.device_get(params)


_ADAM = optax.scale_by_adam()


# One compiled step per call, not a lax.scan: XLA:CPU runs the convolutions of a loop body far
# slower than top-level ones. Module-level with the model static, so that every training of the
# same network in a process reuses one compilation.
@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4))
def _train_step(
    model: Classifier,
    batch_size: int,
    num_bins: int,
    params: Any,
    opt_state: Any,
    images: jax.Array,  # [N, H, W, C] uint8 levels
    labels: jax.Array,  # [N] int32
    data_key: jax.Array,
    step: jax.Array,
    rate: jax.Array,
):
    """Adam on the mean cross-entropy of a batch drawn with replacement (key fold_in(data_key,
    step)), at learning rate ``rate``."""
    idx = jax.random.randint(jax.random.fold_in(data_key, step), (batch_size,), 0, len(labels))
    x = input_pipeline.to_model_space(images[idx], num_bins)  # [B, H, W, C]

    def loss_fn(p):
        logits, _ = model.apply({"params": p}, x)  # [B, K]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels[idx]).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - rate * u, params, updates)
    return params, opt_state, loss


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model: Classifier, params: Any, images: jax.Array, num_bins: int):
    return model.apply({"params": params}, input_pipeline.to_model_space(images, num_bins))


def predict(
    model: Classifier, params: Any, images: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """(logits [N, K], features [N, F]) of uint8 levels [N, H, W, C], float32 on the host."""
    logits, features = [], []
    for start in range(0, len(images), _EVAL_BATCH):
        part = images[start : start + _EVAL_BATCH]
        n = len(part)
        if n < _EVAL_BATCH and len(images) > _EVAL_BATCH:  # one shape: one compilation
            part = np.concatenate([part, np.zeros((_EVAL_BATCH - n, *part.shape[1:]), part.dtype)])
        lo, fe = _apply(model, params, jnp.asarray(part), num_bins)
        logits.append(np.asarray(lo)[:n])
        features.append(np.asarray(fe)[:n])
    return np.concatenate(logits), np.concatenate(features)


def _params_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_or_train(
    config: ml_collections.ConfigDict, cache_dir: str
) -> tuple[Classifier, Any, dict[str, Any]]:
    """(model, params, info) of the classifier cached in ``cache_dir``, trained there first when
    the cache is missing or its fingerprint or checksum differs from ``config``'s.

    ``info`` is the cache's json: ``test_accuracy`` on the reference split, ``num_classes``,
    ``train_steps``, ``fingerprint``, ``params_sha256``, ``train_seconds``, ``cache_dir``.
    """
    check_config(config)
    fp = fingerprint(config)
    params_path = os.path.join(cache_dir, "classifier.msgpack")
    info_path = os.path.join(cache_dir, "classifier.json")
    cached = _read_cache(params_path, info_path, fp)
    if cached is not None:
        info, params = cached
        model = build_classifier(config, info["num_classes"])
        logging.info(
            "Classifier from the cache %s: test accuracy %.2f %% on %d %s examples.",
            cache_dir,
            100 * info["test_accuracy"],
            info["num_test_examples"],
            info["test_split"],
        )
        return model, params, info
    train = _labelled_split(config, config.data.train_split)
    test = _labelled_split(config, reference_split(config))
    start = time.perf_counter()
    model, params = train_classifier(config, train)
    seconds = time.perf_counter() - start
    logits, _ = predict(model, params, test.images, config.data.num_bins)
    accuracy = float(np.mean(np.argmax(logits, axis=1) == test.labels))
    data = serialization.to_bytes(params)
    info = dict(
        fingerprint=fp,
        test_accuracy=accuracy,
        test_split=reference_split(config),
        num_test_examples=test.num_examples,
        num_train_examples=train.num_examples,
        num_classes=train.num_classes,
        train_steps=config.eval.classifier.train_steps,
        train_seconds=seconds,
        params_sha256=_params_sha256(data),
        cache_dir=cache_dir,
    )
    if jax.process_index() == 0:
        with files.atomic_write(params_path) as f:
            f.write(data)
        reporting.write_json(info_path, info)  # last: a json names complete parameters
    logging.info(
        "Classifier trained (%d steps, %.1f s): test accuracy %.2f %% on %d %s examples; "
        "cached in %s.",
        info["train_steps"],
        seconds,
        100 * accuracy,
        test.num_examples,
        info["test_split"],
        cache_dir,
    )
    return model, params, info


def _read_cache(params_path: str, info_path: str, fp: dict) -> tuple[dict, Any] | None:
    if not (os.path.exists(params_path) and os.path.exists(info_path)):
        return None
    try:
        with open(info_path) as f:
            info = json.load(f)
        with open(params_path, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as e:
        logging.warning("Classifier cache unreadable (%s); training again.", e)
        return None
    if info.get("fingerprint") != json.loads(json.dumps(fp)):
        logging.info("Classifier cache %s is for other settings; training again.", info_path)
        return None
    if info.get("params_sha256") != _params_sha256(data):
        logging.warning(
            "Classifier cache %s: parameters fail their checksum; training again.", info_path
        )
        return None
    return info, serialization.msgpack_restore(data)


def get_classifier(ctx: EvalContext) -> tuple[Classifier, Any, dict[str, Any]]:
    """The run's classifier: ``load_or_train`` in ``WORKDIR/eval/classifier``."""
    return load_or_train(ctx.config, classifier_dir(ctx.workdir))
