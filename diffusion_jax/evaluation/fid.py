"""FID and Inception Score (Heusel et al. 2017; Salimans et al. 2016) of a run's samples.

The standard FID protocol on uint8 images, with the network of ``models.inception``:
FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)) between the Gaussians fitted
to the pool3 features of the samples and of the reference data (reference statistics computed
once from a data split and cached in ``WORKDIR/eval/fid``); IS = exp(E_x KL(p(y | x) || p(y))),
the mean and standard deviation over ``eval.inception.is_num_splits`` splits. The samples are
drawn in resumable chunk files. Where no weights are configured or they cannot be fetched or
verified, FID and IS are skipped with a message saying why, and no number is reported.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import zipfile
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import scipy.linalg
import scipy.special
from absl import logging
from jax.experimental import multihost_utils

from diffusion_jax import files, input_pipeline, objectives, reporting, sampling, sharding
from diffusion_jax.evaluation.context import EvalContext
from diffusion_jax.evaluation.inception_weights import (
    WeightsError,
    flatten_variables,
    load_inception,
)
from diffusion_jax.models.inception import FEATURE_DIM, InceptionV3


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
    sym = np.asfortranarray((a + a.T) / 2)
    c, piv, rank, info = scipy.linalg.lapack.dpstrf(sym, tol=-1.0, lower=1)
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
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(
            f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}."
        )
    f = _psd_factor(s1)  # [d, r]
    m = f.T @ s2 @ f  # [r, r]
    eig = (
        scipy.linalg.eigh((m + m.T) / 2, eigvals_only=True, driver="evd") if m.size else np.zeros(0)
    )
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def inception_score(probs: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """IS = exp(mean_i KL(p(y | x_i) || p_hat(y))), p_hat(y) = mean_i p(y | x_i), per split.

    ``probs`` [N, K] class probabilities; returns (mean, std) over ``num_splits`` consecutive
    splits (Salimans et al. 2016). 1 for identical rows; K for one-hot rows of K equally frequent
    classes.
    """
    probs = np.asarray(probs, np.float64)  # [N, K]
    if probs.ndim != 2 or len(probs) < num_splits:
        raise ValueError(f"Need [N >= num_splits={num_splits}, K] probabilities: {probs.shape}.")
    scores = []
    for part in np.array_split(probs, num_splits):
        p_y = part.mean(axis=0, keepdims=True)  # [1, K]
        kl = np.sum(scipy.special.xlogy(part, part) - scipy.special.xlogy(part, p_y), axis=1)  # [n]
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
    stats = FeatureStats()
    probs = []
    rows = input_pipeline.host_slice(batch_size, jax.process_index(), jax.process_count())
    for images in _rebatch(batches, batch_size):
        n = len(images)
        if n < batch_size:
            pad = np.zeros((batch_size - n, *images.shape[1:]), np.uint8)
            images = np.concatenate([images, pad])
        pool, logits = feature_fn(variables, sharding.global_batch(mesh, images[rows]))
        stats.update(sampling.to_host(pool)[:n])
        if want_probs:
            probs.append(
                scipy.special.softmax(sampling.to_host(logits)[:n].astype(np.float64), axis=-1)
            )
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

    Chunk i is drawn by ``sampling.make_sample_fn`` (sharded over the mesh) from key
    fold_in(fold_in(run sample key, 0xF1D), i) and written to ``out_dir/chunk_{i:05d}.npz``
    (atomically); a chunk file that is already there is read instead, so an interrupted run
    resumes where it stopped. ``out_dir`` should name the parameters and sampler settings. On
    several hosts the workdir is shared (as for the checkpoints): process 0 decides which chunks
    exist and writes new ones, every process reads them.
    """
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
    key = jax.random.fold_in(objectives.run_keys(config.seed)["sample"], 0xF1D)
    for i, path in enumerate(paths):
        if exists[i]:
            with np.load(path, allow_pickle=False) as f:
                images = f["images"]
        else:
            if sampler is None:
                sampler = sampling.make_sample_fn(
                    cfg, model, mesh, desc=f"FID samples {i + 1}/{num_chunks}"
                )
            x = sampler(params, jax.random.fold_in(key, i))  # [chunk, H, W, C] model space
            images = reporting.to_display_uint8(x, config.data.num_bins)
            if jax.process_index() == 0:
                with files.atomic_write(path) as f:
                    np.savez(f, images=images)
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
    split = config.eval.inception.reference_split
    n_max = config.eval.inception.reference_num_examples
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
    batch = config.eval.inception.batch_size
    stats, _ = compute_features(
        feature_fn, variables, _slices(images, batch), batch, mesh, want_probs=False
    )
    mu, sigma = stats.mean, stats.covariance()
    meta["num_examples"] = stats.n
    if jax.process_index() == 0:
        with files.atomic_write(path) as f:
            np.savez(f, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        logging.info("FID reference statistics of %d %s images cached in %s.", stats.n, split, path)
    return mu, sigma, meta


def _slices(images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


def _features(ctx: EvalContext) -> dict[str, Any]:
    """The samples' pool3 statistics and class probabilities, the reference statistics, or
    {"fid_skipped": reason}; computed once for both evaluators (IS reads FID's samples)."""
    if "fid_features" in ctx.cache:
        return ctx.cache["fid_features"]
    config, mesh = ctx.config, ctx.mesh
    cache_dir = os.path.join(ctx.eval_dir, "fid")
    try:
        net, variables = load_inception(config, cache_dir)
    except WeightsError as e:
        logging.warning("FID/IS skipped, no number is reported: %s", e)
        ctx.cache["fid_features"] = {"fid_skipped": str(e)}
        return ctx.cache["fid_features"]
    variables = jax.device_put(variables, sharding.replicated(mesh))
    feature_fn = make_feature_fn(net, mesh)
    out: dict[str, Any] = {}
    sha = config.eval.inception.sha256.strip().lower()
    if "fid" in config.eval.metrics:
        out["reference"] = reference_statistics(config, feature_fn, variables, mesh, cache_dir, sha)
    s = config.sampling
    run_tag = json.dumps(
        dict(
            params=params_fingerprint(ctx.params),
            seed=config.seed,
            method=s.method,
            num_steps=s.num_steps,
            eta=s.eta,
            clip=s.clip_denoised,
            chunk=config.eval.inception.chunk_size,
        ),
        sort_keys=True,
    )
    sample_dir = os.path.join(
        cache_dir, "samples_" + hashlib.sha256(run_tag.encode()).hexdigest()[:16]
    )
    chunks = sample_chunks(
        config,
        ctx.model,
        ctx.params,
        mesh,
        sample_dir,
        config.eval.inception.num_samples,
        config.eval.inception.chunk_size,
    )
    want_probs = "is" in config.eval.metrics
    batch = config.eval.inception.batch_size
    out["stats"], out["probs"] = compute_features(
        feature_fn, variables, chunks, batch, mesh, want_probs=want_probs
    )
    ctx.cache["fid_features"] = out
    return out


def fid(ctx: EvalContext) -> dict[str, Any]:
    """``fid`` against the cached reference statistics, ``fid_num_samples``, ``fid_reference``."""
    f = _features(ctx)
    if "fid_skipped" in f:
        return {"fid_skipped": f["fid_skipped"]}
    stats = f["stats"]
    mu_ref, sigma_ref, meta = f["reference"]
    value = frechet_distance(stats.mean, stats.covariance(), mu_ref, sigma_ref)
    logging.info("FID %.4f (%d samples vs %s).", value, stats.n, meta["split"])
    return {"fid": value, "fid_num_samples": stats.n, "fid_reference": meta}


def inception_score_metric(ctx: EvalContext) -> dict[str, Any]:
    """``inception_score`` and ``inception_score_std`` of the FID samples."""
    f = _features(ctx)
    if "fid_skipped" in f:
        return {"fid_skipped": f["fid_skipped"]}
    mean, std = inception_score(f["probs"], ctx.config.eval.inception.is_num_splits)
    logging.info("IS %.4f ± %.4f.", mean, std)
    return {"inception_score": mean, "inception_score_std": std, "fid_num_samples": f["stats"].n}
