"""What every source shares: the split in host memory (``DataSource``), the error a user can act
on (``DatasetError``), random access decoded on indexing (``LazyImages``) and the label check."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


class DatasetError(ValueError):
    """A data set that cannot be found or loaded, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A whole split in host memory.

    ``images`` is uint8 [N, H, W, C] for image data and float32 [N, D] for vector data, or None for
    toy data drawn fresh each step (then ``toy_name`` names the distribution). ``labels`` is int32
    [N], the class index of each example, or None for a data set without labels; ``class_names``
    names the classes where the data does (digits, tfds, IDX sets, sub-folders).
    """

    images: np.ndarray | None
    toy_name: str | None = None
    labels: np.ndarray | None = None  # int32 [N]
    class_names: tuple[str, ...] = ()

    @property
    def num_examples(self) -> int:
        return 0 if self.images is None else len(self.images)

    @property
    def num_classes(self) -> int:
        """The number of classes: the named ones, at least max(label) + 1; 0 without labels."""
        if self.labels is None:
            return 0
        return max(len(self.class_names), int(self.labels.max(initial=-1)) + 1)


class LazyImages:
    """Images as a random-access uint8 array [N, H, W, C] read on indexing: ``images[idx]`` for
    an int array idx [b] gives [b, H, W, C], each row ``read(i)``. For sets too large to hold:
    a big folder (``folder.folder_images``), a tfds data source (``tfds_source``)."""

    def __init__(self, read: Callable[[int], np.ndarray], num: int, shape: tuple[int, ...]):
        self.read = read
        self.shape = (num, *shape)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 1 + len(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.asarray(idx)
        out = np.empty((idx.size, *self.shape[1:]), np.uint8)
        for row, i in enumerate(idx.reshape(-1)):
            out[row] = self.read(int(i))
        return out.reshape(*idx.shape, *self.shape[1:])


def checked_labels(labels: np.ndarray, num_images: int, where: str) -> np.ndarray:
    """``labels`` as int32 [N], or a DatasetError naming ``where``, the labels and the rule."""
    ok = (
        labels.ndim == 1
        and len(labels) == num_images
        and np.issubdtype(labels.dtype, np.integer)
        and labels.min(initial=0) >= 0
        and labels.max(initial=0) < 2**31
    )
    if not ok:
        got = f"dtype {labels.dtype}, shape {labels.shape}"
        if labels.ndim == 1 and labels.size and np.issubdtype(labels.dtype, np.number):
            got += f", values {labels.min()}..{labels.max()}"
        raise DatasetError(
            f"{where}: labels must be integer class indices >= 0 of shape ({num_images},), one "
            f"per image; got {got}."
        )
    return labels.astype(np.int32)


def center_crop_resize(im, size: int):
    """A PIL image centre-cropped to a square and resized (bicubic) to ``size`` x ``size``."""
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.BICUBIC) if s != size else im


def split_id(split: str) -> int:
    """A small integer per split name, for keys that differ by split."""
    return {"train": 0, "test": 1, "validation": 2}.get(split, 3)


def _valid(config) -> None:
    """The default check of a source: nothing to check before loading."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One kind of data source, an entry of ``data.SOURCES``.

    ``matches(name, data)``: whether ``config.data.dataset = name`` is this kind (``data`` the
    config's data section; the first source that matches, in registry order, reads it).
    ``load(config, split)``: the split as a DataSource (checked against the config afterwards).
    ``unlabelled_reason(config)``: why the training split has no labels, or None; cheap (reads
    no images). ``validate(config)``: a cheap check, before anything compiles, that the data is
    there (a DatasetError saying what to do if not).
    """

    matches: Callable
    load: Callable
    unlabelled_reason: Callable
    validate: Callable = _valid
