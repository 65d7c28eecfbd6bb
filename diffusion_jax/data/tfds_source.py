"""A tensorflow-datasets set prepared as ArrayRecord (or Parquet), read through
``tfds.data_source`` (``data.tfds_reader = "data_source"``): no TensorFlow, nothing read whole."""

from __future__ import annotations

import numpy as np
from absl import logging

from diffusion_jax.data import tfds_load
from diffusion_jax.data.base import (
    DatasetError,
    DataSource,
    LazyImages,
    Source,
    center_crop_resize,
    checked_labels,
)


def load(config, split: str) -> DataSource:
    """Images decode on indexing (``LazyImages``; centre crop and bicubic resize where the
    stored size differs); the labels are read once, up front."""
    tfds = tfds_load.import_tfds(config.data.dataset)
    name, size, data_dir = config.data.dataset, config.data.image_size, config.data.data_dir
    try:
        ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # not prepared, or prepared as TFRecord (no random access)
        raise DatasetError(
            f"tensorflow-datasets {name!r} (split {split!r}, data_dir="
            f"{data_dir or '~/tensorflow_datasets'}) has no random-access files there "
            f"({type(e).__name__}: {str(e).splitlines()[0]}). Prepare it where the network "
            f"allows with `tfds build {name} --file_format=array_record`, or use "
            "--config.data.tfds_reader=load."
        ) from None
    shape = tuple(ds.dataset_info.features["image"].shape)  # (h, w, c); None where it varies
    channels = shape[-1] or 3

    def read(i: int) -> np.ndarray:
        image = np.asarray(ds[i]["image"])  # [h, w, c] uint8
        if image.shape[:2] == (size, size):
            return image
        from PIL import Image

        mode = "L" if image.shape[-1] == 1 else "RGB"
        im = Image.fromarray(image[..., 0] if mode == "L" else image, mode)
        out = np.asarray(center_crop_resize(im, size))
        return out[..., None] if mode == "L" else out

    images = LazyImages(read, len(ds), (size, size, channels))
    feature = tfds_load.label_feature(ds.dataset_info)
    if feature is None:
        return DataSource(images)
    # Each record read once for its label (tfds's SkipDecoding would import TensorFlow).
    logging.info("Reading the labels of %d records of %s (%s).", len(ds), name, split)
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    labels = checked_labels(labels, len(images), name)
    return DataSource(images, labels=labels, class_names=tuple(feature.names))


SOURCE = Source(
    matches=lambda name, data: getattr(data, "tfds_reader", "load") == "data_source",
    load=load,
    unlabelled_reason=tfds_load.unlabelled_reason,
    validate=tfds_load.validate,
)
