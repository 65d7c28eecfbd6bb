"""The IDX source (diffusion_jax/data/idx.py) on small IDX files written here by an independent
writer: the arrays and labels come back, tfds is preferred only where it has a prepared copy,
and every missing, wrong or truncated file is one line naming it. Never needs the package."""

import gzip
import json
import struct
import sys

import numpy as np
import pytest
from helpers import run_main

from configs import fashion_mnist
from diffusion_jax import input_pipeline as ip
from diffusion_jax.data import idx

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path, array, code=0x08, gz=True, dims=None):
    """LeCun's format: 0, 0, type code, ndim; the sizes as big-endian uint32; the data."""
    dims = array.shape if dims is None else dims
    raw = bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if gz else open
    with opener(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(raw)


def write_set(folder, num=(12, 5), size=28, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(exist_ok=True)
    out = {}
    for (split, (images_name, labels_name)), n in zip(FILES.items(), num, strict=True):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(folder / images_name, images, gz=gz)
        write_idx(folder / labels_name, labels, gz=gz)
        out[split] = (images, labels)
    return out


def config_for(folder, name="fashion_mnist"):
    config = fashion_mnist.get_config()
    config.data.dataset = name
    config.data.idx_dir = str(folder)
    config.data.data_dir = str(folder / "no-tfds-here")
    return config


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_idx_files_load_with_their_labels(tmp_path, gz, name):
    written = write_set(tmp_path / "idx", gz=gz)
    config = config_for(tmp_path / "idx", name)
    assert ip.dataset_kind(name, config.data) == "idx"
    ip.validate_dataset(config)
    for split, (images, labels) in written.items():
        source = ip.load_split(config, split)
        np.testing.assert_array_equal(source.images, images[..., None])
        np.testing.assert_array_equal(source.labels, labels)
        assert source.images.dtype == np.uint8 and source.labels.dtype == np.int32
        assert source.num_classes == 10
    assert ip.unlabelled_reason(config) is None
    names = ip.load_split(config, "test").class_names
    assert names[0] == ("T-shirt/top" if name == "fashion_mnist" else "0") and len(names) == 10
    with pytest.raises(ip.DatasetError, match=r"has splits \('train', 'test'\), not 'valid'"):
        ip.load_split(config, "valid")


def test_without_idx_dir_fashion_mnist_reads_the_system_folder(tmp_path, monkeypatch):
    written = write_set(tmp_path / "system")
    fake = idx.IdxSet(idx.SETS["fashion_mnist"].class_names, str(tmp_path / "system"), "pkg")
    monkeypatch.setitem(idx.SETS, "fashion_mnist", fake)
    config = config_for(tmp_path / "system")
    config.data.idx_dir = ""
    np.testing.assert_array_equal(ip.load_split(config, "train").labels, written["train"][1])


def test_the_files_in_data_dir_are_read_when_idx_dir_is_unset(tmp_path):
    """gpu_fashion.sh's way: --config.data.data_dir=FOLDER of the four files themselves."""
    written = write_set(tmp_path / "idx")
    config = config_for(tmp_path / "idx")
    config.data.idx_dir, config.data.data_dir = "", str(tmp_path / "idx")
    assert ip.dataset_kind("fashion_mnist", config.data) == "idx"
    np.testing.assert_array_equal(ip.load_split(config, "test").labels, written["test"][1])


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_no_idx_files_and_no_tfds_is_one_line_naming_the_key_files_and_package(
    tmp_path, monkeypatch, name
):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # the base install
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    config = config_for(tmp_path / "empty", name)
    for folder in (str(tmp_path / "empty"), ""):
        config.data.idx_dir = folder
        if name == "fashion_mnist":  # its system folder: missing too
            fake = idx.IdxSet(idx.SETS[name].class_names, str(tmp_path / "none"), "the-pkg")
            monkeypatch.setitem(idx.SETS, name, fake)
        assert ip.dataset_kind(name, config.data) == "idx"
        for call in (ip.validate_dataset, lambda c: ip.load_split(c, "train")):
            with pytest.raises(ip.DatasetError) as e:
                call(config)
            message = str(e.value)
            assert "\n" not in message and "data.idx_dir" in message
            assert all(f in message for pair in FILES.values() for f in pair)
            assert ("apt-get install the-pkg" in message) == (name == "fashion_mnist")


def test_a_prepared_tfds_copy_is_preferred_and_found_without_tensorflow(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")
    write_set(tmp_path / "idx")
    config = config_for(tmp_path / "idx")
    assert ip.dataset_kind("fashion_mnist", config.data) == "idx"
    version = tmp_path / "tfds" / "fashion_mnist" / "3.0.1"
    version.mkdir(parents=True)
    (version / "dataset_info.json").write_text(json.dumps({"name": "fashion_mnist"}))
    config.data.data_dir = str(tmp_path / "tfds")
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # the check imports no TensorFlow
    assert ip.dataset_kind("fashion_mnist", config.data) == "tfds_load"
    config.data.tfds_reader = "data_source"
    assert ip.dataset_kind("fashion_mnist", config.data) == "tfds_source"
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # no tfds: the IDX files
    assert ip.dataset_kind("fashion_mnist", config.data) == "idx"


def _damage(folder, how):
    images_file = folder / (FILES["train"][0] + ".gz")
    labels_file = folder / (FILES["train"][1] + ".gz")
    images = np.zeros((12, 28, 28), np.uint8)
    if how == "bad magic":
        with gzip.open(images_file, "wb") as f:
            f.write(b"\x50\x4b\x03\x04" + bytes(100))
        return images_file, "not an IDX file"
    if how == "truncated":
        with gzip.open(images_file, "rb") as f:
            raw = f.read()
        with gzip.open(images_file, "wb") as f:
            f.write(raw[:-100])
        return images_file, "truncated"
    if how == "truncated header":
        with gzip.open(images_file, "wb") as f:
            f.write(bytes([0, 0, 8, 3, 0, 0]))
        return images_file, "truncated IDX header"
    if how == "not gzip":
        images_file.write_bytes(b"plain bytes, not gzip")
        return images_file, "cannot be read as IDX"
    if how == "int32 images":
        write_idx(folder / FILES["train"][0], images.astype(np.int32), code=0x0C)
        return images_file, "images must be uint8 of 3 dimensions"
    if how == "2-D images":
        write_idx(folder / FILES["train"][0], images.reshape(12, -1))
        return images_file, "images must be uint8 of 3 dimensions"
    if how == "fewer labels":
        write_idx(folder / FILES["train"][1], np.zeros(11, np.uint8))
        return labels_file, r"labels must be uint8 of shape \(12,\)"
    if how == "label 10":
        write_idx(folder / FILES["train"][1], np.full(12, 10, np.uint8))
        return labels_file, r"class indices 0..9; got up to 10"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how",
    [
        "bad magic",
        "truncated",
        "truncated header",
        "not gzip",
        "int32 images",
        "2-D images",
        "fewer labels",
        "label 10",
    ],
)
def test_a_wrong_or_truncated_idx_file_is_one_line_naming_it(tmp_path, how):
    folder = tmp_path / "idx"
    write_set(folder)
    path, reason = _damage(folder, how)
    with pytest.raises(ip.DatasetError) as e:
        ip.load_split(config_for(folder), "train")
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert __import__("re").search(reason, message), message
    ip.load_split(config_for(folder), "test")  # the other split's files are still fine


def test_read_idx_reads_every_type_code_big_endian(tmp_path):
    rng = np.random.default_rng(1)
    for code, dtype in {
        0x08: np.uint8,
        0x09: np.int8,
        0x0B: np.int16,
        0x0C: np.int32,
        0x0D: np.float32,
        0x0E: np.float64,
    }.items():
        array = (rng.standard_normal((3, 4, 2)) * 50).astype(dtype)
        write_idx(tmp_path / f"a{code}", array, code=code, gz=False)
        got = idx.read_idx(str(tmp_path / f"a{code}"))
        np.testing.assert_array_equal(got, array)
        assert got.dtype == np.dtype(dtype) and got.dtype.isnative


@pytest.mark.system
def test_fashion_mnist_config_trains_from_idx_files(tmp_path):
    """configs/fashion_mnist.py (shrunk by the tiny overrides) on IDX files: training, a
    sample, and the bound estimated from 4 t per example."""
    write_set(tmp_path / "idx", num=(16, 8))
    run_main(
        tmp_path / "run",
        config="configs/fashion_mnist.py",
        **{
            "data.idx_dir": str(tmp_path / "idx"),
            "diffusion.num_timesteps": 20,
            "eval.bound_num_t": 4,
            "eval.num_examples": 8,
            "eval.rate_distortion.num_examples": 8,
            "eval.metrics": ("bpd",),  # the classifier metrics train a classifier: not here
        },
    )
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["bound_estimate"] == {"kind": "stratified", "num_t": 4}
    assert metrics["num_examples"] == 8 and np.isfinite(metrics["bpd"])
    assert "terms_bpd_per_t" not in metrics
    # t from the run's own loss-aware distribution, read from its checkpoint's loss history.
    run_main(
        tmp_path / "run",
        "--mode=eval",
        config="configs/fashion_mnist.py",
        **{
            "data.idx_dir": str(tmp_path / "idx"),
            "diffusion.num_timesteps": 20,
            "eval.bound_num_t": 4,
            "eval.bound_t_sampler": "importance",
            "eval.num_examples": 8,
            "eval.metrics": ("bpd",),
        },
    )
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert metrics["bound_estimate"] == {"kind": "importance", "num_t": 4}
    assert np.isfinite(metrics["bpd"])


@pytest.mark.parametrize("tf", ["without TensorFlow", "with tfds and TensorFlow importable"])
def test_a_missing_file_or_folder_or_an_empty_set_is_one_line_naming_it(tmp_path, monkeypatch, tf):
    """Issue 41 rows 10 and 11: with data.idx_dir set the IDX files are read whatever else is
    installed, and what is wrong is named (the folder, the missing file, the empty file)."""
    from diffusion_jax.data import tfds_load

    if tf == "without TensorFlow":
        monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
        monkeypatch.setitem(sys.modules, "tensorflow", None)
    else:
        monkeypatch.setattr(tfds_load, "installed", lambda *names: True)
    config = config_for(tmp_path / "idx")
    write_set(tmp_path / "idx")
    (tmp_path / "idx" / "t10k-images-idx3-ubyte.gz").unlink()
    for folder, expected in (
        (tmp_path / "nowhere", "(data.idx_dir) is not a folder. Set --config.data.idx_dir=DIR"),
        (tmp_path / "idx", "(data.idx_dir) lacks t10k-images-idx3-ubyte. Set"),
    ):
        config.data.idx_dir = str(folder)
        assert ip.dataset_kind("fashion_mnist", config.data) == "idx"
        with pytest.raises(ip.DatasetError) as e:
            ip.validate_dataset(config)
        assert f"{folder} {expected}" in str(e.value) and "\n" not in str(e.value)
    write_set(tmp_path / "idx", num=(0, 5))
    with pytest.raises(ip.DatasetError) as e:
        ip.validate_dataset(config)
    assert str(e.value).startswith(
        f"{tmp_path / 'idx' / 'train-images-idx3-ubyte.gz'} holds 0 items: an empty set"
    )
