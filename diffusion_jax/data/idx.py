"""Fashion-MNIST and MNIST from the four IDX files of their original release (LeCun et al.'s
format: a magic number, the dimensions, then the data, big-endian; gzipped or not).

``data.dataset = "fashion_mnist"`` or ``"mnist"`` (the tfds names) read here unless tfds has a
prepared copy (found on disk, without importing TensorFlow): from ``data.idx_dir`` when set, else
from ``data.data_dir`` when the four files lie there, else, for Fashion-MNIST, Debian's
``/usr/share/datasets/fashion-mnist/`` (``apt-get install dataset-fashion-mnist``). Every file is
checked: magic number, dtype, dimensions, sizes that agree, labels in range; a wrong or truncated
file is one DatasetError naming it.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zlib

import numpy as np

from diffusion_jax.data import tfds_load
from diffusion_jax.data.base import DatasetError, DataSource, Source

# The IDX type codes (third byte of the magic number) and their big-endian numpy types.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLIT_FILES = {  # split -> (images, labels), each as NAME or NAME.gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True)
class IdxSet:
    class_names: tuple[str, ...]
    system_dir: str = ""  # where a system package installs the files ("" = none)
    package: str = ""  # that package


SETS = {
    "fashion_mnist": IdxSet(
        class_names=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
        system_dir="/usr/share/datasets/fashion-mnist",
        package="dataset-fashion-mnist",
    ),
    "mnist": IdxSet(class_names=tuple(str(k) for k in range(10))),
}


def read_idx(path: str) -> np.ndarray:
    """The array in the IDX file ``path`` (``.gz``: gzipped), in native byte order.

    Magic number: two zero bytes, the type code (IDX_DTYPES), the number of dimensions d; then d
    big-endian uint32 sizes, then the data. Anything else is a DatasetError naming the file.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot be read as IDX ({type(e).__name__}: {e}).") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES or not raw[3]:
        raise DatasetError(
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}: expected 00 00, "
            f"a type code in {{{', '.join(f'{c:02x}' for c in IDX_DTYPES)}}} and the number of "
            "dimensions)."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, needs {header}).")
    dims = tuple(int(n) for n in np.frombuffer(raw[4:header], ">u4"))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    size = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != size:
        raise DatasetError(
            f"{path}: {len(raw)} bytes, but its header says {'x'.join(map(str, dims))} of "
            f"{dtype.name}, {size} bytes ({'truncated' if len(raw) < size else 'trailing data'})."
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    return None


def _complete(folder: str) -> bool:
    """Whether ``folder`` holds all four IDX files (each plain or .gz)."""
    return bool(folder) and all(_find(folder, n) for pair in SPLIT_FILES.values() for n in pair)


def idx_dir(data, name: str) -> tuple[str, str]:
    """(the folder of set ``name`` to read, where it comes from): ``data.idx_dir`` when set
    (``data`` a config's data section, or None); else the first of
    ``data.data_dir`` (when it holds the four files themselves, not a tfds copy) and the set's
    system folder that is complete; else the system folder (or "")."""
    folder = getattr(data, "idx_dir", "") or ""
    if folder:
        return folder, "data.idx_dir"
    data_dir = getattr(data, "data_dir", None) or ""
    if _complete(data_dir):
        return data_dir, "data.data_dir"
    return SETS[name].system_dir, "the default folder"


def _missing(config) -> str | None:
    """Why the IDX files cannot be read (a sentence naming the folder or the files missing, the
    key to set and, for Fashion-MNIST, the package), or None when all four are there."""
    folder, origin = idx_dir(config.data, config.data.dataset)
    if _complete(folder):
        return None
    names = [n for pair in SPLIT_FILES.values() for n in pair]
    name, s = config.data.dataset, SETS[config.data.dataset]
    if not folder:
        where = "data.idx_dir is unset"
    elif not os.path.isdir(folder):
        where = f"{folder} ({origin}) is not a folder"
    else:
        absent = [n for n in names if not _find(folder, n)]
        where = f"{folder} ({origin}) lacks {', '.join(absent)}"
    install = f"; or `apt-get install {s.package}` puts them in {s.system_dir}" if s.package else ""
    return (
        f"data.dataset={name!r}: no tensorflow-datasets copy is prepared and {where}. Set "
        f"--config.data.idx_dir=DIR to a folder with {', '.join(names)} (each may end in "
        f".gz){install}."
    )


def _num_items(path: str) -> int | None:
    """The first dimension in the header of the IDX file ``path`` (None: unreadable, left to
    ``read_idx`` to name)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(8)
    except (OSError, EOFError, zlib.error):
        return None
    if len(head) < 8 or head[:2] != b"\0\0" or head[2] not in IDX_DTYPES or not head[3]:
        return None
    return int.from_bytes(head[4:8], "big")


def load(config, split: str) -> DataSource:
    """Images uint8 [N, 28, 28, 1] and labels int32 [N] of ``split`` ('train' or 'test')."""
    name = config.data.dataset
    if split not in SPLIT_FILES:
        raise DatasetError(f"{name} (IDX) has splits {tuple(SPLIT_FILES)}, not {split!r}.")
    validate(config)
    folder, _ = idx_dir(config.data, config.data.dataset)
    image_file, label_file = (_find(folder, n) for n in SPLIT_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{image_file}: images must be uint8 of 3 dimensions [N, H, W]; got {images.dtype} "
            f"of shape {images.shape}."
        )
    classes = SETS[name].class_names
    if labels.ndim != 1 or labels.dtype != np.uint8 or len(labels) != len(images):
        raise DatasetError(
            f"{label_file}: labels must be uint8 of shape ({len(images)},), one per image of "
            f"{os.path.basename(image_file)}; got {labels.dtype} of shape {labels.shape}."
        )
    if len(labels) and labels.max() >= len(classes):
        raise DatasetError(
            f"{label_file}: labels must be class indices 0..{len(classes) - 1}; got up to "
            f"{labels.max()}."
        )
    return DataSource(images[..., None], labels=labels.astype(np.int32), class_names=classes)


def validate(config) -> None:
    """DatasetError for files that are missing, or that hold no images (cheap: headers only)."""
    reason = _missing(config)
    if reason:
        raise DatasetError(reason)
    folder, origin = idx_dir(config.data, config.data.dataset)
    for pair in SPLIT_FILES.values():
        for n in pair:
            path = _find(folder, n)
            if _num_items(path) == 0:
                raise DatasetError(
                    f"{path} holds 0 items: an empty set cannot be trained or evaluated; set "
                    f"--config.data.idx_dir to a folder ({origin}: {folder}) with the full files."
                )


def matches(name: str, data) -> bool:
    """An IDX set, unless tfds is installed and has a prepared copy, or (``data.idx_dir`` unset)
    no IDX files are there and tfds can read it (with TensorFlow for ``tfds.load``, which may
    download it, as before)."""
    if name not in SETS:
        return False
    data_dir = getattr(data, "data_dir", None)
    if tfds_load.installed("tensorflow_datasets") and tfds_load.prepared_copy(name, data_dir):
        return False
    if getattr(data, "idx_dir", ""):  # asked for by name: its errors name the folder and files
        return True
    have_files = _complete(idx_dir(data, name)[0])
    reader_needs = ("tensorflow",) if getattr(data, "tfds_reader", "load") == "load" else ()
    return have_files or not tfds_load.installed("tensorflow_datasets", *reader_needs)


SOURCE = Source(
    matches=matches, load=load, unlabelled_reason=lambda config: None, validate=validate
)
