"""The paper's rate-distortion view of the bound (Ho et al. 2020, section 4.3, Table 4, Fig. 5).

Time is zero-based (t = 0 is the paper's t = 1). The latents are x_t, t = 0..T-1, and the terms of
the bound in bits/dim are

    L_T = KL(q(x_{T-1} | x0) || N(0, I))                    (the cost of sending x_{T-1})
    L_t = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)), t > 0  (the cost of x_{t-1} given x_t)
    L_0 = -log p(x0 | x_0-latent)                           (the cost of the data itself)

Progressive lossy compression sends x_{T-1}, then x_{T-2}, ..., so a receiver holding x_t has
received

    rate(t) = L_T + sum_{s = t+1}^{T-1} L_s   bits/dim

(in the paper's one-based indices: L_T + sum_{s >= t} L_s at its step t), and reconstructs
x0_hat(x_t, t) with distortion

    RMSE(t) = sqrt(mean_dims (255/2 (x0_hat - x0))^2)   on the [0, 255] scale,

x0_hat clipped to [-1, 1]. After the last term L_0 the data are sent losslessly (rate = the whole
bound, distortion 0). The terms and distortions come from ``diffusion.bound_terms`` (one model
call per t gives both), summed over examples by ``EvalContext.bound_sums``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from diffusion_jax import reporting
from diffusion_jax.evaluation import plots
from diffusion_jax.evaluation.context import EvalContext


def rate_distortion_curve(
    terms_bpd: np.ndarray, prior_bpd: float, rmse: np.ndarray, mse: np.ndarray | None = None
) -> dict[str, Any]:
    """Cumulative rate and distortion per t from mean terms [T], L_T and RMSE [T] (the mean over
    examples of the per-example RMSE; ``mse`` [T] the mean squared error, optional).

    rate[t] = L_T + sum_{s > t} L_s; lists are indexed by t (0..T-1); the reverse process visits
    them from t = T-1 down to 0.
    """
    terms = np.asarray(terms_bpd, np.float64)  # [T]
    after = np.concatenate([np.cumsum(terms[::-1])[::-1][1:], [0.0]])  # sum_{s > t} L_s
    rate = float(prior_bpd) + after
    out = {
        "t": list(range(len(terms))),
        "rate_bpd": rate.tolist(),
        "distortion_rmse": np.asarray(rmse, np.float64).tolist(),
        "lossless_bpd": float(prior_bpd + terms.sum()),
        "prior_LT_bpd": float(prior_bpd),
        "terms_bpd": terms.tolist(),
        "rate_definition": "rate[t] = L_T + sum_{s>t} L_s (bits/dim received when x_t is held)",
        "distortion_definition": "mean over examples of sqrt(mean_dims((x0_hat(x_t)-x0)^2)), "
        "[0,255] scale, x0_hat clipped to [-1,1]",
    }
    if mse is not None:
        out["distortion_rmse_of_mean_mse"] = np.sqrt(np.asarray(mse, np.float64)).tolist()
    return out


def rate_distortion(ctx: EvalContext) -> dict[str, Any]:
    """``rate_distortion_curve`` over the first ``eval.rate_distortion.num_examples`` of
    ``eval.split`` (0: all), the same batches and keys as bits/dim (so on the same examples
    ``lossless_bpd`` is its ``bpd``); writes ``eval/rate_distortion.json`` and the figure."""
    split = ctx.config.eval.split
    total = ctx.bound_sums(split, ctx.config.eval.rate_distortion.num_examples)
    count = float(total["count"])
    rd = rate_distortion_curve(
        total["terms_bpd"] / count,
        float(total["prior_bpd"]) / count,
        total["x0_rmse"] / count,
        total["x0_sq_err"] / count,
    )
    rd.update(split=split, num_examples=int(count))
    rd_json = os.path.join(ctx.eval_dir, "rate_distortion.json")
    reporting.write_json(rd_json, rd)
    path = ctx.figure_path("rate_distortion")
    if jax.process_index() == 0:
        plots.plot_rate_distortion(rd, path)
    summary = {k: rd[k] for k in ("lossless_bpd", "num_examples", "split")}
    return {
        "rate_distortion": {"path": rd_json, **summary},
        "figures": {**ctx.metrics.get("figures", {}), "rate_distortion": path},
    }
