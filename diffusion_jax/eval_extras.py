"""What ``--mode eval`` adds to bits/dim: more splits, the paper's figures, FID and IS.

``evaluate.evaluate`` calls ``evaluate_extras`` after its own bits/dim and merges the result into
``eval/metrics.json``. Figures go to ``WORKDIR/eval/figures/``; FID samples, the reference
statistics and downloaded weights to ``WORKDIR/eval/fid/``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import ml_collections
from absl import logging

from diffusion_jax import fid, figures, reporting, sharding

CONFIG_DEFAULTS = {**figures.DEFAULTS, **fid.DEFAULTS}  # eval.<key> defaults of both modules


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError for a bad ``eval`` key of the extras; compiles and reads nothing."""
    wanted = tuple(figures.eval_option(config, "figures"))
    unknown = [f for f in wanted if f not in figures.FIGURES]
    if unknown:
        raise ValueError(f"config.eval.figures has {unknown}; allowed: {figures.FIGURES}.")
    splits = figures.eval_option(config, "bpd_splits")
    if isinstance(splits, str) or not all(isinstance(s, str) for s in splits):
        raise ValueError(f"config.eval.bpd_splits must be a tuple of split names, got {splits!r}.")
    if "fid" in config.eval.metrics or "is" in config.eval.metrics:
        sharding.check_batch_size(fid.eval_option(config, "fid_batch_size"), "eval.fid_batch_size")
        sha = fid.eval_option(config, "inception_sha256")
        if sha and not re.fullmatch(r"[0-9a-fA-F]{64}", sha.strip()):
            raise ValueError(f"config.eval.inception_sha256={sha!r} is not 64 hex digits.")
        for key in ("fid_chunk_size", "fid_num_samples"):
            if fid.eval_option(config, key) <= 0:
                raise ValueError(f"config.eval.{key} must be positive.")
        if fid.eval_option(config, "fid_num_samples") < fid.eval_option(config, "is_num_splits"):
            raise ValueError("config.eval.fid_num_samples must be >= eval.is_num_splits.")


def evaluate_extras(
    config: ml_collections.ConfigDict,
    model,
    params: Any,
    mesh: jax.sharding.Mesh,
    workdir: str,
    metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything of ``eval.figures``, ``eval.bpd_splits`` and the ``fid`` / ``is`` of
    ``eval.metrics``; ``metrics`` are those computed so far (their ``terms_bpd_per_t`` is plotted).

    Returns keys to merge into metrics.json: ``bpd_by_split`` {split: evaluate_bpd's dict},
    ``figures`` {name: path}, ``rate_distortion`` (the curve's summary and its JSON path),
    ``progressive``, and ``fid`` / ``inception_score`` / ``inception_score_std`` /
    ``fid_num_samples`` / ``fid_reference``, or ``fid_skipped`` with the reason (no number).
    """
    metrics = metrics or {}
    out: dict[str, Any] = {}
    eval_dir = os.path.join(workdir, "eval")
    fig_dir = os.path.join(eval_dir, "figures")
    check_config(config)
    wanted = tuple(figures.eval_option(config, "figures"))
    ddpm_images = config.training.objective == "ddpm" and bool(config.data.image_size)
    paths: dict[str, str] = {}

    splits = [s for s in figures.eval_option(config, "bpd_splits") if s != metrics.get("split")]
    if splits and not ddpm_images:
        logging.warning("eval.bpd_splits needs a DDPM on image data: skipped.")
    elif splits:
        n = figures.eval_option(config, "bpd_splits_num_examples")
        out["bpd_by_split"] = {}
        for split in splits:
            r = figures.split_bpd(config, model, params, mesh, split, None if n < 0 else n)
            out["bpd_by_split"][split] = r
            logging.info(
                "bits/dim %.4f ± %.4f on %d %s examples",
                r["bpd"],
                r["bpd_stderr"],
                r["num_examples"],
                split,
            )
        if "bpd" in metrics:  # the main split too, so the table is in one place
            out["bpd_by_split"][metrics["split"]] = {
                k: metrics[k]
                for k in ("bpd", "bpd_stderr", "bpd_terms", "num_examples", "split")
                if k in metrics
            }

    if "lt_curve" in wanted and "terms_bpd_per_t" in metrics:
        paths["lt_curve"] = os.path.join(fig_dir, "lt_curve.png")
        if jax.process_index() == 0:
            figures.plot_lt_curve(
                metrics["terms_bpd_per_t"],
                paths["lt_curve"],
                metrics.get("mse_per_t"),
                title=f"L_t on {metrics['num_examples']} {metrics['split']} examples, "
                f"sum {metrics['bpd_terms']['sum_Lt']:.4f} bits/dim",
            )

    if "rate_distortion" in wanted and ddpm_images:
        rd = figures.evaluate_rate_distortion(config, model, params, mesh)
        rd_json = os.path.join(eval_dir, "rate_distortion.json")
        reporting.write_json(rd_json, rd)
        paths["rate_distortion"] = os.path.join(fig_dir, "rate_distortion.png")
        if jax.process_index() == 0:
            figures.plot_rate_distortion(rd, paths["rate_distortion"])
        out["rate_distortion"] = {
            "path": rd_json,
            "lossless_bpd": rd["lossless_bpd"],
            "num_examples": rd["num_examples"],
            "split": rd["split"],
        }

    if "progressive" in wanted and ddpm_images:
        paths["progressive"] = os.path.join(fig_dir, "progressive.png")
        out["progressive"] = figures.save_progressive(config, model, params, paths["progressive"])

    if paths:
        out["figures"] = paths
        logging.info("Figures: %s", ", ".join(paths.values()))

    want_fid, want_is = "fid" in config.eval.metrics, "is" in config.eval.metrics
    if (want_fid or want_is) and not config.data.image_size:
        logging.warning("FID/IS need image data: skipped.")
    elif want_fid or want_is:
        out.update(fid.evaluate_fid_is(config, model, params, mesh, workdir, want_fid, want_is))
    return out
