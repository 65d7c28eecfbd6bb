"""FID / IS math against independent computations, the Inception-v3 network with random weights,
and the trusted loading of weights from files this test writes.

No pretrained Inception weights are available offline, so nothing here checks a published FID
value: the network is checked for its structure (shapes, parameter count of the FID Inception-v3
with a 1008-way classifier, 23,850,960), its input protocol and that it runs; the statistics and
distances against SciPy / NumPy on synthetic features.
"""

import json
import os
import pickle
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffusion_jax import evaluation, sampling
from diffusion_jax.evaluation import fid
from diffusion_jax.evaluation import inception_weights as weights
from diffusion_jax.models import inception

# ----------------------------------------------------------------------------- FID and IS math


def _features(n, d, seed, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features
    return shift + scale * rng.normal(size=(n, d)) @ mix


def _scipy_fid(x1, x2):
    """FID the usual way: np.cov and scipy.linalg.sqrtm of the (non-symmetric) product."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _stats(x, chunk=37):
    stats = fid.FeatureStats(x.shape[1])
    for start in range(0, len(x), chunk):  # uneven chunks: the streaming merge
        stats.update(x[start : start + chunk])
    return stats


def test_streaming_statistics_match_numpy():
    x = _features(500, 24, 0, shift=3.0) + 1e3  # a large offset: no catastrophic cancellation
    stats = _stats(x)
    assert stats.n == 500
    np.testing.assert_allclose(stats.mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.covariance(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fid_matches_scipy_sqrtm():
    x1 = _features(400, 64, 1)
    x2 = _features(400, 64, 2, shift=0.3, scale=1.2)
    s1, s2 = _stats(x1), _stats(x2)
    ours = fid.frechet_distance(s1.mean, s1.covariance(), s2.mean, s2.covariance())
    ref = _scipy_fid(x1, x2)
    assert ref > 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-7)
    # Singular covariances (40 samples of 64 features), where sqrtm of the product is unreliable:
    # against tr((S1 S2)^(1/2)) = tr((A S2 A)^(1/2)), A = S1^(1/2) by eigendecomposition.
    y1, y2 = _features(40, 64, 6), _features(50, 64, 7, shift=0.2)
    c1, c2 = np.cov(y1, rowvar=False), np.cov(y2, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(root @ c2 @ root), 0, None)
    diff = y1.mean(0) - y2.mean(0)
    ref = diff @ diff + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(lam).sum()
    ours = fid.frechet_distance(y1.mean(0), c1, y2.mean(0), c2)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_fid_of_a_set_against_itself_is_zero():
    for n in (400, 30):  # 30 < 64: a singular covariance
        x = _features(n, 64, 3)
        s = _stats(x)
        value = fid.frechet_distance(s.mean, s.covariance(), s.mean, s.covariance())
        assert abs(value) < 1e-7 * np.trace(s.covariance())


def test_fid_grows_with_added_noise():
    x = _features(600, 32, 4)
    s = _stats(x)
    rng = np.random.default_rng(5)
    noise = rng.normal(size=x.shape)
    values = []
    for sigma in (0.0, 0.05, 0.2, 0.5, 1.0, 2.0):
        sn = _stats(x + sigma * noise)
        values.append(fid.frechet_distance(s.mean, s.covariance(), sn.mean, sn.covariance()))
    assert abs(values[0]) < 1e-8
    assert np.all(np.diff(values) > 0), values


def test_inception_score_limits():
    k = 10
    uniform = np.full((200, k), 1.0 / k)
    mean, std = fid.inception_score(uniform, num_splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    confident = np.eye(k)[np.arange(200) % k]  # one-hot, every class equally often per split
    mean, std = fid.inception_score(confident, num_splits=4)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # An independent value: two classes, p(y|x) = (0.9, 0.1) and (0.1, 0.9) half each:
    # p(y) = (0.5, 0.5), KL = 0.9 ln 1.8 + 0.1 ln 0.2.
    two = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    expected = np.exp(0.9 * np.log(1.8) + 0.1 * np.log(0.2))
    assert fid.inception_score(two, num_splits=1)[0] == pytest.approx(expected, rel=1e-12)


# ----------------------------------------------------------------------------- the network


def _random_variables(abstract, seed=0):
    """Random weights for the abstract Inception tree: He-scaled kernels, BN near identity."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, leaf in weights.flatten_variables(abstract).items():
        shape = leaf.shape
        if name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            a = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
        elif name.endswith("/var"):
            a = rng.uniform(0.5, 1.5, size=shape)
        elif name.endswith("scale"):
            a = rng.uniform(0.8, 1.2, size=shape)
        else:  # bias, mean
            a = rng.normal(size=shape) * 0.1
        out[name] = a.astype(np.float32)
    return out


@pytest.fixture(scope="module")
def abstract():
    return inception.abstract_variables(inception.InceptionV3())


def test_network_structure_at_299(abstract):
    model = inception.InceptionV3()
    params = abstract["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 23_850_960
    assert params["fc"]["kernel"].shape == (2048, 1008)
    assert params["Conv2d_1a_3x3"]["conv"]["kernel"].shape == (3, 3, 3, 32)
    assert abstract["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["mean"].shape == (192,)
    for shape in ((3, 8, 8, 1), (3, 32, 32, 3)):
        out = jax.eval_shape(model.apply, abstract, jax.ShapeDtypeStruct(shape, jnp.uint8))
        assert out["pool"].shape == (3, 2048) and out["logits"].shape == (3, 1008)


def test_preprocess_resizes_uint8_bilinearly():
    row = np.array([0, 40, 80, 120, 160, 200, 240, 255], np.uint8)
    grey = np.broadcast_to(row, (2, 8, 8))[..., None]  # [2, 8, 8, 1], a horizontal ramp
    x = np.asarray(inception.preprocess(jnp.asarray(grey)))
    assert x.shape == (2, 299, 299, 3) and x.dtype == np.float32
    np.testing.assert_array_equal(x[..., 0], x[..., 2])  # grey repeated to RGB
    # Independent bilinear with half-pixel centres: source coordinate (j + 0.5) 8 / 299 - 0.5,
    # clamped at the edges (np.interp clamps).
    src = (np.arange(299) + 0.5) * 8 / 299 - 0.5
    expected = np.interp(src, np.arange(8), row.astype(np.float64)) / 127.5 - 1.0
    np.testing.assert_allclose(x[0, 150, :, 1], expected, atol=1e-5)
    assert x.min() >= -1.0 and x.max() <= 1.0
    rgb = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    assert inception.preprocess(jnp.asarray(rgb)).shape == (1, 299, 299, 3)
    with pytest.raises(TypeError, match="uint8"):
        inception.preprocess(jnp.zeros((1, 8, 8, 1), jnp.float32))


def test_network_runs_with_random_weights(abstract):
    """A real forward pass (at 75 x 75, the smallest size the network takes, to keep it fast)."""
    model = inception.InceptionV3(resize_to=75)
    variables = weights.assign_variables(_random_variables(abstract), abstract)
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (2, 8, 8, 1), dtype=np.uint8)
    rgb = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    apply = jax.jit(model.apply)
    for images in (grey, rgb):
        out = apply(variables, jnp.asarray(images))
        pool = np.asarray(out["pool"])
        assert pool.shape == (2, 2048) and out["logits"].shape == (2, 1008)
        assert np.all(np.isfinite(pool)) and np.all(pool >= 0)  # a mean of ReLUs
        assert np.abs(pool[0] - pool[1]).max() > 0  # different images, different features


# ----------------------------------------------------------------------------- weights


def _sha(path):
    return weights.sha256_of(path)


def _config(path, sha):
    import ml_collections

    return ml_collections.ConfigDict({"eval": {"inception": {"weights": path, "sha256": sha}}})


def _write_safetensors(path, arrays):
    """A safetensors file written by hand (the format, not the library): u64 header length,
    JSON header, concatenated little-endian data."""
    header, blobs, offset = {}, [], 0
    for name, a in arrays.items():
        a = np.ascontiguousarray(a, np.float32)
        header[name] = {
            "dtype": "F32",
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        blobs.append(a.tobytes())
        offset += a.nbytes
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _to_torch_layout(flax_arrays):
    """The pytorch-fid state-dict names and layouts, written out independently here."""
    out = {}
    for name, a in flax_arrays.items():
        coll, *mods, leaf = name.split("/")
        prefix = ".".join(mods)
        if leaf == "kernel":
            a = np.transpose(a, (3, 2, 0, 1)) if a.ndim == 4 else a.T
            out[f"{prefix}.weight"] = a
        else:
            out[
                f"{prefix}."
                + {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[
                    leaf
                ]
            ] = a
    out["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.float32)  # dropped on load
    return out


def test_weights_round_trip_npz_and_torch_layout_safetensors(abstract, tmp_path):
    arrays = _random_variables(abstract, seed=2)
    npz = str(tmp_path / "inception.npz")
    np.savez(npz, **arrays)
    model, variables = fid.load_inception(_config(npz, _sha(npz)), str(tmp_path / "cache"))
    assert isinstance(model, inception.InceptionV3)
    for name, leaf in weights.flatten_variables(variables).items():
        np.testing.assert_array_equal(np.asarray(leaf), arrays[name])

    st = str(tmp_path / "inception.safetensors")
    _write_safetensors(st, _to_torch_layout(arrays))
    _, variables = fid.load_inception(_config(st, _sha(st)), str(tmp_path / "cache"))
    for name, leaf in weights.flatten_variables(variables).items():
        np.testing.assert_array_equal(np.asarray(leaf), arrays[name])


def test_weights_errors_are_clear(abstract, tmp_path):
    arrays = _random_variables(abstract, seed=3)
    missing = dict(arrays)
    del missing["params/Mixed_6b/branch7x7_2/conv/kernel"]
    with pytest.raises(weights.WeightsError, match=r"1 missing .*Mixed_6b/branch7x7_2/conv/kernel"):
        weights.assign_variables(missing, abstract)
    wrong = dict(arrays)
    wrong["params/fc/kernel"] = np.zeros((2048, 1000), np.float32)  # torchvision's 1000 classes
    with pytest.raises(weights.WeightsError, match=r"wrong shape .*fc/kernel.*\(2048, 1000\)"):
        weights.assign_variables(wrong, abstract)
    extra = dict(arrays, **{"params/AuxLogits/conv/kernel": np.zeros(3, np.float32)})
    with pytest.raises(weights.WeightsError, match="1 unexpected"):
        weights.assign_variables(extra, abstract)

    # A safetensors file cut short: one error naming the file (read by the safetensors package).
    st = str(tmp_path / "cut.safetensors")
    _write_safetensors(st, {"a": np.arange(6.0, dtype=np.float32)})
    with open(st, "rb") as f:
        blob = f.read()
    with open(st, "wb") as f:
        f.write(blob[:-8])
    with pytest.raises(weights.WeightsError, match=f"{st} cannot be read as safetensors"):
        weights.read_arrays(st)

    small = str(tmp_path / "small.npz")
    np.savez(small, a=np.arange(3.0))
    with pytest.raises(weights.WeightsError, match="SHA-256 mismatch"):
        weights.fetch_weights(small, "0" * 64, str(tmp_path))
    with pytest.raises(weights.WeightsError, match="No SHA-256 is pinned"):
        weights.fetch_weights(small, "", str(tmp_path))
    with pytest.raises(weights.WeightsError, match="does not exist"):
        weights.fetch_weights(str(tmp_path / "nope.npz"), "0" * 64, str(tmp_path))
    with pytest.raises(weights.WeightsError, match="No Inception weights configured"):
        weights.fetch_weights("", "", str(tmp_path))
    # A URL (file://: no network here) is copied into the cache and verified.
    url = "file://" + small
    cached = weights.fetch_weights(url, _sha(small), str(tmp_path / "cache"))
    assert cached.startswith(str(tmp_path / "cache")) and _sha(cached) == _sha(small)
    with pytest.raises(weights.WeightsError, match="SHA-256 mismatch"):
        weights.fetch_weights(url, "f" * 64, str(tmp_path / "cache2"))
    assert not os.listdir(tmp_path / "cache2")  # the unverified download is not kept


class _Trap:
    """Unpickling this would create a folder: it must never happen."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickles_and_torch_checkpoints_are_refused(tmp_path):
    marker = str(tmp_path / "unpickled")
    pkl = str(tmp_path / "weights.pkl")
    with open(pkl, "wb") as f:
        pickle.dump({"w": np.zeros(3), "trap": _Trap(marker)}, f)
    path = weights.fetch_weights(pkl, _sha(pkl), str(tmp_path))  # the hash is right ...
    with pytest.raises(weights.WeightsError, match="pickle"):
        weights.read_arrays(path)  # ... but the format is refused
    torch_like = str(tmp_path / "model.pth")  # a PyTorch zip: data.pkl inside
    with zipfile.ZipFile(torch_like, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_Trap(marker)))
        z.writestr("archive/data/0", b"\0" * 16)
    with pytest.raises(weights.WeightsError, match="PyTorch checkpoint"):
        weights.read_arrays(torch_like)
    obj = str(tmp_path / "object.npz")  # an .npz holding an object array (a pickle inside)
    np.savez(obj, a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(weights.WeightsError, match="pickled data"):
        weights.read_arrays(obj)
    assert not os.path.exists(marker)


def fid_and_is(config, params, mesh, workdir):
    """The fid and is evaluators over one context (IS reads FID's samples)."""
    ctx = evaluation.EvalContext(config, None, params, mesh, workdir)
    return {**fid.fid(ctx), **fid.inception_score_metric(ctx)}


def test_fid_is_skipped_without_weights(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict({"eval": {"inception": {"weights": "", "sha256": ""}}})
    out = fid_and_is(config, None, None, str(tmp_path))
    assert set(out) == {"fid_skipped"} and "No Inception weights configured" in out["fid_skipped"]
    config.eval.inception.weights = str(tmp_path / "missing.npz")
    out = fid_and_is(config, None, None, str(tmp_path))
    assert set(out) == {"fid_skipped"} and "does not exist" in out["fid_skipped"]


def test_sample_chunks_are_resumable(tmp_path, monkeypatch):
    """Chunks already on disk are read back; only the missing ones are drawn (by the system's
    make_sample_fn, replaced here by a counting fake)."""
    from configs import digits

    calls = []

    def fake_make_sample_fn(config, model, mesh, **kwargs):
        n = config.sampling.num_samples

        def sample(params, key):
            calls.append(n)
            value = jax.random.uniform(key, (n, 8, 8, 1), minval=-1, maxval=1)
            return np.asarray(value)

        return sample

    monkeypatch.setattr(sampling, "make_sample_fn", fake_make_sample_fn)
    config = digits.get_config()
    out = str(tmp_path / "samples")
    first = np.concatenate(list(fid.sample_chunks(config, None, None, None, out, 25, 10)))
    assert first.shape == (25, 8, 8, 1) and first.dtype == np.uint8 and calls == [10, 10, 10]
    os.remove(os.path.join(out, "chunk_00001.npz"))  # as if killed while drawing chunk 1
    second = np.concatenate(list(fid.sample_chunks(config, None, None, None, out, 25, 10)))
    assert calls == [10, 10, 10, 10]  # only chunk 1 drawn again
    np.testing.assert_array_equal(first, second)  # the same key per chunk: the same samples


def test_fid_and_is_end_to_end_with_random_weights(abstract, tmp_path, monkeypatch):
    """The whole path with a random-weight network (at 75 x 75) and a fake sampler: reference
    statistics computed once and cached, samples in chunks, a finite FID and an IS in [1, K]."""
    from configs import digits
    from diffusion_jax import sharding

    variables = weights.assign_variables(_random_variables(abstract, seed=4), abstract)
    monkeypatch.setattr(
        fid,
        "load_inception",
        lambda config, cache: (inception.InceptionV3(resize_to=75), variables),
    )

    def fake_make_sample_fn(config, model, mesh, **kwargs):
        def sample(params, key):
            return np.asarray(jax.random.uniform(key, (config.sampling.num_samples, 8, 8, 1)))

        return sample

    monkeypatch.setattr(sampling, "make_sample_fn", fake_make_sample_fn)
    config = digits.get_config()
    config.eval.metrics = ("bpd", "fid", "is")
    config.eval.inception.num_samples = 30
    config.eval.inception.chunk_size = 16
    config.eval.inception.batch_size = 16
    config.eval.inception.reference_num_examples = 40
    config.eval.inception.is_num_splits = 3
    config.eval.inception.sha256 = "ab" * 32
    mesh = sharding.make_mesh()
    params = {"w": jnp.ones(3)}
    out = fid_and_is(config, params, mesh, str(tmp_path))
    assert out["fid_num_samples"] == 30 and out["fid_reference"]["num_examples"] == 40
    assert np.isfinite(out["fid"]) and out["fid"] > 0
    assert 1.0 <= out["inception_score"] <= 1008
    cache = os.path.join(tmp_path, "eval", "fid")
    refs = [f for f in os.listdir(cache) if f.startswith("fid_reference_train_")]
    chunks = os.listdir(os.path.join(cache, [f for f in os.listdir(cache) if "samples_" in f][0]))
    assert len(refs) == 1 and sorted(chunks) == ["chunk_00000.npz", "chunk_00001.npz"]
    # Cached: read back without a network (feature_fn None would fail if it were recomputed).
    mu, _, meta = fid.reference_statistics(config, None, None, mesh, cache, "ab" * 32)
    assert meta["num_examples"] == 40 and mu.shape == (2048,)
