"""Data sets by name as random-access sources (one module per kind, in SOURCES), and batches as
pure functions of the step (``batching``).

A split is a random-access array of uint8 grey levels [N, H, W, C] for images (float32 [N, D]
for vector data; toy sets draw fresh points each step instead): in host memory for small sets
(digits, Fashion-MNIST/MNIST IDX files, tfds sets, a ``.npz``, a folder of up to
``folder.IN_MEMORY_MAX_BYTES`` of decoded images), a memory map of a set written by ``python -m
diffusion_jax.prepare_data`` (only the rows a batch asks for are read), or decoded lazily, row
by row (a larger folder, a tfds ``data_source``).

``config.data.dataset`` names the source: the first entry of SOURCES whose ``matches`` accepts
it reads it. Labels come with the data where it has them (``DataSource.labels``, int32 [N]):
digits' targets, the IDX label files, a tfds set's ``label`` feature, ``labels`` in a ``.npz``,
the sorted sub-folder names of a folder of class sub-folders. A new kind of source is one module
with a ``SOURCE`` (``base.Source``) plus its entry here.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from diffusion_jax.data import digits, folder, idx, npz, prepared, tfds_load, tfds_source, toy
from diffusion_jax.data.base import DatasetError, DataSource, LazyImages, Source, checked_labels
from diffusion_jax.data.batching import (
    eval_batches,
    example_shape,
    global_batch_indices,
    host_slice,
    num_workers,
    to_model_space,
    to_uint8_levels,
    train_batch,
    train_batches,
)
from diffusion_jax.data.folder import IN_MEMORY_MAX_BYTES, folder_images
from diffusion_jax.data.prepared import PREPARED_MARKER
from diffusion_jax.data.tfds_load import TFDS_READERS

__all__ = [
    "IN_MEMORY_MAX_BYTES",
    "OFFLINE_DATASETS",
    "PREPARED_MARKER",
    "SOURCES",
    "TFDS_READERS",
    "DataSource",
    "DatasetError",
    "LazyImages",
    "Source",
    "checked_labels",
    "dataset_kind",
    "eval_batches",
    "example_shape",
    "folder_images",
    "global_batch_indices",
    "host_slice",
    "load_split",
    "num_workers",
    "to_model_space",
    "to_uint8_levels",
    "train_batch",
    "train_batches",
    "unlabelled_reason",
    "validate_dataset",
]

OFFLINE_DATASETS = ("digits",)

# In matching order: the first whose ``matches(name, config.data)`` is true reads the set. The
# tfds readers come last: any other name is a tensorflow-datasets name.
SOURCES: dict[str, Source] = {
    "digits": digits.SOURCE,
    "toy": toy.SOURCE,
    "idx": idx.SOURCE,
    "prepared": prepared.SOURCE,
    "npz": npz.SOURCE,
    "folder": folder.SOURCE,
    "tfds_source": tfds_source.SOURCE,
    "tfds_load": tfds_load.SOURCE,
}


def dataset_kind(name: str, data: ml_collections.ConfigDict | None = None) -> str:
    """The key in SOURCES of the source that reads ``config.data.dataset = name`` (``data``: the
    config's data section, for the keys that decide between sources; None: their defaults)."""
    return next(k for k, s in SOURCES.items() if s.matches(name, data))


def _source(config: ml_collections.ConfigDict) -> Source:
    return SOURCES[dataset_kind(config.data.dataset, config.data)]


def validate_dataset(config: ml_collections.ConfigDict) -> None:
    """Raise DatasetError for a data set that is not there (cheap: loads no images)."""
    _source(config).validate(config)


def load_split(config: ml_collections.ConfigDict, split: str) -> DataSource:
    """Load ``split`` of ``config.data.dataset``, checked against the config's image shape,
    levels and classes."""
    kind = dataset_kind(config.data.dataset, config.data)
    source = SOURCES[kind].load(config, split)
    if kind == "toy":  # vectors, drawn to the config's own dimension
        return source
    _check_images(source.images, config, split)
    _check_classes(source, config, split)
    return source


def unlabelled_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why ``config.data.dataset`` has no labels (a sentence), or None when it has them.

    Cheap: reads a .npz's index, lists a folder, or reads a tfds builder's feature description;
    loads no images. Agrees with what ``load_split`` returns for the training split.
    """
    return _source(config).unlabelled_reason(config)


def _check_classes(source: DataSource, config: ml_collections.ConfigDict, split: str) -> None:
    """A conditional model needs labels below ``model.num_classes`` (the null class's index)."""
    k = config.model.num_classes
    if not k:
        return
    if source.labels is None:
        reason = unlabelled_reason(config) or f"split {split!r} has no labels"
        raise DatasetError(f"config.model.num_classes={k} needs labelled data, but {reason}.")
    if source.num_classes > k:
        raise DatasetError(
            f"config.model.num_classes={k}, but {config.data.dataset!r} split {split!r} has "
            f"labels up to {source.num_classes - 1}: set model.num_classes={source.num_classes}."
        )


def _check_images(images: np.ndarray, config: ml_collections.ConfigDict, split: str) -> None:
    if images.ndim == 3:
        raise DatasetError(
            f"{config.data.dataset!r}: images need a channel axis, got {images.shape}"
        )
    want = (config.data.image_size, config.data.image_size, config.data.num_channels)
    if images.ndim != 4 or images.shape[1:] != want:
        raise DatasetError(
            f"{config.data.dataset!r} split {split!r} has examples of shape {images.shape[1:]}, "
            f"but the config asks for {want} (data.image_size, data.num_channels)."
        )
    num_bins = config.data.num_bins
    if images.dtype != np.uint8:
        raise DatasetError(
            f"{config.data.dataset!r}: images must be uint8 levels below data.num_bins="
            f"{num_bins}; got dtype {images.dtype}."
        )
    if num_bins >= 256:  # any uint8 level fits: nothing to read
        return
    if isinstance(images, LazyImages):
        raise DatasetError(
            f"{config.data.dataset!r} is decoded lazily, so its levels cannot be checked "
            f"against data.num_bins={num_bins}: write it with `python -m "
            "diffusion_jax.prepare_data` first, or use data.num_bins=256."
        )
    chunk = 1 << 16  # rows: a memory map is read once, a chunk at a time
    top = max((int(images[i : i + chunk].max()) for i in range(0, len(images), chunk)), default=0)
    if top >= num_bins:
        raise DatasetError(
            f"{config.data.dataset!r}: images must be uint8 levels below data.num_bins="
            f"{num_bins}; got max {top}."
        )
