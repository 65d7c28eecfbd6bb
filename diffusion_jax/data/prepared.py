"""A folder written by ``python -m diffusion_jax.prepare_data``: ``{split}.npy`` memory-mapped
(only the rows a batch asks for are read), ``{split}_labels.npy``, class names in dataset.json."""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from diffusion_jax.data.base import DatasetError, DataSource, Source, checked_labels

PREPARED_MARKER = "dataset.json"  # in a folder written by ``python -m diffusion_jax.prepare_data``


def read_meta(path: str) -> dict:
    """The folder's dataset.json; DatasetError naming the file when it is not what
    ``prepare_data`` writes (unreadable, not a JSON object, no ``splits`` object)."""
    file = os.path.join(path, PREPARED_MARKER)
    advice = "write the folder again: python -m diffusion_jax.prepare_data ... --overwrite"
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(
            f"{file} cannot be read as JSON ({type(e).__name__}: {e}); {advice}."
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits"), dict):
        raise DatasetError(
            f"{file} holds {type(meta).__name__} {str(meta)[:60]}, not the object with "
            f"'splits' that prepare_data writes; {advice}."
        )
    return meta


def load(config, split: str) -> DataSource:
    path = config.data.dataset
    meta = read_meta(path)
    file = os.path.join(path, f"{split}.npy")
    if not os.path.exists(file):
        have = sorted(meta["splits"])
        raise DatasetError(
            f"{path} (prepared) has no split {split!r}; its splits: {', '.join(have) or 'none'}."
        )
    try:
        images = np.load(file, mmap_mode="r")
    except ValueError as e:
        raise DatasetError(f"{file}: not a readable .npy array ({e}).") from None
    if hasattr(images, "_mmap") and hasattr(mmap, "MADV_RANDOM"):
        # Batches read scattered rows: no read-ahead of the pages around each one.
        images._mmap.madvise(mmap.MADV_RANDOM)
    labels_file = os.path.join(path, f"{split}_labels.npy")
    _check_against_meta(path, split, meta, images, os.path.exists(labels_file))
    labels = None
    if os.path.exists(labels_file):
        labels = checked_labels(np.load(labels_file), len(images), labels_file)
    return DataSource(images, labels=labels, class_names=tuple(meta.get("class_names", ())))


def _check_against_meta(path: str, split: str, meta: dict, images, has_labels: bool) -> None:
    """The split's files as dataset.json describes them: its count, shape and labels."""
    file = os.path.join(path, PREPARED_MARKER)
    info = meta["splits"].get(split)
    if not isinstance(info, dict):
        raise DatasetError(
            f"{file} lists no split {split!r} (it lists {sorted(meta['splits'])}), but "
            f"{split}.npy is there: the folder mixes two writes; write it again with --overwrite."
        )
    found = {
        "num_examples": len(images),
        "shape": list(images.shape[1:]),
        "labels": has_labels,
    }
    for key, value in found.items():
        if key in info and info[key] != value:
            raise DatasetError(
                f"{file} says split {split!r} has {key}={info[key]!r}, but its files have "
                f"{value!r}: the folder mixes two writes (e.g. {split}_labels.npy left from an "
                "earlier set); write it again with prepare_data --overwrite."
            )


def unlabelled_reason(config) -> str | None:
    name, split = config.data.dataset, config.data.train_split
    info = read_meta(name)["splits"].get(split)
    if isinstance(info, dict) and info.get("labels") is False:
        return f"{name}/{PREPARED_MARKER} says split {split!r} has no labels"
    if os.path.exists(os.path.join(name, f"{split}_labels.npy")):
        return None
    return f"{name} holds no {split}_labels.npy"


SOURCE = Source(
    matches=lambda name, data: os.path.isfile(os.path.join(name, PREPARED_MARKER)),
    load=load,
    unlabelled_reason=unlabelled_reason,
)
