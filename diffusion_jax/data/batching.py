"""Batches as pure functions of the step, and grey levels <-> model space.

The global batch of step ``s`` is a pure function of ``(seed, s)``: an example stream that walks
through a new seeded permutation every epoch, plus seeded random flips. So

- the position in the data is the step itself, and a resumed run sees exactly the batches an
  uninterrupted run would have seen;
- every host computes the same global index list and keeps its own slice, so the global batch is
  the same on 1 process x 2 devices and 2 processes x 1 device.

Images stay uint8 until they reach the device: ``to_model_space`` maps level k of ``num_bins`` to
``2k/(num_bins-1) - 1`` inside the compiled step (a quarter of the host-to-device bytes).

``train_batches`` assembles the batches of the coming steps ahead on Grain's worker threads
(``data.num_workers``, ``data.prefetch_batches``); its position is the step it starts from.
A batch is a dict: ``image`` [B, ...] and, for a class-conditional model
(``config.model.num_classes`` > 0), ``label`` int32 [B], the rows of the same indices.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax.data import toy_distributions
from diffusion_jax.data.base import DataSource


def example_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Shape of one example in model space: (H, W, C) for images, (D,) for vectors."""
    d = config.data
    if d.image_size:
        return (d.image_size, d.image_size, d.num_channels)
    return (d.num_channels,)


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
        points = np.asarray(toy_distributions.sample(source.toy_name, key, batch_size), np.float32)
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
