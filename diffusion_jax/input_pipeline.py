"""Input pipeline: data sets by name as random-access sources, batches pure functions of the step.

A split is a random-access array of uint8 grey levels [N, H, W, C] for images (float32 [N, D]
for vector data; toy sets draw fresh points each step instead): in host memory for small sets
(digits, tfds sets, a ``.npz``, a folder of up to IN_MEMORY_MAX_BYTES of decoded images), a
memory map of a set written by ``python -m diffusion_jax.prepare_data`` (``{split}.npy``: only
the rows a batch asks for are read), or a folder decoded lazily, row by row, when larger. The
global batch of step ``s`` is a pure function of ``(seed, s)``: an example stream that walks
through a new seeded permutation every epoch, plus seeded random flips. So

- the position in the data is the step itself, and a resumed run sees exactly the batches an
  uninterrupted run would have seen;
- every host computes the same global index list and keeps its own slice, so the global batch is
  the same on 1 process x 2 devices and 2 processes x 1 device.

Images stay uint8 until they reach the device: ``to_model_space`` maps level k of ``num_bins`` to
``2k/(num_bins-1) - 1`` inside the compiled step (a quarter of the host-to-device bytes).

``train_batches`` assembles the batches of the coming steps ahead on Grain's worker threads
(``data.num_workers``, ``data.prefetch_batches``); its position is the step it starts from, so a
resumed run reads exactly what an uninterrupted one would have. ``sharding.prefetch`` then puts
the next global batch on the devices while the current step runs.

Labels come with the data where it has them (``DataSource.labels``, int32 [N], row i the class of
image i): scikit-learn digits' targets, a tfds data set's ``label`` feature (mnist, cifar10; none
for celeb_a, lsun), ``labels`` in a user's ``.npz``, the sorted sub-folder names of a folder whose
images all sit in sub-folders. Toy data has none. A batch is a dict: ``image`` [B, ...] and, for
a class-conditional model (``config.model.num_classes`` > 0), ``label`` int32 [B], the rows of
the same indices, so labels share the images' determinism.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
from collections.abc import Callable, Iterator
from types import ModuleType

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from diffusion_jax import toy_data

OFFLINE_DATASETS = ("digits",)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PREPARED_MARKER = "dataset.json"  # in a folder written by ``python -m diffusion_jax.prepare_data``
IN_MEMORY_MAX_BYTES = 2**31  # a folder of images decodes whole up to this size, lazily beyond


class DatasetError(ValueError):
    """A data set that cannot be found or loaded, with what to do about it."""


@dataclasses.dataclass(frozen=True)
class DataSource:
    """A whole split in host memory.

    ``images`` is uint8 [N, H, W, C] for image data and float32 [N, D] for vector data, or None for
    toy data drawn fresh each step (then ``toy_name`` names the distribution). ``labels`` is int32
    [N], the class index of each example, or None for a data set without labels; ``class_names``
    names the classes where the data does (digits, tfds, sub-folders).
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


def dataset_kind(name: str) -> str:
    """'digits' | 'toy' | 'prepared' | 'files' | 'tfds' for a ``config.data.dataset`` value."""
    if name in OFFLINE_DATASETS:
        return "digits"
    if name in toy_data.NAMES:
        return "toy"
    if os.path.isfile(os.path.join(name, PREPARED_MARKER)):
        return "prepared"
    if name.endswith(".npz") or os.sep in name or os.path.isdir(name):
        return "files"
    return "tfds"


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example in model space: (H, W, C) for images, (D,) for vectors."""
    d = config.data
    if d.image_size:
        return (d.image_size, d.image_size, d.num_channels)
    return (d.num_channels,)


def _import_tfds(name: str) -> ModuleType:
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


def validate_dataset(config: ml_collections.ConfigDict) -> None:
    """Raise DatasetError for a data set name that is not offline, not a path and not in tfds."""
    name = config.data.dataset
    kind = dataset_kind(name)
    if kind == "files" and not os.path.exists(name):
        raise DatasetError(f"data.dataset={name!r}: no such file or folder.")
    if kind == "toy" and config.data.image_size:
        raise DatasetError(
            f"data.dataset={name!r} is a toy vector data set: set data.image_size=0 "
            f"(got {config.data.image_size}) and data.num_channels to its dimension."
        )
    if kind != "tfds":
        return
    tfds = _import_tfds(name)

    if name.split("/")[0].split(":")[0] not in tfds.list_builders():
        raise DatasetError(
            f"Unknown data set data.dataset={name!r}. Use an offline one "
            f"({', '.join(OFFLINE_DATASETS + toy_data.NAMES)}), a folder or .npz of your own "
            "images, or a tensorflow-datasets name (e.g. mnist, cifar10, celeb_a)."
        )


# ----------------------------------------------------------------------------- loading


def load_split(config: ml_collections.ConfigDict, split: str) -> DataSource:
    """Load ``split`` of ``config.data.dataset`` into host memory."""
    name = config.data.dataset
    kind = dataset_kind(name)
    if kind == "toy":
        # Training draws fresh points each step unless data.toy_size fixes a finite set; other
        # splits are always a fixed draw (of eval.num_examples points by default).
        n = config.data.toy_size
        if split != config.data.train_split:
            n = n or config.eval.num_examples or 10_000
        if not n:
            return DataSource(None, toy_name=name)
        key = jax.random.fold_in(jax.random.key(config.seed), _split_id(split))
        return DataSource(np.asarray(toy_data.sample(name, key, n), np.float32))
    if kind == "digits":
        images, labels, names = _load_digits(split)
    elif kind == "prepared":
        images, labels, names = _load_prepared(name, split)
    elif kind == "files":
        images, labels, names = _load_files(name, config.data.image_size, split)
    else:
        images, labels, names = _load_tfds(config, split)
    _check_images(images, config, split)
    source = DataSource(images, labels=labels, class_names=names)
    _check_classes(source, config, split)
    return source


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


def unlabelled_reason(config: ml_collections.ConfigDict) -> str | None:
    """Why ``config.data.dataset`` has no labels (a sentence), or None when it has them.

    Cheap: reads a .npz's index, lists a folder, or reads a tfds builder's feature description;
    loads no images. Agrees with what ``load_split`` returns for the training split.
    """
    name = config.data.dataset
    kind = dataset_kind(name)
    if kind == "toy":
        return f"data.dataset={name!r} is a toy data set, which has no labels"
    if kind == "digits":
        return None
    if kind == "prepared":
        if os.path.exists(os.path.join(name, f"{config.data.train_split}_labels.npy")):
            return None
        return f"{name} holds no {config.data.train_split}_labels.npy"
    if kind == "files" and name.endswith(".npz"):
        with np.load(name) as f:
            _, label_key = _npz_keys(f.files, config.data.train_split, name)
        return None if label_key else f"{name} holds no 'labels' array"
    if kind == "files":
        if _folder_classes(name, _folder_files(name))[0] is not None:
            return None
        return f"the images of {name} are not sorted into class sub-folders"
    tfds = _import_tfds(name)
    info = tfds.builder(name, data_dir=config.data.data_dir).info
    if _tfds_label_feature(info) is None:
        return f"the tensorflow-datasets set {name!r} has no 'label' feature"
    return None


def _split_id(split: str) -> int:
    return {"train": 0, "test": 1, "validation": 2}.get(split, 3)


_Loaded = tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]  # images, labels, class names


def _load_digits(split: str) -> _Loaded:
    """scikit-learn's 1,797 handwritten digits: 8x8, levels 0..16; 1,500 train, 297 test; the
    labels are the digits' ``target`` (0..9) of the same rows."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # [1797, 8, 8], levels 0..16
    order = np.random.default_rng(0).permutation(len(images))  # fixed split, whatever the seed
    images = images[order][..., None]  # [1797, 8, 8, 1]
    labels = digits.target[order].astype(np.int32)  # [1797]
    rows = {"train": slice(0, 1500), "test": slice(1500, None), "all": slice(None)}
    if split not in rows:
        raise DatasetError(f"digits has splits 'train', 'test' and 'all', not {split!r}.")
    return images[rows[split]], labels[rows[split]], tuple(str(k) for k in range(10))


def _load_files(path: str, image_size: int, split: str) -> _Loaded:
    """A .npz (key ``split``, else ``images``; neither: a DatasetError naming the keys it has) or
    a folder of images.

    Labels: in a .npz the array ``{split}_labels`` when the images came from key ``split``, else
    ``labels``; in a folder the sorted names of the sub-folders, when every image sits in one.
    """
    if path.endswith(".npz"):
        with np.load(path) as f:
            key, label_key = _npz_keys(f.files, split, path)
            images = _npz_array(f, key, path)
            labels = None if label_key is None else _npz_array(f, label_key, path)
        if labels is not None:
            labels = _checked_labels(labels, len(images), f"{path} (array {label_key!r})")
        return images, labels, ()
    files = _folder_files(path)
    if not files:
        raise DatasetError(f"data.dataset={path!r}: the folder holds no {_IMAGE_SUFFIXES} files.")
    labels, names = _folder_classes(path, files)
    lazy = folder_images(tuple(files), image_size, path)
    if len(files) * image_size * image_size * 3 > IN_MEMORY_MAX_BYTES:
        logging.info("%s: %d images, decoded as batches ask for them.", path, len(files))
        return lazy, labels, names
    return lazy[np.arange(len(files))], labels, names


class LazyImages:
    """Images as a random-access uint8 array [N, H, W, C] read on indexing: ``images[idx]`` for
    an int array idx [b] gives [b, H, W, C], each row ``read(i)``. For sets too large to hold:
    a big folder (``folder_images``), a tfds data source (``_load_tfds_source``)."""

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


def folder_images(files: tuple[str, ...], size: int, path: str) -> LazyImages:
    """The images of ``files`` as RGB [N, size, size, 3] (centre crop, bicubic resize), decoded
    on indexing; a file that fails to decode is a DatasetError naming it."""
    from PIL import Image

    def read(i: int) -> np.ndarray:
        try:
            with Image.open(files[i]) as im:
                return np.asarray(_center_crop_resize(im.convert("RGB"), size))
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for damaged files
            raise DatasetError(
                f"Cannot read the image {files[i]} of data.dataset={path!r}: "
                f"{type(e).__name__}: {e}. Repair or remove it."
            ) from None

    return LazyImages(read, len(files), (size, size, 3))


def _load_prepared(path: str, split: str) -> _Loaded:
    """A folder of ``prepare_data``: ``{split}.npy`` memory-mapped (read row by row as batches
    ask), ``{split}_labels.npy`` if present, class names from ``dataset.json``."""
    import json

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
        labels = _checked_labels(np.load(labels_file), len(images), labels_file)
    with open(os.path.join(path, PREPARED_MARKER)) as f:
        names = tuple(json.load(f).get("class_names", ()))
    return images, labels, names


def _npz_keys(keys: list[str], split: str, path: str) -> tuple[str, str | None]:
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


def _npz_array(f, key: str, path: str) -> np.ndarray:
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


def _checked_labels(labels: np.ndarray, num_images: int, where: str) -> np.ndarray:
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


def _folder_files(path: str) -> list[str]:
    """The image files under ``path``, at any depth, sorted by their full path."""
    return sorted(
        os.path.join(root, f)
        for root, _, names in os.walk(path)
        for f in names
        if f.lower().endswith(_IMAGE_SUFFIXES)
    )


def _folder_classes(path: str, files: list[str]) -> tuple[np.ndarray | None, tuple[str, ...]]:
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


def _center_crop_resize(im, size: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((size, size), Image.BICUBIC) if s != size else im


def _tfds_label_feature(info):
    """The tfds ``label`` feature (a scalar ClassLabel) of a data set's info, else None."""
    import tensorflow_datasets as tfds

    feature = info.features["label"] if "label" in info.features else None
    if isinstance(feature, tfds.features.ClassLabel) and tuple(feature.shape) == ():
        return feature
    return None


TFDS_READERS = ("load", "data_source")


def _load_tfds(config: ml_collections.ConfigDict, split: str) -> _Loaded:
    """A tfds split by ``data.tfds_reader``: ``load`` (``tfds.load`` through TensorFlow, the
    split decoded whole into memory) or ``data_source`` (``_load_tfds_source``)."""
    reader = config.data.tfds_reader
    if reader not in TFDS_READERS:
        raise DatasetError(f"config.data.tfds_reader={reader!r} is not one of {TFDS_READERS}.")
    if reader == "data_source":
        return _load_tfds_source(config, split)
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
            f"data set: {', '.join(OFFLINE_DATASETS)}, a toy set, a folder or a .npz."
        ) from e

    label_feature = _tfds_label_feature(info)

    def prepare(example):
        image = example["image"]  # [h, w, c] uint8
        h, w = tf.shape(image)[0], tf.shape(image)[1]
        if image.shape[0] != size or image.shape[1] != size:
            s = tf.minimum(h, w)  # centre crop to a square, then resize (CelebA: 218x178 -> 64)
            image = image[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
            image = tf.image.resize(image, (size, size), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image if label_feature is None else (image, example["label"])

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)
    batches = list(tfds.as_numpy(ds))
    if label_feature is None:
        return np.concatenate(batches), None, ()
    images = np.concatenate([b[0] for b in batches])  # [N, size, size, C]
    labels = _checked_labels(np.concatenate([b[1] for b in batches]), len(images), name)
    return images, labels, tuple(label_feature.names)


def _load_tfds_source(config: ml_collections.ConfigDict, split: str) -> _Loaded:
    """A tfds set prepared as ArrayRecord (or Parquet), through ``tfds.data_source``: no
    TensorFlow, nothing read whole. Images decode on indexing (``LazyImages``; centre crop and
    bicubic resize where the stored size differs); the labels are read once, up front."""
    tfds = _import_tfds(config.data.dataset)
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
        out = np.asarray(_center_crop_resize(im, size))
        return out[..., None] if mode == "L" else out

    images = LazyImages(read, len(ds), (size, size, channels))
    label_feature = _tfds_label_feature(ds.dataset_info)
    if label_feature is None:
        return images, None, ()
    # Each record read once for its label (tfds's SkipDecoding would import TensorFlow).
    logging.info("Reading the labels of %d records of %s (%s).", len(ds), name, split)
    labels = np.array([ds[i]["label"] for i in range(len(ds))])
    return images, _checked_labels(labels, len(images), name), tuple(label_feature.names)


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


# ----------------------------------------------------------------------------- batches


def global_batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
    """Indices of the global batch of ``step``: a stream walking a fresh permutation per epoch."""
    start = step * batch_size
    positions = np.arange(start, start + batch_size)  # [B] positions in the example stream
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
        sel = epochs == epoch
        out[sel] = perm[offsets[sel]]
    return out


def host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """The rows of the global batch that this host feeds to its devices."""
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def train_batch(
    config: ml_collections.ConfigDict,
    source: DataSource,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> dict[str, np.ndarray]:
    """This host's part of the global training batch of ``step``: ``image``, uint8 images or
    float vectors [b, ...], and for a conditional model (``model.num_classes`` > 0) ``label``
    int32 [b], the classes of the same rows."""
    batch_size = config.training.batch_size
    rows = host_slice(batch_size, process_index, process_count)
    if source.images is None:  # toy data: fresh points each step, from (seed, step)
        key = jax.random.fold_in(jax.random.key(config.seed), step)
        points = np.asarray(toy_data.sample(source.toy_name, key, batch_size), np.float32)
        return {"image": points[rows]}
    idx = global_batch_indices(config.seed, step, batch_size, source.num_examples)[rows]
    images = source.images[idx]  # [b, H, W, C]
    if config.data.random_flip and images.ndim == 4:
        rng = np.random.default_rng([config.seed, 1_000_003, step])
        flip = (rng.random(batch_size) < 0.5)[rows]
        images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
    batch = {"image": images}
    if config.model.num_classes:
        batch["label"] = source.labels[idx]  # [b] int32
    return batch


def num_workers(config: ml_collections.ConfigDict) -> int:
    """Threads assembling batches ahead: ``data.num_workers``, or for -1 what the host can
    spare beside XLA (half its cores, at least 1: 1 on a 2-core machine)."""
    n = config.data.num_workers
    return max(1, (os.cpu_count() or 2) // 2) if n < 0 else n


def train_batches(
    config: ml_collections.ConfigDict,
    source: DataSource,
    start_step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of ``start_step``, ``start_step + 1``, …: ``train_batch`` of each step mapped
    over Grain's ``MapDataset.range(start_step, ...)`` on ``num_workers(config)`` threads, up
    to ``data.prefetch_batches`` ahead (0 workers: in the calling thread, none ahead). The
    position is the step, so the stream is the same however it is read or resumed."""
    import grain

    def batch(step: int) -> dict[str, np.ndarray]:
        return train_batch(config, source, step, process_index, process_count)

    steps = grain.MapDataset.range(start_step, 2**62).map(batch)
    workers = num_workers(config)
    if not workers:
        return (steps[i] for i in range(len(steps)))
    options = grain.ReadOptions(
        num_threads=workers, prefetch_buffer_size=max(1, config.data.prefetch_batches)
    )
    return iter(steps.to_iter_dataset(options))


def eval_batches(
    source: DataSource,
    batch_size: int,
    num_examples: int,
    process_index: int = 0,
    process_count: int = 1,
    labels: bool = False,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(this host's rows of the global batch, mask) over the first ``num_examples`` examples:
    the batch's ``image`` and, with ``labels``, ``label`` (the examples' classes).

    The last batch is padded with copies of example 0 and a mask of 0 so every batch has the same
    shape (one compilation).
    """
    n = source.num_examples if num_examples <= 0 else min(num_examples, source.num_examples)
    rows = host_slice(batch_size, process_index, process_count)
    for start in range(0, n, batch_size):
        idx = np.arange(start, start + batch_size)
        mask = idx < n
        idx = np.where(mask, idx, 0)[rows]
        batch = {"image": source.images[idx]}
        if labels:
            batch["label"] = source.labels[idx]
        yield batch, mask[rows].astype(np.float32)


def to_model_space(batch: jax.Array, num_bins: int) -> jax.Array:
    """uint8 levels k -> 2k/(num_bins-1) - 1 in [-1, 1]; float (vector) data passes through."""
    if batch.dtype == jnp.uint8:
        return batch.astype(jnp.float32) * (2.0 / (num_bins - 1)) - 1.0
    return batch.astype(jnp.float32)


def to_uint8_levels(x: np.ndarray, num_bins: int) -> np.ndarray:
    """Model space [-1, 1] -> the nearest of ``num_bins`` levels, uint8 (inverse of the above)."""
    levels = np.round((np.clip(x, -1.0, 1.0) + 1.0) * (num_bins - 1) / 2.0)
    return levels.astype(np.uint8)
