"""FID and Inception Score: an Inception-v3 feature network, the statistics, trusted weights.

The standard FID protocol (Heusel et al. 2017) on uint8 images:

- images [N, H, W, C] uint8 in [0, 255] (grey images are repeated to 3 channels) are resized to
  299 x 299 bilinearly (half-pixel centres, no antialiasing: the PyTorch ``interpolate``
  convention; the original TensorFlow graph used the legacy corner-aligned resize) and scaled to
  [-1, 1] by x / 127.5 - 1;
- the network is the Inception-v3 of the FID code (TF graph 2015-12-05, as ported in pytorch-fid):
  conv + batch norm (eps 1e-3) + ReLU units, average pools in Mixed_5*, Mixed_6* and Mixed_7b that
  do not count padding, a max pool in Mixed_7c's pool branch; ``pool`` is the 2048-d global average
  ("pool3") and ``logits`` the 1008-way classifier on top of it (for the Inception Score);
- FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)) between the Gaussians fitted
  to the pool3 features of the samples and of the reference data (reference statistics computed
  once from a data split and cached in the workdir);
- IS = exp(E_x KL(p(y | x) || p(y))), the mean and standard deviation over ``num_splits`` splits.

No pretrained weights ship with the library. They load from ``eval.inception_weights`` (a path or
an http(s)/file URL) after their SHA-256 is checked against ``eval.inception_sha256``, and only
from array formats that cannot run code: ``.npz`` (``allow_pickle=False``, every member a plain
``.npy``) or safetensors. Pickles and PyTorch checkpoints are refused. Keys are either the Flax
layout of ``InceptionV3`` (``params/Mixed_5b/branch1x1/conv/kernel``, ``batch_stats/.../bn/mean``;
what ``save_variables_npz`` writes) or the PyTorch layout of pytorch-fid's state dict
(``Mixed_5b.branch1x1.conv.weight`` [O, I, kh, kw], ``...bn.running_mean``, ``fc.weight``), which
is transposed onto the Flax tree. Where no weights are configured or they cannot be fetched or
verified, FID and IS are skipped with a message saying why, and no number is reported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import builders, input_pipeline, reporting, sharding

FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the FID graph's classifier (1000 ImageNet classes + 8 unused)
INPUT_SIZE = 299

# Config keys of the ``eval`` section used here, with their defaults (for configs without them).
DEFAULTS = {
    "inception_weights": "",  # path or http(s)/file URL of .npz / .safetensors weights
    "inception_sha256": "",  # the pinned SHA-256 (hex) of that file
    "fid_num_samples": 50_000,
    "fid_reference_split": "train",
    "fid_reference_num_examples": 0,  # 0: the whole split
    "fid_batch_size": 200,  # Inception forward batch (a multiple of the device count)
    "fid_chunk_size": 1000,  # samples per resumable chunk file
    "is_num_splits": 10,
}


def eval_option(config: ml_collections.ConfigDict, name: str) -> Any:
    """``config.eval.<name>``, or its default where the config predates the key."""
    return config.eval.get(name, DEFAULTS[name])


class WeightsError(ValueError):
    """Inception weights that are not configured, not reachable, not verified or do not fit."""


# ----------------------------------------------------------------------------- the network


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm (inference statistics, eps 1e-3) -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: int = 1
    padding: Any = "VALID"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = self.padding
        if isinstance(pad, tuple):  # (ph, pw) symmetric -> ((ph, ph), (pw, pw))
            pad = ((pad[0], pad[0]), (pad[1], pad[1]))
        x = nn.Conv(
            self.features,
            self.kernel,
            strides=(self.strides, self.strides),
            padding=pad,
            use_bias=False,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, 'same' size, padding not counted."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):  # [B, 35, 35, C] -> [B, 35, 35, 224 + pool_features]
        b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
        b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 35, 35, 288] -> [B, 17, 17, 768]
        b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max3s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):  # [B, 17, 17, 768] -> [B, 17, 17, 768]
        c = self.channels_7x7
        b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
        b7 = ConvBN(c, (1, 1), name="branch7x7_1")(x)
        b7 = ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = ConvBN(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = ConvBN(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = ConvBN(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = ConvBN(192, (1, 1), name="branch_pool")(_avg3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):  # [B, 17, 17, 768] -> [B, 8, 8, 1280]
        b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max3s2(x)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average pool branch) and Mixed_7c (``max_pool=True``, as in the FID graph)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x):  # [B, 8, 8, C] -> [B, 8, 8, 2048]
        b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
        b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.max_pool:
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg3(x)
        bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 [B, H, W, C] (C = 1 or 3) -> float32 [B, size, size, 3] in [-1, 1].

    Bilinear resize with half-pixel centres and no antialiasing, then x / 127.5 - 1.
    """
    if images.dtype != jnp.uint8:
        raise TypeError(f"Inception input must be uint8 images in [0, 255], got {images.dtype}.")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey -> RGB
    if x.shape[-1] != 3:
        raise ValueError(f"Inception input needs 1 or 3 channels, got shape {images.shape}.")
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear", antialias=False)
    return x / 127.5 - 1.0


class InceptionV3(nn.Module):
    """The FID Inception-v3: uint8 images -> dict(pool [B, 2048], logits [B, num_classes]).

    ``resize_to`` is 299 for the FID protocol (smaller values, at least 75, only for tests).
    """

    num_classes: int = NUM_CLASSES
    resize_to: int = INPUT_SIZE

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        x = preprocess(images, self.resize_to)  # [B, 299, 299, 3]
        x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # [B, 149, 149, 32]
        x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # [B, 147, 147, 32]
        x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)  # [B, 147, 147, 64]
        x = _max3s2(x)  # [B, 73, 73, 64]
        x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # [B, 71, 71, 192]
        x = _max3s2(x)  # [B, 35, 35, 192]
        x = InceptionA(32, name="Mixed_5b")(x)  # [B, 35, 35, 256]
        x = InceptionA(64, name="Mixed_5c")(x)  # 288
        x = InceptionA(64, name="Mixed_5d")(x)  # 288
        x = InceptionB(name="Mixed_6a")(x)  # [B, 17, 17, 768]
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)  # [B, 8, 8, 1280]
        x = InceptionE(name="Mixed_7b")(x)  # [B, 8, 8, 2048]
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)  # [B, 8, 8, 2048]
        pool = jnp.mean(x, axis=(1, 2))  # [B, 2048] "pool3"
        logits = nn.Dense(self.num_classes, name="fc")(pool)  # [B, 1008]
        return dict(pool=pool, logits=logits)


def abstract_variables(model: InceptionV3, batch_shape=(1, 8, 8, 3)) -> Any:
    """The variables tree of ``model`` as ShapeDtypeStructs (no computation)."""
    images = jax.ShapeDtypeStruct(batch_shape, jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), images)


# ----------------------------------------------------------------------------- statistics


class FeatureStats:
    """Streaming mean and covariance of feature rows, in float64.

    Chunks are merged with Chan et al.'s pairwise update: for a chunk of b rows with mean m_b and
    scatter M_b = sum (x - m_b)(x - m_b)^T, delta = m_b - mu,
    mu <- mu + delta b / (n + b), M <- M + M_b + delta delta^T n b / (n + b), n <- n + b;
    the covariance is M / (n - 1).
    """

    def __init__(self, dim: int = FEATURE_DIM):
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.scatter = np.zeros((dim, dim), np.float64)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)  # [b, dim]
        b = x.shape[0]
        if b == 0:
            return
        m_b = x.mean(axis=0)
        centred = x - m_b
        delta = m_b - self.mean
        n = self.n + b
        self.scatter += centred.T @ centred + np.outer(delta, delta) * (self.n * b / n)
        self.mean += delta * (b / n)
        self.n = n

    def covariance(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"A covariance needs at least 2 feature rows, got {self.n}.")
        return self.scatter / (self.n - 1)


def _psd_factor(a: np.ndarray) -> np.ndarray:
    """F [d, r] with a = F F^T, r the numerical rank of the symmetric PSD ``a``.

    LAPACK's pivoted Cholesky (``dpstrf``): P^T a P = L L^T with L [d, r], so F = P L. As cheap
    as a Cholesky, and exact for singular covariances (fewer samples than dimensions) too.
    """
    from scipy.linalg import lapack

    sym = np.asfortranarray((a + a.T) / 2)
    c, piv, rank, info = lapack.dpstrf(sym, tol=-1.0, lower=1)
    if info < 0:
        raise ValueError(f"dpstrf failed (info {info}).")
    factor = np.empty((a.shape[0], rank))
    factor[piv - 1] = np.tril(c)[:, :rank]  # undo the pivoting: rows of P L
    return factor


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    With S1 = F F^T (F [d, r], pivoted Cholesky), S1 S2 = F (F^T S2) has the nonzero eigenvalues
    of the symmetric PSD M = F^T S2 F [r, r] (AB and BA share them), so
    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)), lambda(M) from a symmetric eigensolver: real
    arithmetic throughout (no complex ``sqrtm``), singular covariances need no offset, and one
    d x d eigenvalue problem at most (a few seconds at d = 2048 on a CPU).
    """
    from scipy.linalg import eigh

    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}."
        )
    f = _psd_factor(s1)  # [d, r]
    m = f.T @ s2 @ f  # [r, r]
    eig = eigh((m + m.T) / 2, eigvals_only=True, driver="evd") if m.size else np.zeros(0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(probs: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """IS = exp(mean_i KL(p(y | x_i) || p_hat(y))), p_hat(y) = mean_i p(y | x_i), per split.

    ``probs`` [N, K] class probabilities; returns (mean, std) over ``num_splits`` consecutive
    splits (Salimans et al. 2016). 1 for identical rows; K for one-hot rows of K equally frequent
    classes.
    """
    from scipy.special import xlogy

    probs = np.asarray(probs, np.float64)  # [N, K]
    if probs.ndim != 2 or len(probs) < num_splits:
        raise ValueError(f"Need [N >= num_splits={num_splits}, K] probabilities: {probs.shape}.")
    scores = []
    for part in np.array_split(probs, num_splits):
        p_y = part.mean(axis=0, keepdims=True)  # [1, K]
        kl = np.sum(xlogy(part, part) - xlogy(part, p_y), axis=1)  # [n]
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def levels_to_uint8(images: np.ndarray, num_bins: int) -> np.ndarray:
    """uint8 levels 0..num_bins-1 -> uint8 [0, 255]: round(k 255 / (num_bins - 1))."""
    if num_bins == 256:
        return np.asarray(images, np.uint8)
    return np.round(np.asarray(images, np.float64) * (255 / (num_bins - 1))).astype(np.uint8)


def make_feature_fn(model: InceptionV3, mesh: jax.sharding.Mesh):
    """``fn(variables, images uint8 [B, H, W, C]) -> (pool [B, 2048], logits [B, K])``, jitted
    with the batch split over the mesh and the variables replicated."""
    repl, data = sharding.replicated(mesh), sharding.data_sharded(mesh)

    def fn(variables, images):
        out = model.apply(variables, images)
        return out["pool"], out["logits"]

    return jax.jit(fn, in_shardings=(repl, data), out_shardings=(data, data))


def compute_features(
    feature_fn,
    variables,
    batches: Iterable[np.ndarray],
    batch_size: int,
    mesh: jax.sharding.Mesh,
    want_probs: bool = True,
) -> tuple[FeatureStats, np.ndarray | None]:
    """Stream uint8 image batches (any sizes) through the network in global batches of
    ``batch_size`` (padded, the padding dropped): (pool3 statistics, softmax probs [N, K])."""
    from scipy.special import softmax

    from diffusion_jax import evaluate  # the system's host transfer (multi-host aware)

    stats = FeatureStats()
    probs = []
    rows = input_pipeline.host_slice(batch_size, jax.process_index(), jax.process_count())
    for images in _rebatch(batches, batch_size):
        n = len(images)
        if n < batch_size:
            pad = np.zeros((batch_size - n, *images.shape[1:]), np.uint8)
            images = np.concatenate([images, pad])
        pool, logits = feature_fn(variables, sharding.global_batch(mesh, images[rows]))
        stats.update(evaluate.to_host(pool)[:n])
        if want_probs:
            probs.append(softmax(evaluate.to_host(logits)[:n].astype(np.float64), axis=-1))
    return stats, (np.concatenate(probs) if want_probs and probs else None)


def _rebatch(batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    buf, size = [], 0
    for b in batches:
        buf.append(b)
        size += len(b)
        while size >= batch_size:
            allb = np.concatenate(buf)
            yield allb[:batch_size]
            buf, size = [allb[batch_size:]], size - batch_size
    if size:
        yield np.concatenate(buf)


# ----------------------------------------------------------------------------- weights


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str, expected: str) -> None:
    """Raise WeightsError unless the file's SHA-256 equals the pinned ``expected`` (hex)."""
    actual = sha256_of(path)
    if not expected:
        raise WeightsError(
            f"No SHA-256 is pinned for {path} (its SHA-256 is {actual}): set "
            "eval.inception_sha256 to the published hash of the file you trust; unverified "
            "weights are not used."
        )
    if actual != expected.strip().lower():
        raise WeightsError(
            f"SHA-256 mismatch for {path}: expected {expected}, got {actual}. The file is not "
            "the pinned one (corrupt, truncated or different weights): not used."
        )


def fetch_weights(spec: str, sha256: str, cache_dir: str) -> str:
    """A local, verified copy of the weights named by ``spec`` (a path or an http(s)/file URL).

    A URL is downloaded once into ``cache_dir`` (to a temporary name, renamed when its hash is
    verified); a path is used in place. Raises WeightsError when unreachable or unverified.
    """
    if not spec:
        raise WeightsError(
            "No Inception weights configured (eval.inception_weights is empty): FID/IS need the "
            "FID Inception-v3 weights as .npz or .safetensors, with eval.inception_sha256."
        )
    scheme = urllib.parse.urlparse(spec).scheme
    if scheme in ("http", "https", "file"):
        suffix = os.path.splitext(urllib.parse.urlparse(spec).path)[1] or ".bin"
        path = os.path.join(cache_dir, f"inception-{(sha256 or 'unpinned')[:16]}{suffix}")
        if not os.path.exists(path):
            os.makedirs(cache_dir, exist_ok=True)
            tmp = path + f".part{os.getpid()}"
            try:
                with urllib.request.urlopen(spec, timeout=60) as r, open(tmp, "wb") as f:
                    for block in iter(lambda: r.read(1 << 20), b""):
                        f.write(block)
            except OSError as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise WeightsError(f"Could not download Inception weights from {spec}: {e}") from e
            try:
                verify_sha256(tmp, sha256)
            except WeightsError:
                os.remove(tmp)
                raise
            os.replace(tmp, path)
    else:
        path = os.path.expanduser(spec)
        if not os.path.isfile(path):
            raise WeightsError(f"Inception weights file {path} does not exist.")
    verify_sha256(path, sha256)
    return path


_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_arrays(path: str) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` or safetensors file; anything else is refused.

    The format is decided by the file's first bytes, not its name: a zip whose members are all
    ``.npy`` files is read with ``allow_pickle=False`` (a PyTorch zip checkpoint, with its
    ``data.pkl``, is refused); an 8-byte little-endian header length followed by a JSON header is
    safetensors; a pickle (or anything else) is refused without being parsed.
    """
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        bad = [n for n in names if not n.endswith(".npy")]
        if bad:
            raise WeightsError(
                f"{path} is a zip archive with members that are not .npy arrays ({bad[:3]}): "
                "probably a PyTorch checkpoint, which is a pickle and is not loaded. Convert it "
                "to .npz or .safetensors on a machine you trust."
            )
        try:
            with np.load(path, allow_pickle=False) as npz:
                return {k: np.asarray(npz[k]) for k in npz.files}
        except ValueError as e:  # object arrays: pickled data inside the .npy
            raise WeightsError(f"{path} holds object arrays (pickled data): refused ({e}).") from e
    if len(head) >= 9 and head[8:9] == b"{":
        return _read_safetensors(path)
    kind = "a pickle" if head[:1] == b"\x80" else "not .npz or safetensors"
    raise WeightsError(
        f"{path} is {kind}; only .npz and safetensors weights are loaded (pickles can run code)."
    )


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse safetensors: u64 header size N, N bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}}, then the raw little-endian data the offsets index."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        raise WeightsError(f"{path}: safetensors header of {n} bytes runs past the file end.")
    try:
        header = json.loads(blob[8 : 8 + n])
    except ValueError as e:
        raise WeightsError(f"{path}: unreadable safetensors header ({e}).") from e
    data = memoryview(blob)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            kind = info.get("dtype")
            raise WeightsError(f"{path}: tensor {name!r} has an unsupported dtype {kind}.")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(data) or end - begin != count * np.dtype(dtype).itemsize:
            raise WeightsError(f"{path}: tensor {name!r} has bad offsets {begin}..{end}.")
        arr = np.frombuffer(data[begin:end], dtype=np.dtype(dtype).newbyteorder("<"))
        out[name] = arr.reshape(shape).astype(dtype)
    return out


def flatten_variables(variables: Any) -> dict[str, Any]:
    """{'params/Mixed_5b/branch1x1/conv/kernel': leaf, ...} for a Flax variables tree."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def save_variables_npz(path: str, variables: Any) -> None:
    """Write a variables tree as ``.npz`` in the Flax layout ``read_arrays`` loads."""
    arrays = {k: np.asarray(v) for k, v in flatten_variables(variables).items()}
    np.savez(path, **arrays)


def _torch_to_flax(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """pytorch-fid state-dict names and layouts -> the Flax layout.

    conv.weight [O, I, kh, kw] -> params/.../conv/kernel [kh, kw, I, O]; bn.weight/bias ->
    params/.../bn/scale/bias; bn.running_mean/var -> batch_stats/.../bn/mean/var;
    fc.weight [K, 2048] -> params/fc/kernel [2048, K]; fc.bias -> params/fc/bias. Buffers
    ``num_batches_tracked`` and the auxiliary classifier ``AuxLogits.*`` are dropped.
    """
    out = {}
    for name, a in arrays.items():
        if name.endswith("num_batches_tracked") or name.startswith("AuxLogits."):
            continue
        *mods, leaf = name.split(".")
        prefix = "/".join(mods)
        if mods and mods[-1] == "bn":
            new = {
                "weight": f"params/{prefix}/scale",
                "bias": f"params/{prefix}/bias",
                "running_mean": f"batch_stats/{prefix}/mean",
                "running_var": f"batch_stats/{prefix}/var",
            }.get(leaf)
        elif leaf == "weight" and a.ndim == 4:
            new, a = f"params/{prefix}/kernel", np.transpose(a, (2, 3, 1, 0))
        elif leaf == "weight" and a.ndim == 2:
            new, a = f"params/{prefix}/kernel", a.T
        elif leaf == "bias":
            new = f"params/{prefix}/bias"
        else:
            new = None
        out[new or f"<unmapped>/{name}"] = a
    return out


def assign_variables(arrays: dict[str, np.ndarray], target: Any, source: str = "weights") -> Any:
    """Map named arrays onto the structure of ``target`` (a variables tree of arrays or
    ShapeDtypeStructs): every leaf must be present with its shape; extra names are errors too.
    PyTorch-layout names (``a.b.weight``) are converted first. Floats are cast to the target dtype.
    """
    if arrays and all("/" not in k for k in arrays):
        arrays = _torch_to_flax(arrays)
    flat = flatten_variables(target)
    missing = sorted(set(flat) - set(arrays))
    unexpected = sorted(set(arrays) - set(flat))
    wrong = [
        f"{k}: file {tuple(arrays[k].shape)} vs model {tuple(flat[k].shape)}"
        for k in sorted(set(flat) & set(arrays))
        if tuple(arrays[k].shape) != tuple(flat[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"{len(wrong)} with the wrong shape (e.g. {wrong[:3]})")
        raise WeightsError(
            f"{source} do not fit the Inception-v3 variables: " + "; ".join(parts) + "."
        )
    leaves, treedef = jax.tree_util.tree_flatten(target)
    values = [jnp.asarray(arrays[k], flat[k].dtype) for k in flat]
    assert len(values) == len(leaves)
    return jax.tree_util.tree_unflatten(treedef, values)


def load_inception(config: ml_collections.ConfigDict, cache_dir: str) -> tuple[InceptionV3, Any]:
    """(model, variables) from the configured, verified weights; raises WeightsError."""
    path = fetch_weights(
        eval_option(config, "inception_weights"), eval_option(config, "inception_sha256"), cache_dir
    )
    model = InceptionV3()
    variables = assign_variables(read_arrays(path), abstract_variables(model), source=path)
    logging.info("Loaded Inception-v3 weights from %s (SHA-256 verified).", path)
    return model, variables


# ----------------------------------------------------------------------------- samples, stats


def params_fingerprint(params: Any) -> str:
    """SHA-256 of the parameters' bytes (names a set of samples by the model that drew it)."""
    h = hashlib.sha256()
    for k, v in sorted(flatten_variables(params).items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(jax.device_get(v)).tobytes())
    return h.hexdigest()


def _broadcast(x):
    return multihost_utils.broadcast_one_to_all(x) if jax.process_count() > 1 else x


def sample_chunks(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    out_dir: str,
    num_samples: int,
    chunk_size: int,
) -> Iterator[np.ndarray]:
    """uint8 [0, 255] sample chunks [<= chunk_size, H, W, C], ``num_samples`` in all.

    Chunk i is drawn by ``evaluate.make_sample_fn`` (sharded over the mesh) from key
    fold_in(fold_in(run sample key, 0xF1D), i) and written to ``out_dir/chunk_{i:05d}.npz``
    (atomically); a chunk file that is already there is read instead, so an interrupted run
    resumes where it stopped. ``out_dir`` should name the parameters and sampler settings. On
    several hosts the workdir is shared (as for the checkpoints): process 0 decides which chunks
    exist and writes new ones, every process reads them.
    """
    from diffusion_jax import evaluate  # the system's sharded sampler, reused as is

    cfg = copy.deepcopy(config)
    with cfg.unlocked():
        cfg.sampling.num_samples = chunk_size
    num_chunks = -(-num_samples // chunk_size)
    paths = [os.path.join(out_dir, f"chunk_{i:05d}.npz") for i in range(num_chunks)]
    exists = np.array([_valid_chunk(p, chunk_size) for p in paths], np.int32)
    exists = np.asarray(_broadcast(exists))  # process 0's files decide, on every process
    logging.info(
        "FID samples: %d chunks of %d in %s, %d already there.",
        num_chunks,
        chunk_size,
        out_dir,
        int(exists.sum()),
    )
    sampler = None
    key = jax.random.fold_in(builders.run_keys(config.seed)["sample"], 0xF1D)
    for i, path in enumerate(paths):
        if exists[i]:
            with np.load(path, allow_pickle=False) as f:
                images = f["images"]
        else:
            if sampler is None:
                sampler = evaluate.make_sample_fn(cfg, model, mesh)
            x = sampler(params, jax.random.fold_in(key, i))  # [chunk, H, W, C] model space
            images = reporting.to_display_uint8(x, config.data.num_bins)
            if jax.process_index() == 0:
                os.makedirs(out_dir, exist_ok=True)
                tmp = path + ".tmp.npz"
                np.savez(tmp, images=images)
                os.replace(tmp, path)
            logging.info("FID samples: chunk %d/%d written.", i + 1, num_chunks)
        yield np.asarray(images)[: num_samples - i * chunk_size]


def _valid_chunk(path: str, chunk_size: int) -> bool:
    if jax.process_index() != 0 or not os.path.exists(path):
        return False
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["images"].dtype == np.uint8 and len(f["images"]) == chunk_size
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        logging.warning("FID samples: %s is unreadable; drawing it again.", path)
        return False


def reference_statistics(
    config: ml_collections.ConfigDict,
    feature_fn,
    variables,
    mesh: jax.sharding.Mesh,
    cache_dir: str,
    weights_sha256: str,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu [2048], sigma [2048, 2048], meta) of the reference split's pool3 features.

    Computed once and cached in ``cache_dir`` as .npz, under a name hashing the data set, split,
    number of examples, image size, levels and the weights' SHA-256.
    """
    split = eval_option(config, "fid_reference_split")
    n_max = eval_option(config, "fid_reference_num_examples")
    meta = dict(
        dataset=config.data.dataset,
        split=split,
        num_examples_requested=int(n_max),
        image_size=config.data.image_size,
        num_bins=config.data.num_bins,
        weights_sha256=weights_sha256,
    )
    tag = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"fid_reference_{split}_{tag}.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            logging.info("FID reference statistics from the cache %s.", path)
            return f["mu"], f["sigma"], meta
    images = input_pipeline.load_split(config, split).images  # [N, H, W, C] levels
    if n_max:
        images = images[:n_max]
    images = levels_to_uint8(images, config.data.num_bins)
    batch = eval_option(config, "fid_batch_size")
    stats, _ = compute_features(
        feature_fn, variables, _slices(images, batch), batch, mesh, want_probs=False
    )
    mu, sigma = stats.mean, stats.covariance()
    meta["num_examples"] = stats.n
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
        logging.info("FID reference statistics of %d %s images cached in %s.", stats.n, split, path)
    return mu, sigma, meta


def _slices(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def evaluate_fid_is(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    workdir: str,
    want_fid: bool = True,
    want_is: bool = True,
) -> dict[str, Any]:
    """FID against the cached reference statistics and/or IS of ``eval.fid_num_samples`` samples.

    Returns the numbers, or ``{"fid_skipped": reason}`` (no number) where the Inception weights
    are not configured, not reachable or not verified.
    """
    cache_dir = os.path.join(workdir, "eval", "fid")
    try:
        net, variables = load_inception(config, cache_dir)
    except WeightsError as e:
        logging.warning("FID/IS skipped, no number is reported: %s", e)
        return {"fid_skipped": str(e)}
    variables = jax.device_put(variables, sharding.replicated(mesh))
    feature_fn = make_feature_fn(net, mesh)
    batch = eval_option(config, "fid_batch_size")
    sharding.check_batch_size(batch, "eval.fid_batch_size")
    out: dict[str, Any] = {}
    sha = eval_option(config, "inception_sha256").strip().lower()
    if want_fid:
        mu_ref, sigma_ref, meta = reference_statistics(
            config, feature_fn, variables, mesh, cache_dir, sha
        )
        out["fid_reference"] = meta
    s = config.sampling
    run_tag = json.dumps(
        dict(
            params=params_fingerprint(params),
            seed=config.seed,
            method=s.method,
            num_steps=s.num_steps,
            eta=s.eta,
            clip=s.clip_denoised,
            chunk=eval_option(config, "fid_chunk_size"),
        ),
        sort_keys=True,
    )
    sample_dir = os.path.join(
        cache_dir, "samples_" + hashlib.sha256(run_tag.encode()).hexdigest()[:16]
    )
    num = eval_option(config, "fid_num_samples")
    chunks = sample_chunks(
        config, model, params, mesh, sample_dir, num, eval_option(config, "fid_chunk_size")
    )
    stats, probs = compute_features(feature_fn, variables, chunks, batch, mesh, want_probs=want_is)
    out["fid_num_samples"] = stats.n
    if want_fid:
        out["fid"] = frechet_distance(stats.mean, stats.covariance(), mu_ref, sigma_ref)
        logging.info("FID %.4f (%d samples vs %s).", out["fid"], stats.n, meta["split"])
    if want_is:
        splits = eval_option(config, "is_num_splits")
        out["inception_score"], out["inception_score_std"] = inception_score(probs, splits)
        logging.info("IS %.4f ± %.4f.", out["inception_score"], out["inception_score_std"])
    return out
