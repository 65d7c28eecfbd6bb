"""The evaluation's figures as PNG files (matplotlib, Agg): the only module that plots."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from diffusion_jax import files


def _pyplot():
    # Imported where a figure is drawn, so that a broken matplotlib fails that figure's step
    # (with one line naming it) and never the numbers computed before it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Lay out, write (creating the folder) and close a matplotlib figure."""
    fig.tight_layout()
    try:
        with files.atomic_write(path) as f:
            fig.savefig(f, format=os.path.splitext(path)[1].lstrip(".") or "png")
    finally:
        _pyplot().close(fig)


def plot_lt_curve(
    terms_bpd_per_t: list[float] | np.ndarray,
    path: str,
    mse_per_t: list[float] | np.ndarray | None = None,
    title: str = "",
) -> None:
    """PNG of L_t (bits/dim, log scale) against t; with ``mse_per_t`` a second panel of
    E||eps_hat - eps||^2 / D against t."""
    total = float(np.sum(terms_bpd_per_t))
    plot_lt_curves(
        {"": (terms_bpd_per_t, mse_per_t)}, path, title or f"L_t, sum {total:.4f} bits/dim"
    )


def plot_lt_curves(
    curves: dict[str, tuple[Any, Any]], path: str, title: str = "", log_t: bool = False
) -> None:
    """``plot_lt_curve`` for several runs on the same axes: ``curves`` maps a label to
    (L_t per t, eps-MSE per t or None); ``log_t`` puts t on a log scale (t + 1)."""
    plt = _pyplot()
    with_mse = any(mse is not None for _, mse in curves.values())
    panels = 2 if with_mse else 1
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.2), dpi=100, squeeze=False)
    for label, (terms, mse) in curves.items():
        terms = np.asarray(terms, np.float64)  # [T]
        t = np.arange(len(terms)) + (1 if log_t else 0)
        axes[0, 0].plot(t, np.maximum(terms, 1e-12), lw=1, label=label or None)
        if mse is not None:
            axes[0, 1].plot(t, np.asarray(mse), lw=1, label=label or None)
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_xlabel("t + 1" if log_t else "t (0 = the decoder term L_0)")
    ax.set_ylabel("L_t (bits/dim)")
    ax.set_title(title, fontsize=9)
    if with_mse:
        axes[0, 1].set_yscale("log")
        axes[0, 1].set_xlabel("t + 1" if log_t else "t")
        axes[0, 1].set_ylabel("eps MSE per dim")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        if log_t:
            ax.set_xscale("log")
        if len(curves) > 1:
            ax.legend(fontsize=7)
    _save(fig, path)


def plot_rate_distortion(rd: dict[str, Any], path: str) -> None:
    """Two panels: rate (bits/dim) against t, and distortion (RMSE, [0, 255]) against rate."""
    plt = _pyplot()
    t = np.asarray(rd["t"])
    rate = np.asarray(rd["rate_bpd"])
    dist = np.asarray(rd["distortion_rmse"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.3), dpi=100)
    a.plot(t, rate, lw=1.2)
    a.invert_xaxis()  # the reverse process runs from t = T-1 to 0
    a.set_xlabel("t (reverse process: T-1 → 0)")
    a.set_ylabel("rate (bits/dim)")
    a.set_title(f"cumulative rate; lossless {rd['lossless_bpd']:.3f} bits/dim", fontsize=9)
    a.grid(alpha=0.3)
    b.plot(rate, dist, lw=1.2, color="C3")
    b.plot([rd["lossless_bpd"]], [0.0], "o", color="C3", ms=3)
    b.set_xlabel("rate (bits/dim)")
    b.set_ylabel("distortion (RMSE, [0, 255])")
    b.set_title(f"rate-distortion, {rd.get('num_examples', '?')} examples", fontsize=9)
    b.grid(alpha=0.3)
    _save(fig, path)


def plot_gamma_schedules(curves: dict[str, tuple[Any, Any]], path: str, title: str = "") -> None:
    """PNG of γ(t) = log σ²/α² against t ∈ [0, 1], one line per schedule: ``curves`` maps a
    label to (t [N], γ [N])."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=100)
    for label, (t, gamma) in curves.items():
        ax.plot(
            np.asarray(t),
            np.asarray(gamma),
            lw=1.5 if label.startswith("learned") else 1,
            label=label,
        )
    ax.set_xlabel("t")
    ax.set_ylabel("gamma(t) = log sigma^2 / alpha^2")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=8)
    _save(fig, path)
