"""Sets larger than memory: ``prepare_data`` writes memory-mappable splits, folders decode
lazily, and either gives the very batches of the in-memory source."""

import numpy as np
import pytest

from configs import cifar10_ddpm, digits
from diffusion_jax import input_pipeline as ip
from diffusion_jax import prepare_data
from diffusion_jax.data import folder


def _folder(tmp_path, n=12, size=10):
    """Images of two classes in sub-folders, of a size that is centre-cropped and resized."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for i in range(n):
        folder = root / ("cat" if i % 3 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png"
        )
    return root


def _config(dataset, size=8, **data):
    config = cifar10_ddpm.get_config()
    config.data.dataset = str(dataset)
    config.data.image_size, config.data.num_channels = size, 3
    config.training.batch_size = 4
    for key, value in data.items():
        config.data[key] = value
    return config


def test_a_prepared_folder_is_memory_mapped_and_gives_the_same_batches(tmp_path):
    root = _folder(tmp_path)
    prepare_data.prepare(str(root), str(tmp_path / "prepared"), 8, "train")
    eager = ip.load_split(_config(root), "train")
    mapped = ip.load_split(_config(tmp_path / "prepared"), "train")
    assert ip.dataset_kind(str(tmp_path / "prepared")) == "prepared"
    assert isinstance(mapped.images, np.memmap) and mapped.class_names == ("cat", "dog")
    np.testing.assert_array_equal(np.asarray(mapped.images), eager.images)
    np.testing.assert_array_equal(mapped.labels, eager.labels)
    config = _config(tmp_path / "prepared", random_flip=True)
    config.model.num_classes = 2
    for step in range(5):
        a = ip.train_batch(config, eager, step)
        b = ip.train_batch(config, mapped, step)
        for key in ("image", "label"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(ip.DatasetError, match=r"has no split 'test'; its splits: train"):
        ip.load_split(config, "test")


def test_digits_prepared_from_an_npz_train_bit_for_bit_like_digits(tmp_path):
    """Today's digits batches, read from a prepared copy: the same bytes at every step."""
    config = digits.get_config()
    config.training.batch_size = 64
    train, test = ip.load_split(config, "train"), ip.load_split(config, "test")
    np.savez(
        tmp_path / "digits.npz",
        train=train.images,
        train_labels=train.labels,
        test=test.images,
        test_labels=test.labels,
    )
    meta = prepare_data.prepare(str(tmp_path / "digits.npz"), str(tmp_path / "d"), 0, "train")
    assert meta["splits"]["train"]["num_examples"] == 1500
    prepared = digits.get_config()
    prepared.data.dataset = str(tmp_path / "d")
    prepared.training.batch_size = 64
    prepared.model.num_classes = 10
    mapped = ip.load_split(prepared, "train")
    assert ip.unlabelled_reason(prepared) is None
    for step in (0, 23, 24, 100):  # across epochs (1500 / 64 = 23.4 steps each)
        np.testing.assert_array_equal(
            ip.train_batch(prepared, mapped, step)["image"],
            ip.train_batch(config, train, step)["image"],
        )
    np.testing.assert_array_equal(ip.load_split(prepared, "test").labels, test.labels)


def test_a_large_folder_decodes_lazily_the_same_images(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    eager = ip.load_split(_config(root), "train")
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)  # every folder counts as large
    lazy = ip.load_split(_config(root), "train")
    assert isinstance(lazy.images, ip.LazyImages) and lazy.images.shape == (12, 8, 8, 3)
    config = _config(root, random_flip=True)
    for step in range(4):
        np.testing.assert_array_equal(
            ip.train_batch(config, lazy, step)["image"],
            ip.train_batch(config, eager, step)["image"],
        )
    with pytest.raises(ip.DatasetError, match=r"decoded lazily.*prepare_data"):
        ip.load_split(_config(root, num_bins=17), "train")


def test_a_file_that_fails_to_decode_mid_run_stops_the_batches_naming_it(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 0)
    config = _config(root)
    source = ip.load_split(config, "train")
    bad = root / "cat" / "001.png"
    bad.write_bytes(bad.read_bytes()[:30])  # truncated after the run started
    batches = ip.train_batches(config, source, 0)
    with pytest.raises(ip.DatasetError, match=f"Cannot read the image {bad}"):
        for _ in range(3):  # the 12 images are all read within three batches of 4
            next(batches)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_ahead_on_workers_are_the_steps_batches_in_order(workers):
    config = digits.get_config()
    config.training.batch_size = 16
    config.data.num_workers = workers
    source = ip.load_split(config, "train")
    it = ip.train_batches(config, source, start_step=7)
    for step in range(7, 12):
        np.testing.assert_array_equal(
            next(it)["image"], ip.train_batch(config, source, step)["image"]
        )
    assert ip.num_workers(config) == workers
    config.data.num_workers = -1
    assert ip.num_workers(config) >= 1


def test_prefetch_to_devices_keeps_the_order():
    import jax

    from diffusion_jax import sharding

    mesh = sharding.make_mesh()
    local = [{"image": np.full((2, 3), i, np.uint8)} for i in range(5)]
    out = list(sharding.prefetch(mesh, iter(local), size=2))
    assert [int(np.asarray(b["image"])[0, 0]) for b in out] == list(range(5))
    assert all(isinstance(b["image"], jax.Array) for b in out)


@pytest.mark.smoke
def test_the_command_line_writes_a_folder_and_names_a_missing_input(tmp_path):
    import subprocess
    import sys

    from helpers import ROOT

    root = _folder(tmp_path)
    cmd = [sys.executable, "-m", "diffusion_jax.prepare_data", "--input", str(root)]
    run = dict(cwd=ROOT, capture_output=True, text=True, timeout=300)
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "out"), "--image_size", "8"], **run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    images = np.load(tmp_path / "out" / "train.npy", mmap_mode="r")
    assert images.shape == (12, 8, 8, 3)
    np.testing.assert_array_equal(
        np.load(tmp_path / "out" / "train_labels.npy"), ip.load_split(_config(root), "train").labels
    )
    cmd[-1] = str(tmp_path / "missing")
    proc = subprocess.run([*cmd, "--output", str(tmp_path / "out2")], **run)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: --input={cmd[-1]!r}: no such file or folder."
    ]


def _npz(path, labels=True, n=6):
    rng = np.random.default_rng(1)
    arrays = {"train": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)}
    if labels:
        arrays["train_labels"] = np.arange(n) % 2
    np.savez(path, **arrays)
    return str(path)


def test_a_second_write_never_mixes_with_the_first(tmp_path):
    """Issue 28 #2: an unlabelled set written over a labelled one must not keep its labels."""
    out = str(tmp_path / "out")
    prepare_data.prepare(_npz(tmp_path / "a.npz"), out, 8, "train")
    with pytest.raises(ip.DatasetError, match=r"--output=.* is not empty .*--overwrite"):
        prepare_data.prepare(_npz(tmp_path / "b.npz", labels=False), out, 8, "train")
    assert ip.load_split(_config(out), "train").labels is not None  # untouched
    prepare_data.prepare(_npz(tmp_path / "b.npz", labels=False), out, 8, "train", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset.json", "train.npy"]
    assert ip.load_split(_config(out), "train").labels is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out"]  # no temp


def test_the_reader_checks_dataset_json_against_the_files(tmp_path):
    import json

    out = tmp_path / "out"
    prepare_data.prepare(_npz(tmp_path / "a.npz", labels=False), str(out), 8, "train")
    np.save(out / "train_labels.npy", np.zeros(6, np.int32))  # left by another write
    with pytest.raises(ip.DatasetError, match=r"dataset.json says split 'train' has labels=False"):
        ip.load_split(_config(out), "train")
    (out / "train_labels.npy").unlink()
    (out / "dataset.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ip.DatasetError, match=r"out/dataset.json holds list \[1, 2\]"):
        ip.load_split(_config(out), "train")
    (out / "dataset.json").write_text("{garbage")
    with pytest.raises(ip.DatasetError, match=r"out/dataset.json cannot be read as JSON"):
        ip.load_split(_config(out), "train")


def test_bad_image_sizes_and_outputs_are_one_line(tmp_path):
    root = _folder(tmp_path)
    with pytest.raises(ip.DatasetError, match=r"--image_size=-4 must be an integer >= 1"):
        prepare_data.prepare(str(root), str(tmp_path / "o"), -4, "train")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ip.DatasetError, match=r"--output=.*file' is a file, not a folder"):
        prepare_data.prepare(str(root), str(tmp_path / "file"), 8, "train")


def test_a_full_disk_is_one_line_and_leaves_the_old_set_and_no_temporary(
    tmp_path, monkeypatch, capsys
):
    """Issue 41 rows 3 and 14: ENOSPC from the write of the images (no memory map, which would
    die of SIGBUS) and Ctrl-C leave the old set whole and no temporary folder; a dead run's
    OUTPUT.tmp-PID folder is removed by the next one."""
    import errno
    import os
    import subprocess
    import sys

    from diffusion_jax import files

    out = tmp_path / "out"
    prepare_data.prepare(_npz(tmp_path / "a.npz"), str(out), 8, "train")
    before = (out / "train.npy").read_bytes()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"out.tmp-{dead.pid}").mkdir()  # left by a kill -9
    (tmp_path / f"out.tmp-{dead.pid}" / "train.npy").write_bytes(b"half")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_map(*args, **kwargs):
        raise AssertionError("a memory map written on a full disk dies of SIGBUS")

    monkeypatch.setattr(os, "fsync", full)
    monkeypatch.setattr(np.lib.format, "open_memmap", no_map)
    with pytest.raises(files.WriteError) as e:
        prepare_data.prepare(_npz(tmp_path / "b.npz"), str(out), 8, "train", overwrite=True)
    assert str(e.value) == (
        f"cannot write {out}: No space left on device (ENOSPC); any previous version of it is kept."
    )
    assert (out / "train.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out"]

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C mid-write

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(SystemExit) as e:
        prepare_data.main(["--input", str(tmp_path / "b.npz"), "--output", str(out), "--overwrite"])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"interrupted: nothing written to {out} (as it was)."
    assert (out / "train.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out"]
