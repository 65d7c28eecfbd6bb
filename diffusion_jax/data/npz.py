"""A ``.npz`` of the user's own: images under the split's name (else ``images``), labels under
``{key}_labels`` (else ``labels``)."""

from __future__ import annotations

import os

import numpy as np

from diffusion_jax.data.base import DatasetError, DataSource, Source, checked_labels


def npz_keys(keys: list[str], split: str, path: str) -> tuple[str, str | None]:
    """(the key of the images, the key of their labels or None) among a .npz's arrays: the
    images are the array ``split``, else ``images``; neither: a DatasetError naming the keys."""
    if split in keys:
        key = split
    elif "images" in keys:
        key = "images"
    else:
        raise DatasetError(
            f"{path} holds no {split!r} or 'images' array (the images of split {split!r}); its "
            f"arrays: {', '.join(map(repr, keys)) or 'none'}."
        )
    for label_key in (f"{key}_labels", "labels"):
        if label_key in keys and label_key != key:
            return key, label_key
    return key, None


def npz_array(f, key: str, path: str) -> np.ndarray:
    """The array ``key`` of an open .npz; an object (pickled) array: a DatasetError naming both."""
    try:
        return np.asarray(f[key])
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise DatasetError(
            f"{path}: array {key!r} holds Python objects (a pickled object array), which are not "
            "loaded; save it as a numeric array (e.g. uint8 images)."
        ) from None


def load(config, split: str) -> DataSource:
    """Labels: the array ``{split}_labels`` when the images came from key ``split``, else
    ``labels``."""
    path = config.data.dataset
    with np.load(path) as f:
        key, label_key = npz_keys(f.files, split, path)
        images = npz_array(f, key, path)
        labels = None if label_key is None else npz_array(f, label_key, path)
    if labels is not None:
        labels = checked_labels(labels, len(images), f"{path} (array {label_key!r})")
    return DataSource(images, labels=labels)


def unlabelled_reason(config) -> str | None:
    path = config.data.dataset
    with np.load(path) as f:
        _, label_key = npz_keys(f.files, config.data.train_split, path)
    return None if label_key else f"{path} holds no 'labels' array"


def validate(config) -> None:
    if not os.path.exists(config.data.dataset):
        raise DatasetError(f"data.dataset={config.data.dataset!r}: no such file or folder.")


SOURCE = Source(
    matches=lambda name, data: name.endswith(".npz"),
    load=load,
    unlabelled_reason=unlabelled_reason,
    validate=validate,
)
