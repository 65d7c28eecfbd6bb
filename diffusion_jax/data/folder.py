"""A folder of the user's images (at any depth; labels from class sub-folders): decoded whole up
to IN_MEMORY_MAX_BYTES, lazily, row by row, beyond."""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from diffusion_jax.data import npz
from diffusion_jax.data.base import DatasetError, DataSource, LazyImages, Source, center_crop_resize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
IN_MEMORY_MAX_BYTES = 2**31  # a folder of images decodes whole up to this size, lazily beyond


def folder_files(path: str) -> list[str]:
    """The image files under ``path``, at any depth, sorted by their full path."""
    return sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(path)
        for f in names
        if f.lower().endswith(IMAGE_SUFFIXES)
    )


def folder_classes(path: str, files: list[str]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(int32 [N] class of each file, the sorted class names) where every file sits in a
    sub-folder of ``path`` (its first-level sub-folder names its class); (None, ()) otherwise."""
    top = [os.path.relpath(f, path).split(os.sep)[0] for f in files]
    at_top = sum(os.sep not in os.path.relpath(f, path) for f in files)
    if not files or at_top:
        if 0 < at_top < len(files):
            logging.warning(
                "%s: %d of %d images sit at the top level, the rest in sub-folders: no labels.",
                path,
                at_top,
                len(files),
            )
        return None, ()
    names = tuple(sorted(set(top)))
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[t] for t in top], np.int32), names


def folder_images(files: tuple[str, ...], size: int, path: str) -> LazyImages:
    """The images of ``files`` as RGB [N, size, size, 3] (centre crop, bicubic resize), decoded
    on indexing; a file that fails to decode is a DatasetError naming it."""
    from PIL import Image

    def read(i: int) -> np.ndarray:
        try:
            with Image.open(files[i]) as im:
                return np.asarray(center_crop_resize(im.convert("RGB"), size))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for damaged files
            raise DatasetError(
                f"Cannot read the image {files[i]} of data.dataset={path!r}: "
                f"{type(e).__name__}: {e}. Repair or remove it."
            ) from None

    return LazyImages(read, len(files), (size, size, 3))


def load(config, split: str) -> DataSource:
    """Every split is the whole folder."""
    path, image_size = config.data.dataset, config.data.image_size
    files = folder_files(path)
    if not files:
        raise DatasetError(f"data.dataset={path!r}: the folder holds no {IMAGE_SUFFIXES} files.")
    labels, names = folder_classes(path, files)
    lazy = folder_images(tuple(files), image_size, path)
    if len(files) * image_size * image_size * 3 > IN_MEMORY_MAX_BYTES:
        logging.info("%s: %d images, decoded as batches ask for them.", path, len(files))
        return DataSource(lazy, labels=labels, class_names=names)
    return DataSource(lazy[np.arange(len(files))], labels=labels, class_names=names)


def unlabelled_reason(config) -> str | None:
    path = config.data.dataset
    if folder_classes(path, folder_files(path))[0] is not None:
        return None
    return f"the images of {path} are not sorted into class sub-folders"


SOURCE = Source(
    matches=lambda name, data: os.sep in name or os.path.isdir(name),
    load=load,
    unlabelled_reason=unlabelled_reason,
    validate=npz.validate,
)
