"""A tensorflow-datasets set through ``tfds.load`` (TensorFlow, the ``[tfds]`` extra): the split
decoded whole into host memory, centre-cropped and resized to ``data.image_size``."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import numpy as np

from diffusion_jax.data.base import DatasetError, DataSource, Source, checked_labels

TFDS_READERS = ("load", "data_source")


def import_tfds(name: str) -> ModuleType:
    """tensorflow_datasets (heavy: imported only for tfds data sets), or DatasetError saying how
    to install it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DatasetError(
            f"data.dataset={name!r} is read through tensorflow-datasets, which cannot be imported "
            f"({e}): pip install tensorflow-datasets (and, for tfds.load, 'diffusion_jax[tfds]')."
        ) from None
    return tfds


def installed(*modules: str) -> bool:
    """Whether every module can be imported, found without importing it (no TensorFlow)."""
    return all(importlib.util.find_spec(m) is not None for m in modules)


def prepared_copy(name: str, data_dir: str | None) -> str | None:
    """The folder of a prepared tfds copy of ``name`` (``DATA_DIR/NAME/VERSION/dataset_info.json``
    under ``data_dir``, $TFDS_DATA_DIR or ~/tensorflow_datasets), or None; imports nothing."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    folder = os.path.join(os.path.expanduser(root), name.split(":")[0])
    if not os.path.isdir(folder):
        return None
    for version in sorted(os.listdir(folder), reverse=True):
        if os.path.isfile(os.path.join(folder, version, "dataset_info.json")):
            return os.path.join(folder, version)
    return None


def label_feature(info):
    """The tfds ``label`` feature (a scalar ClassLabel) of a data set's info, else None."""
    import tensorflow_datasets as tfds

    feature = info.features["label"] if "label" in info.features else None
    if isinstance(feature, tfds.features.ClassLabel) and tuple(feature.shape) == ():
        return feature
    return None


def check_reader(config) -> None:
    reader = config.data.tfds_reader
    if reader not in TFDS_READERS:
        raise DatasetError(f"config.data.tfds_reader={reader!r} is not one of {TFDS_READERS}.")


def load(config, split: str) -> DataSource:
    check_reader(config)
    name = config.data.dataset
    try:
        import tensorflow as tf
    except ImportError as e:
        raise DatasetError(
            f"data.dataset={name!r} with data.tfds_reader='load' reads through TensorFlow, which "
            f"cannot be imported ({e}): pip install 'diffusion_jax[tfds]' (on Colab the "
            "preinstalled tensorflow does), or prepare the set as ArrayRecord (`tfds build "
            f"{name} --file_format=array_record`) and use --config.data.tfds_reader=data_source."
        ) from None

    tf.config.set_visible_devices([], "GPU")  # TensorFlow only reads data; JAX owns the GPUs
    import tensorflow_datasets as tfds

    size = config.data.image_size
    try:
        ds, info = tfds.load(
            name, split=split, data_dir=config.data.data_dir, shuffle_files=False, with_info=True
        )
    except Exception as e:  # tfds fails offline with unrelated-looking errors
        raise DatasetError(
            f"Could not load tensorflow-datasets {name!r} (split {split!r}, data_dir="
            f"{config.data.data_dir or '~/tensorflow_datasets'}): it is not prepared there and "
            f"could not be downloaded ({type(e).__name__}: {e}). Prepare it where the network "
            f"allows (`tfds build {name}`) and pass --config.data.data_dir=DIR, or use an offline "
            "data set: digits, a toy set, a folder or a .npz (fashion_mnist and mnist: IDX files "
            "in data.idx_dir)."
        ) from e

    feature = label_feature(info)

    def prepare(example):
        image = example["image"]  # [h, w, c] uint8
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        if image.shape[0] != size or image.shape[1] != size:
            s = tf.minimum(h, w)  # centre crop to a square, then resize (CelebA: 218x178 -> 64)
            image = image[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
            image = tf.image.resize(image, (size, size), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image if feature is None else (image, example["label"])

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    batches = list(tfds.as_numpy(ds))
    if feature is None:
        return DataSource(np.concatenate(batches))
    images = np.concatenate([b[0] for b in batches])  # [N, size, size, C]
    labels = checked_labels(np.concatenate([b[1] for b in batches]), len(images), name)
    return DataSource(images, labels=labels, class_names=tuple(feature.names))


def unlabelled_reason(config) -> str | None:
    name = config.data.dataset
    tfds = import_tfds(name)
    info = tfds.builder(name, data_dir=config.data.data_dir).info
    if label_feature(info) is None:
        return f"the tensorflow-datasets set {name!r} has no 'label' feature"
    return None


def validate(config) -> None:
    """tfds importable and the name one of its builders."""
    check_reader(config)
    name = config.data.dataset
    tfds = import_tfds(name)
    # Not the community index: refreshing it wants TensorFlow and the network.
    if name.split("/")[0].split(":")[0] not in tfds.list_builders(with_community_datasets=False):
        raise DatasetError(
            f"Unknown data set data.dataset={name!r}. Use an offline one (digits, a toy set: "
            "see diffusion_jax.data.toy_distributions.NAMES; fashion_mnist or mnist from IDX "
            "files), a folder or .npz of your own images, or a tensorflow-datasets name (e.g. "
            "mnist, cifar10, celeb_a)."
        )


def matches(name: str, data) -> bool:
    """Any other name, read by ``tfds.load`` unless ``data.tfds_reader`` says otherwise."""
    return getattr(data, "tfds_reader", "load") != "data_source"


SOURCE = Source(matches=matches, load=load, unlabelled_reason=unlabelled_reason, validate=validate)
