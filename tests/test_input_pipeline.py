import os
import re
import sys

import numpy as np
import pytest

from configs import cifar10_ddpm, digits
from diffusion_jax import config as config_lib
from diffusion_jax import input_pipeline as ip


def test_digits_splits_levels_and_shapes():
    config = digits.get_config()
    train = ip.load_split(config, "train").images
    test = ip.load_split(config, "test").images
    assert train.shape == (1500, 8, 8, 1) and test.shape == (297, 8, 8, 1)
    assert train.dtype == np.uint8 and train.max() == 16 and train.min() == 0
    from sklearn.datasets import load_digits

    reference = load_digits().images.astype(np.uint8)  # the same 1,797 images, in some order
    both = np.concatenate([train, test])[..., 0]
    assert sorted(map(bytes, both)) == sorted(map(bytes, reference))


def test_to_model_space_maps_levels_to_unit_interval():
    levels = np.arange(17, dtype=np.uint8)
    x = np.asarray(ip.to_model_space(levels, 17))
    np.testing.assert_allclose(x, 2 * np.arange(17) / 16 - 1, atol=1e-7)
    np.testing.assert_array_equal(ip.to_uint8_levels(x, 17), levels)


@pytest.mark.parametrize("batch_size", [7, 128, 500])
def test_each_epoch_visits_every_example_once(batch_size):
    n = 50
    steps = 3 * n // batch_size + 2
    stream = np.concatenate([ip.global_batch_indices(3, s, batch_size, n) for s in range(steps)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n]) == list(range(n))
    # A pure function of (seed, step): recomputing gives the same batch; another seed differs.
    np.testing.assert_array_equal(
        ip.global_batch_indices(3, 2, batch_size, n), ip.global_batch_indices(3, 2, batch_size, n)
    )
    assert not np.array_equal(
        ip.global_batch_indices(3, 0, batch_size, n), ip.global_batch_indices(4, 0, batch_size, n)
    )


def test_host_slices_tile_the_global_batch():
    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    config.training.batch_size = 8
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 4, 1), dtype=np.uint8)
    source = ip.DataSource(images)
    whole = ip.train_batch(config, source, step=5)["image"]
    parts = [ip.train_batch(config, source, 5, p, 4)["image"] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    # Flips are seeded per step: some images are mirrored, and the same step repeats exactly.
    config.data.random_flip = False
    unflipped = ip.train_batch(config, source, step=5)["image"]
    flipped = np.any(whole != unflipped, axis=(1, 2, 3))
    assert 0 < flipped.sum() < 8
    np.testing.assert_array_equal(whole[flipped], unflipped[flipped][:, :, ::-1])


def test_train_batches_iterator_matches_pure_function():
    config = digits.get_config()
    config.training.batch_size = 16
    source = ip.load_split(config, "train")
    it = ip.train_batches(config, source, start_step=7)
    for step in range(7, 10):
        batch = next(it)
        assert list(batch) == ["image"]  # an unconditional model: no labels
        np.testing.assert_array_equal(batch["image"], ip.train_batch(config, source, step)["image"])


def test_eval_batches_pad_and_mask():
    source = ip.DataSource(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1))
    batches = list(ip.eval_batches(source, 4, 0))
    assert [m.sum() for _, m in batches] == [4, 4, 2]
    assert all(b["image"].shape == (4, 1, 1, 1) and "label" not in b for b, _ in batches)
    np.testing.assert_array_equal(batches[2][0]["image"][:2, 0, 0, 0], [8, 9])
    assert sum(m.sum() for _, m in ip.eval_batches(source, 4, 6)) == 6
    # With labels: each row's label is its image's (here label = 9 - level), padding included.
    labelled = ip.DataSource(source.images, labels=np.arange(9, -1, -1, dtype=np.int32))
    for b, _ in ip.eval_batches(labelled, 4, 0, labels=True):
        np.testing.assert_array_equal(b["label"], 9 - b["image"][:, 0, 0, 0])


def test_npz_and_folder_sources(tmp_path):
    from PIL import Image

    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 8, 3
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images)
    config.data.dataset = str(tmp_path / "mine.npz")
    np.testing.assert_array_equal(ip.load_split(config, "train").images, images)

    folder = tmp_path / "pics"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(np.kron(im, np.ones((2, 3, 1), np.uint8))).save(folder / f"{i}.png")
    config.data.dataset = str(folder)
    loaded = ip.load_split(config, "train").images  # 16x24 -> centre crop 16x16 -> 8x8
    assert loaded.shape == (5, 8, 8, 3) and loaded.dtype == np.uint8


def test_wrong_shapes_and_unknown_names_are_clear_errors(tmp_path):
    config = digits.get_config()
    config.data.image_size = 16
    with pytest.raises(ip.DatasetError, match=r"shape \(8, 8, 1\).*\(16, 16, 1\)"):
        ip.load_split(config, "train")
    config.data.dataset = "no_such_dataset_xyz"
    with pytest.raises(ip.DatasetError, match="Unknown data set.*no_such_dataset_xyz.*digits"):
        ip.validate_dataset(config)
    config.data.dataset = str(tmp_path / "missing.npz")
    with pytest.raises(ip.DatasetError, match="no such file"):
        ip.validate_dataset(config)


def test_tfds_path_with_mock_data():
    import tensorflow_datasets as tfds

    config = cifar10_ddpm.get_config()  # cifar10, 32x32x3
    config.data.dataset = "cifar10"
    with tfds.testing.mock_data(num_examples=12):
        images = ip.load_split(config, "train").images
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
    with tfds.testing.mock_data(num_examples=6):
        assert ip.load_split(config, "test").images.shape == (6, 28, 28, 1)
    config.data.image_size = 16  # resized on the way in
    with tfds.testing.mock_data(num_examples=3):
        assert ip.load_split(config, "test").images.shape == (3, 16, 16, 1)


def test_tfds_offline_gives_a_clear_message(tmp_path):
    config = cifar10_ddpm.get_config()
    config.data.dataset = "mnist"
    config.data.image_size, config.data.num_channels = 28, 1
    config.data.data_dir = str(tmp_path)  # nothing prepared there, and no network here
    with pytest.raises(
        ip.DatasetError, match="Could not load tensorflow-datasets 'mnist'.*offline"
    ):
        ip.load_split(config, "train")
    assert not os.path.exists(tmp_path / "mnist" / "3.0.1" / "dataset_info.json")


# ----------------------------------------------------------------------------- labels


def test_digits_labels_are_sklearns_targets_of_the_same_rows():
    from sklearn.datasets import load_digits

    config = digits.get_config()
    reference = load_digits()
    # Each row's label is the target of the sklearn image it shows (found by its bytes).
    target_of = {}
    for image, target in zip(reference.images.astype(np.uint8), reference.target, strict=True):
        target_of.setdefault(image.tobytes(), set()).add(int(target))
    for split, n in (("train", 1500), ("test", 297)):
        source = ip.load_split(config, split)
        assert source.labels.dtype == np.int32 and source.labels.shape == (n,)
        assert source.num_classes == 10 and source.class_names == tuple("0123456789")
        for image, label in zip(source.images[..., 0], source.labels, strict=True):
            assert int(label) in target_of[image.tobytes()]
    # The images (and so every batch) are those of before the labels: the fixed permutation.
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(
        ip.load_split(config, "test").images[..., 0],
        reference.images.astype(np.uint8)[order][1500:],
    )
    np.testing.assert_array_equal(
        ip.load_split(config, "test").labels, reference.target[order][1500:]
    )
    assert ip.unlabelled_reason(config) is None


def test_toy_data_has_no_labels():
    from configs import toy_moons

    config = toy_moons.get_config()
    source = ip.load_split(config, "test")
    assert source.labels is None and source.num_classes == 0
    assert "toy data set" in ip.unlabelled_reason(config)


def test_npz_with_and_without_labels(tmp_path):
    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4, 1), dtype=np.uint8)
    labels = np.array([3, 0, 1, 3, 2, 0], np.int64)

    np.savez(tmp_path / "plain.npz", images=images)
    config.data.dataset = str(tmp_path / "plain.npz")
    source = ip.load_split(config, "train")
    assert source.labels is None and source.num_classes == 0
    assert "holds no 'labels' array" in ip.unlabelled_reason(config)

    np.savez(tmp_path / "labelled.npz", labels=labels, images=images)  # labels first: still images
    config.data.dataset = str(tmp_path / "labelled.npz")
    source = ip.load_split(config, "train")
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
    assert source.labels.dtype == np.int32 and source.num_classes == 4
    assert ip.unlabelled_reason(config) is None

    # Per-split arrays: the labels of each split are its own.
    np.savez(
        tmp_path / "splits.npz",
        train=images[:4],
        train_labels=labels[:4],
        test=images[4:],
        test_labels=labels[4:],
    )
    config.data.dataset = str(tmp_path / "splits.npz")
    np.testing.assert_array_equal(ip.load_split(config, "test").labels, labels[4:])
    np.testing.assert_array_equal(ip.load_split(config, "train").labels, labels[:4])


@pytest.mark.parametrize(
    "bad, shown",
    [
        (np.array([0, 1, 2]), r"shape \(3,\)"),  # one short
        (np.zeros((6, 1), np.int32), r"shape \(6, 1\)"),
        (np.array([0.0, 1, 2, 0, 1, 2]), "dtype float64"),
        (np.array([0, 1, -1, 0, 1, 2]), r"values -1\.\.2"),
    ],
)
def test_a_bad_labels_array_is_refused_naming_the_file(tmp_path, bad, shown):
    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    path = tmp_path / "mine.npz"
    np.savez(path, images=np.zeros((6, 4, 4, 1), np.uint8), labels=bad)
    config.data.dataset = str(path)
    with pytest.raises(ip.DatasetError) as e:
        ip.load_split(config, "train")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "labels" in message
    assert re.search(shown, message), message
    assert r"shape (6,)" in message  # what is allowed


def test_a_folder_with_sub_folders_gives_labels_by_sorted_folder_name(tmp_path):
    from PIL import Image

    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 3
    rng = np.random.default_rng(1)
    # Classes named so that the sorted order differs from the order of creation.
    layout = {"zebra": ["a.png", "b.png"], "apple": ["c.png"], "mango": ["d.png", "e/f.png"]}
    for cls, files in layout.items():
        for name in files:
            path = tmp_path / "pics" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(path)
    config.data.dataset = str(tmp_path / "pics")
    source = ip.load_split(config, "train")
    assert source.class_names == ("apple", "mango", "zebra") and source.num_classes == 3
    # Sorted paths: apple/c, mango/d, mango/e/f (deeper: still mango), zebra/a, zebra/b.
    np.testing.assert_array_equal(source.labels, [0, 1, 1, 2, 2])
    expected = np.asarray(Image.open(tmp_path / "pics" / "mango" / "e" / "f.png").convert("RGB"))
    np.testing.assert_array_equal(source.images[2], expected)
    assert ip.unlabelled_reason(config) is None
    # The same images in the same order for every split.
    np.testing.assert_array_equal(ip.load_split(config, "test").images, source.images)

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(flat / f"{i}.png")
    config.data.dataset = str(flat)
    assert ip.load_split(config, "train").labels is None
    assert "not sorted into class sub-folders" in ip.unlabelled_reason(config)


def test_tfds_labels_with_mock_data():
    import tensorflow_datasets as tfds

    config = cifar10_ddpm.get_config()
    config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
    with tfds.testing.mock_data(num_examples=9):
        source = ip.load_split(config, "test")
        reference = [int(e["label"]) for e in tfds.as_numpy(tfds.load("mnist", split="test"))]
    assert source.labels.dtype == np.int32 and source.labels.shape == (9,)
    np.testing.assert_array_equal(source.labels, reference)
    assert source.num_classes == 10
    assert ip.unlabelled_reason(config) is None
    config.data.dataset, config.data.image_size, config.data.num_channels = "celeb_a", 8, 3
    with tfds.testing.mock_data(num_examples=2):
        source = ip.load_split(config, "train")
    assert source.labels is None and source.num_classes == 0 and source.images.shape[0] == 2
    assert "has no 'label' feature" in ip.unlabelled_reason(config)


def test_an_npz_without_the_split_or_images_is_refused_naming_its_arrays(tmp_path):
    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    path = tmp_path / "mine.npz"
    np.savez(path, pics=np.zeros((6, 4, 4, 1), np.uint8), labels=np.zeros(6, np.int32))
    config.data.dataset = str(path)
    with pytest.raises(ip.DatasetError) as e:
        ip.load_split(config, "train")
    message = str(e.value)
    assert "\n" not in message and str(path) in message, message
    assert "'train' or 'images'" in message and "'pics', 'labels'" in message, message
    with pytest.raises(ip.DatasetError, match="'pics'"):
        ip.unlabelled_reason(config)
    # A split of its own is not stood in for by another split's array.
    np.savez(path, train=np.zeros((6, 4, 4, 1), np.uint8))
    ip.load_split(config, "train")
    with pytest.raises(ip.DatasetError, match=r"no 'test' or 'images' array.*'train'"):
        ip.load_split(config, "test")


def test_an_object_npz_is_refused_naming_the_file_and_the_array(tmp_path):
    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 4, 1
    path = tmp_path / "mine.npz"
    labels = np.empty(6, object)
    labels[:] = list(range(6))
    np.savez(path, images=np.zeros((6, 4, 4, 1), np.uint8), labels=labels)
    config.data.dataset = str(path)
    with pytest.raises(ip.DatasetError) as e:
        ip.load_split(config, "train")
    message = str(e.value)
    assert "\n" not in message and str(path) in message and "'labels'" in message, message
    assert "object" in message, message


def test_tfds_name_without_tensorflow_datasets_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import raises ImportError
    config = cifar10_ddpm.get_config()
    config.data.dataset = "cifar10"
    with pytest.raises(ip.DatasetError, match="pip install tensorflow-datasets"):
        ip.validate_dataset(config)
    config_lib.validate(
        config_lib.with_defaults(config), check_data=False
    )  # the benchmark's check needs no data set


def test_a_truncated_image_is_named_in_one_error(tmp_path):
    from PIL import Image

    config = cifar10_ddpm.get_config()
    config.data.image_size, config.data.num_channels = 8, 3
    folder = tmp_path / "pics"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    config.data.dataset = str(folder)
    with pytest.raises(ip.DatasetError, match=r"Cannot read the image .*1\.png") as e:
        ip.load_split(config, "train")
    assert "\n" not in str(e.value)


def _labelled_npz(tmp_path, n=20, size=4):
    """A .npz whose image i is filled with level 10 i + (i % 7) and whose label is i % 7: a
    row's label can be read off its image, flipped or not."""
    i = np.arange(n)
    images = np.broadcast_to(
        (10 * i + i % 7).astype(np.uint8)[:, None, None, None], (n, size, size, 1)
    ).copy()
    images[:, 0, 0, 0] = 255  # a mark in one corner, so that flips change the image
    path = tmp_path / "labelled.npz"
    np.savez(path, images=images, labels=(i % 7).astype(np.int32))
    config = cifar10_ddpm.get_config()
    config.data.dataset = str(path)
    config.data.image_size, config.data.num_channels = size, 1
    config.data.random_flip = True
    config.model.num_classes = 7
    config.training.batch_size = 8
    return config


def test_each_batch_carries_the_labels_of_its_images(tmp_path):
    config = _labelled_npz(tmp_path)
    source = ip.load_split(config, "train")
    flipped_some = False
    for step in range(12):  # more than four epochs of 20 examples in batches of 8
        batch = ip.train_batch(config, source, step)
        assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
        level = batch["image"][:, 1, 1, 0].astype(np.int64)  # 10 i + i % 7
        np.testing.assert_array_equal(batch["label"], level % 10)
        flipped_some |= bool(np.any(batch["image"][:, 0, -1, 0] == 255))
        # The same rows split over 4 hosts, labels included.
        parts = [ip.train_batch(config, source, step, p, 4) for p in range(4)]
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([q[key] for q in parts]), batch[key])
    assert flipped_some
    # A pure function of (seed, step): asked again, step 5 is the same batch.
    again = ip.train_batch(config, source, 5)
    first = ip.train_batch(config, source, 5)
    for key in ("image", "label"):
        np.testing.assert_array_equal(again[key], first[key])


def test_a_conditional_model_needs_labels_below_num_classes(tmp_path):
    config = _labelled_npz(tmp_path)
    config.model.num_classes = 5  # the data has labels 0..6
    with pytest.raises(ip.DatasetError, match=r"labels up to 6: set model.num_classes=7"):
        ip.load_split(config, "train")
    np.savez(tmp_path / "plain.npz", images=np.zeros((4, 4, 4, 1), np.uint8))
    config.data.dataset = str(tmp_path / "plain.npz")
    with pytest.raises(ip.DatasetError, match=r"num_classes=5 needs labelled data.*no 'labels'"):
        ip.load_split(config, "train")


def test_tfds_data_source_reads_records_on_demand_without_tensorflow(tmp_path):
    """``data.tfds_reader='data_source'``: random access (mock data source), images decoded as
    indexed, resized where the size differs, labels those of the records; TensorFlow unused."""
    import subprocess

    code = """
import sys
import numpy as np
import tensorflow_datasets as tfds
from configs import cifar10_ddpm
from diffusion_jax import input_pipeline as ip

config = cifar10_ddpm.get_config()
config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
config.data.tfds_reader = "data_source"
with tfds.testing.mock_data(num_examples=9):
    source = ip.load_split(config, "test")
    ref = tfds.data_source("mnist", split="test")
    want = np.stack([ref[i]["image"] for i in range(9)])
    labels = [int(ref[i]["label"]) for i in range(9)]
    assert isinstance(source.images, ip.LazyImages), type(source.images)
    np.testing.assert_array_equal(source.images[np.arange(9)], want)
    np.testing.assert_array_equal(source.images[[4, 1]], want[[4, 1]])
    np.testing.assert_array_equal(source.labels, labels)
    assert source.num_classes == 10 and source.class_names[:2] == ("0", "1")
    batch = ip.train_batch(config, source, 3)
    assert batch["image"].shape == (128, 28, 28, 1)
    config.data.image_size = 16
    small = ip.load_split(config, "test").images[np.arange(3)]
    assert small.shape == (3, 16, 16, 1) and small.dtype == np.uint8
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("ok")
"""
    from helpers import ROOT

    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_tfds_data_source_of_a_set_without_random_access_files_is_one_clear_error(tmp_path):
    config = cifar10_ddpm.get_config()
    config.data.dataset, config.data.image_size, config.data.num_channels = "mnist", 28, 1
    config.data.tfds_reader = "data_source"
    config.data.data_dir = str(tmp_path)
    with pytest.raises(ip.DatasetError, match=r"no random-access files there.*array_record"):
        ip.load_split(config, "train")
    config.data.tfds_reader = "tfrecord"
    with pytest.raises(ip.DatasetError, match=r"tfds_reader='tfrecord' is not one of"):
        ip.load_split(config, "train")


def test_tfds_load_without_tensorflow_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # import tensorflow -> ImportError
    config = cifar10_ddpm.get_config()  # cifar10: no IDX source, so tfds.load
    with pytest.raises(ip.DatasetError) as e:
        ip.load_split(config, "train")
    message = str(e.value)
    assert "pip install 'diffusion_jax[tfds]'" in message and "\n" not in message
    assert "--config.data.tfds_reader=data_source" in message


def test_a_tfds_name_is_checked_without_tensorflow(monkeypatch):
    """The base install (no TensorFlow) checks a tfds name before sampling or evaluating a run of
    it (e.g. an import of the paper's CIFAR-10 weights): tfds's own builders, not the community
    index, whose refresh imports TensorFlow."""
    import tensorflow_datasets  # noqa: F401  (imported as the base install imports it)

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # from here: import tensorflow fails
    config = cifar10_ddpm.get_config()  # cifar10
    ip.validate_dataset(config)
    config.data.dataset = "no_such_set_xyz"
    with pytest.raises(ip.DatasetError, match="Unknown data set data.dataset='no_such_set_xyz'"):
        ip.validate_dataset(config)


def test_each_name_goes_to_its_source_in_the_registry(tmp_path):
    """data.SOURCES in matching order: digits, toy names, IDX sets, a prepared folder, a .npz, a
    folder, and any other name to tfds (by data.tfds_reader)."""
    from diffusion_jax import data

    assert all(isinstance(s, data.Source) for s in data.SOURCES.values())
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "dataset.json").write_text("{}")
    (tmp_path / "pics").mkdir()
    config = cifar10_ddpm.get_config()
    expected = {
        "digits": "digits",
        "moons": "toy",
        str(tmp_path / "prep"): "prepared",
        str(tmp_path / "x.npz"): "npz",
        str(tmp_path / "pics"): "folder",
        "cifar10": "tfds_load",
    }
    for name, kind in expected.items():
        assert ip.dataset_kind(name, config.data) == kind, name
    config.data.tfds_reader = "data_source"
    assert ip.dataset_kind("cifar10", config.data) == "tfds_source"
    assert ip.dataset_kind("digits") == "digits"  # without a config: the keys' defaults
