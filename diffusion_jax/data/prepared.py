"""A folder written by ``python -m diffusion_jax.prepare_data``: ``{split}.npy`` memory-mapped
(only the rows a batch asks for are read), ``{split}_labels.npy``, class names in dataset.json."""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from diffusion_jax.data.base import DatasetError, DataSource, Source, checked_labels

PREPARED_MARKER = "dataset.json"  # in a folder written by ``python -m diffusion_jax.prepare_data``


def load(config, split: str) -> DataSource:
    path = config.data.dataset
    file = os.path.join(path, f"{split}.npy")
    if not os.path.exists(file):
        have = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npy") and "_" not in f)
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
    labels = None
    if os.path.exists(labels_file):
        labels = checked_labels(np.load(labels_file), len(images), labels_file)
    with open(os.path.join(path, PREPARED_MARKER)) as f:
        names = tuple(json.load(f).get("class_names", ()))
    return DataSource(images, labels=labels, class_names=names)


def unlabelled_reason(config) -> str | None:
    name, split = config.data.dataset, config.data.train_split
    if os.path.exists(os.path.join(name, f"{split}_labels.npy")):
        return None
    return f"{name} holds no {split}_labels.npy"


SOURCE = Source(
    matches=lambda name, data: os.path.isfile(os.path.join(name, PREPARED_MARKER)),
    load=load,
    unlabelled_reason=unlabelled_reason,
)
