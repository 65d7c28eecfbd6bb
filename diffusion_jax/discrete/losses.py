"""The DDPM's training losses (Ho et al. 2020; Improved DDPM): L_simple, the true L_vlb
weights, L_hybrid and the KL, per example, with the min-SNR weight of the mse term."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import likelihood, samplers, timesteps
from diffusion_jax.discrete.bound import (
    prior_bpd,
    vb_terms_bpd_from_p,
)
from diffusion_jax.discrete.process import (
    GaussianDiffusion,
    ModelFn,
    _check_choice,
    _split_output,
    p_mean_variance_from_output,
    predict_v,
    q_sample,
)

__all__ = [
    "HYBRID_LAMBDA",
    "LOSS_TYPES",
    "MSE_WEIGHTINGS",
    "min_snr_weight",
    "mse_weight",
    "training_losses",
]

# ----------------------------------------------------------------------------------------------
# Training losses

MSE_WEIGHTINGS = ("none", "min_snr")  # the mse term's weight over t (``mse_weight``)

HYBRID_LAMBDA = 0.001  # Improved DDPM's lambda in L_hybrid = L_simple + lambda L_vlb

LOSS_TYPES = ("simple", "vlb", "hybrid", "kl")


def min_snr_weight(d: GaussianDiffusion, t: jax.Array, gamma: float) -> jax.Array:
    """Min-SNR-gamma loss weight [B] (Hang et al. 2023, section 3.4): min(SNR_t, gamma) on
    the x0-error, SNR_t = abar_t / (1 - abar_t), written for the target of ``d.mean_type``
    (||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR_t = ||v - v_hat||^2 / (SNR_t + 1)):

      eps: min(SNR_t, gamma) / SNR_t,   x0: min(SNR_t, gamma),   v: min(SNR_t, gamma) / (SNR_t + 1).
    """
    abar = d.alphas_cumprod[t]
    snr = abar / jnp.square(d.sqrt_one_minus_alphas_cumprod[t])  # [B]
    clipped = jnp.minimum(snr, gamma)
    return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[d.mean_type]


def mse_weight(
    d: GaussianDiffusion, t: jax.Array, weighting: str = "none", min_snr_gamma: float = 5.0
) -> jax.Array | None:
    """The mse term's weight over t [B]: ``none`` (L_simple: None, i.e. 1) or ``min_snr``."""
    _check_choice("mse_weighting", weighting, MSE_WEIGHTINGS)
    return None if weighting == "none" else min_snr_weight(d, t, min_snr_gamma)


def training_losses(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    loss_type: str = "simple",
    t: jax.Array | None = None,
    noise: jax.Array | None = None,
    num_bins: int = 256,
    mse_weighting: str = "none",
    min_snr_gamma: float = 5.0,
    hybrid_lambda: float = HYBRID_LAMBDA,
    hybrid_train_mean: bool = False,
    t_vb: jax.Array | None = None,
    vb_weights: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Per-example losses [B] at t ~ U{0..T-1} (or the given t) and x_t = q_sample(x0, t, eps).

    - mse = mean_flat((target - model mean output)^2), target eps, x0 or v per ``d.mean_type``,
      times ``mse_weight`` (``mse_weighting`` "min_snr": Hang et al.'s min-SNR-gamma);
    - vb = L_t in bits/dim (``vb_terms_bpd``, no clipping);
    - loss: ``simple`` mse; ``kl`` vb; ``vlb`` T vb + L_T, an unbiased one-sample estimate of the
      whole bound in bits/dim (for eps-prediction with a fixed variance, L_t at t > 0 is
      beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 plus a constant);
      ``hybrid`` mse + lambda T vb (``hybrid_lambda``, Improved DDPM's 0.001) with the mean
      frozen (stop-gradient) in vb unless ``hybrid_train_mean``, so the bound trains only a
      learned variance (Improved DDPM's L_simple + lambda L_vlb with L_vlb ~ T L_t; meant for
      ``learned_range``, with a fixed variance and a frozen mean vb adds no gradient).
    - ``t_vb`` [B] (hybrid only, e.g. importance-sampled): the vb term at its own step t_vb,
      with its own noise, times ``vb_weights`` [B] (1 / (T p_t)), while the mse term stays at t;
      the two halves go through the network in one call of 2B examples. Then ``vb_loss`` = T vb
      at t_vb (unweighted) is returned too, the value a loss history records for t_vb.
    Returns dict(loss, mse, vb[, vb_loss]). For importance-sampled t (no ``t_vb``) multiply
    ``loss`` by the weights.
    """
    _check_choice("loss_type", loss_type, LOSS_TYPES)
    if t_vb is not None and loss_type != "hybrid":
        raise ValueError(
            f"t_vb (a t of the vb term's own) needs loss_type 'hybrid', got {loss_type!r}."
        )
    key_t, key_noise = jax.random.split(key)
    if t is None:
        t = timesteps.uniform(key_t, x0.shape[0], d.num_timesteps)
    if noise is None:
        noise = samplers.normal(key_noise, x0.shape, x0.dtype)
    x_t = q_sample(d, x0, t, noise)
    split = t_vb is not None
    if split:  # [2B]: the mse term's examples, then the vb term's
        x_t_vb = q_sample(
            d, x0, t_vb, samplers.normal(jax.random.fold_in(key_noise, 1), x0.shape, x0.dtype)
        )
        both = model_fn(jnp.concatenate([x_t, x_t_vb]), d.timestep_map[jnp.concatenate([t, t_vb])])
        out, out_vb = jnp.split(both, 2)
    else:
        out = out_vb = model_fn(x_t, d.timestep_map[t])
        t_vb, x_t_vb = t, x_t
    mean_out, _ = _split_output(d, out, x_t)
    target = {"eps": noise, "x0": x0, "v": predict_v(d, x0, t, noise)}[d.mean_type]
    mse = likelihood.mean_flat(jnp.square(target - mean_out))
    weight = mse_weight(d, t, mse_weighting, min_snr_gamma)
    weighted_mse = mse if weight is None else weight * mse
    if loss_type == "hybrid" and not hybrid_train_mean:
        mean_vb, v = _split_output(d, out_vb, x_t_vb)
        frozen = jax.lax.stop_gradient(mean_vb)
        out_vb = frozen if v is None else jnp.concatenate([frozen, v], axis=-1)
    p = p_mean_variance_from_output(d, out_vb, x_t_vb, t_vb, clip_denoised=False)
    vb = vb_terms_bpd_from_p(d, p, x0, x_t_vb, t_vb, num_bins)
    num_t = d.num_timesteps
    vb_term = num_t * vb if vb_weights is None else num_t * vb * vb_weights
    loss = {
        "simple": lambda: weighted_mse,
        "kl": lambda: vb,
        "vlb": lambda: num_t * vb + prior_bpd(d, x0),
        "hybrid": lambda: weighted_mse + hybrid_lambda * vb_term,
    }[loss_type]()
    out = dict(loss=loss, mse=mse, vb=vb)
    return dict(out, vb_loss=num_t * vb) if split else out
