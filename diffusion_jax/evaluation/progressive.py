"""Progressive generation (Ho et al. 2020, Figure 6): x0_hat along the reverse chain of a few
fixed-seed samples, as a strip of images from the noisiest step to t = 0."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import input_pipeline, objectives, reporting, sampling
from diffusion_jax.evaluation.context import EvalContext


def progressive_samples(
    d: diffusion_lib.GaussianDiffusion,
    model_fn: diffusion_lib.ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    num_frames: int = 10,
    num_steps: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ancestral samples and x0_hat at ``num_frames`` steps along the chain (paper Figure 6).

    Returns (x0 [N, ...], frames [F, N, ...] from the noisiest kept step to t = 0, t_of_frame
    [F]): x0_hat every k = ceil(K / num_frames) steps of the K-step chain, as
    ``p_sample_loop(pred_x0_every=k)`` keeps it (chain steps i with i % k == 0).
    """
    num = d.num_timesteps if not num_steps else num_steps
    every = max(1, -(-num // num_frames))
    fn = jax.jit(
        lambda key: diffusion_lib.p_sample_loop(
            d, model_fn, shape, key, num_steps=num_steps, pred_x0_every=every
        )
    )
    x0, frames = fn(key)  # [N, ...], [ceil(K / k), N, ...]
    steps = np.arange(0, num, every)[::-1]  # chain indices, noisiest first
    if num_steps and num_steps != d.num_timesteps:
        steps = diffusion_lib.space_timesteps(d.num_timesteps, num_steps)[steps]
    return np.asarray(x0), np.asarray(frames), np.asarray(steps)


def progressive_strip(frames: np.ndarray, num_bins: int) -> np.ndarray:
    """frames [F, N, H, W, C] model space -> uint8 grid, one row per sample, one column per
    frame (noisiest left): [N (H+1) + 1, F (W+1) + 1, C]."""
    f, n = frames.shape[:2]
    rows = np.swapaxes(frames, 0, 1).reshape(n * f, *frames.shape[2:])  # sample-major
    return reporting.image_grid(reporting.to_display_uint8(rows, num_bins), ncols=f)


def progressive(ctx: EvalContext) -> dict[str, Any]:
    """The strip of ``eval.progressive.num_samples`` samples, ``eval.progressive.num_frames``
    columns, key fold_in(run sample key, 6), the config's chain length (``sampling.num_steps``);
    a conditional model's sample i of class ``sampling.sample_labels(config, n)[i]``."""
    config = ctx.config
    n = config.eval.progressive.num_samples
    shape = (n, *input_pipeline.example_shape(config))
    key = jax.random.fold_in(objectives.run_keys(config.seed)["sample"], 6)
    _, frames, steps = progressive_samples(
        ctx.diffusion,
        sampling.net(config, ctx.model, ctx.params, sampling.sample_labels(config, n)),
        shape,
        key,
        config.eval.progressive.num_frames,
        config.sampling.num_steps or None,
    )
    grid = progressive_strip(frames, config.data.num_bins)
    path = ctx.figure_path("progressive")
    if jax.process_index() == 0:
        reporting.save_png(path, grid, scale=max(1, 320 // grid.shape[0]))
    return {
        "progressive": {
            "path": path,
            "t_of_columns": steps.tolist(),
            "num_samples": n,
            "shape": grid.shape,
        },
        "figures": {**ctx.metrics.get("figures", {}), "progressive": path},
    }
