"""What a run shows a person: TensorBoard scalars and images, PNG sample grids, a readable log.

TensorBoard event files are written with tensorboardX (no TensorFlow needed). Only process 0
writes; on other processes every method is a no-op.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from diffusion_jax import files, interrupts


class MetricWriter:
    """Scalars and images to TensorBoard event files in ``logdir`` (process 0 only)."""

    def __init__(self, logdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._writer = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir, flush_secs=30)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(name, float(value), step)

    def image(self, step: int, name: str, grid: np.ndarray) -> None:
        """``grid``: uint8 [H, W, C]."""
        if self._writer is not None:
            self._writer.add_image(name, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid."""
    n, h, w, c = images.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = im
    return grid


def to_display_uint8(images: np.ndarray, num_bins: int) -> np.ndarray:
    """Model space [-1, 1] -> uint8 [0, 255] for display, whatever ``num_bins``."""
    levels = np.round((np.clip(images, -1, 1) + 1) * (num_bins - 1) / 2)
    return np.round(levels * (255 / (num_bins - 1))).astype(np.uint8)


def save_png(path: str, image: np.ndarray, scale: int = 1) -> None:
    """Save uint8 [H, W, C] (C = 1 or 3) as PNG, nearest-upscaled ``scale`` times."""
    from PIL import Image

    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    with files.atomic_write(path) as f:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")


def class_rows(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """uint8 [N, H, W, C] and their classes [N] -> (images laid out one class per row, in
    order of class and then of index, short rows filled with white; the row length)."""
    classes = np.unique(labels)
    rows = [images[labels == k] for k in classes]
    ncols = max(len(r) for r in rows)
    out = np.full((len(rows) * ncols, *images.shape[1:]), 255, np.uint8)
    for i, r in enumerate(rows):
        out[i * ncols : i * ncols + len(r)] = r
    return out, ncols


def save_sample_grid(
    path: str, samples: np.ndarray, num_bins: int, labels: np.ndarray | None = None
) -> np.ndarray:
    """PNG grid of image samples in model space, one class per row when ``labels`` [N] are
    given; returns the uint8 grid (before upscaling)."""
    images = to_display_uint8(samples, num_bins)
    if labels is None:
        grid = image_grid(images)
    else:
        grid = image_grid(*class_rows(images, np.asarray(labels)))
    save_png(path, grid, scale=max(1, 512 // grid.shape[0]))
    return grid


def write_json(path: str, obj: dict) -> None:
    """Write ``obj`` as indented JSON atomically (``files.atomic_write``); process 0 only."""
    if jax.process_index() != 0:
        return
    with files.atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


class _Bar(tqdm):
    """tqdm whose every update is a safe point for Ctrl-C and SIGTERM (``interrupts.check``):
    a long loop of compiled calls stops between two of them."""

    def update(self, n: float = 1) -> bool | None:
        shown = super().update(n)
        interrupts.check()
        return shown


def progress_bar(total: int, desc: str, unit: str = "step", initial: int = 0) -> tqdm:
    """A terminal progress bar with rate and ETA, drawn by process 0 only; each update is a
    safe point for a recorded signal (``interrupts.check``)."""
    return _Bar(
        total=total,
        initial=initial,
        disable=jax.process_index() != 0,
        unit=unit,
        dynamic_ncols=True,
        desc=desc,
        smoothing=0.1,
        mininterval=1.0,
    )


def log_metrics(step: int, values: dict[str, float]) -> None:
    text = ", ".join(f"{k} {v:.5g}" for k, v in sorted(values.items()))
    logging.info("step %d: %s", step, text)
