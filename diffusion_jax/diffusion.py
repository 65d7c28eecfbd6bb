"""DDPM as a hierarchical VAE (Ho et al. 2020), with Improved DDPM and DDIM extensions: the public
names of the discrete-time process, in one place. Each piece lives in its own module of
``diffusion_jax.discrete``:

  process  the schedule pytree ``GaussianDiffusion``, respacing, q(x_t | x_0), the posterior,
           the eps / x0 / v parametrisations, the reverse process p(x_{t-1} | x_t)
  bound    the variational bound in bits/dim: L_0, L_t, L_T, over every t or K of them
  losses   the training losses (L_simple, L_vlb, L_hybrid, KL) and the min-SNR weight
  chain    the chain as a ``samplers.Process`` (``DiscreteProcess``; real time t in [0, T-1])
           and its whole-loop samplers (ancestral, DDIM; the algorithms are ``samplers``')

Pure functions over a ``GaussianDiffusion`` schedule pytree ``d`` and a ``model_fn(x_t, t)``
callable. Conventions: data ``x0`` in [-1, 1] of shape [B, ...]; ``t`` is a zero-based int32 array
of shape [B] (t = 0 is the paper's t = 1); abar_t = prod_{s <= t} (1 - beta_s); bits/dim are
means over the non-batch dimensions divided by ln 2. Every function jits and vmaps (vmap adds
axes in front of the batch axis); every function that samples takes an explicit key.

Noise is drawn in float32 and cast to the data dtype, so one key gives the same draws with or
without ``jax_enable_x64``.
"""

from diffusion_jax.discrete.bound import (
    bound_terms,
    calc_bpd_loop,
    prior_bpd,
    sampled_bound_terms,
    vb_terms_bpd,
    vb_terms_bpd_from_p,
)
from diffusion_jax.discrete.chain import (
    DiscreteProcess,
    alpha_sigma,
    chain_keys,
    ddim_sample_loop,
    eps_and_x0,
    lambda_from_t,
    log_alpha_cumprod,
    model_time,
    p_sample,
    p_sample_loop,
    sigma_from_t,
    t_from_lambda,
    t_from_sigma,
)
from diffusion_jax.discrete.losses import (
    HYBRID_LAMBDA,
    LOSS_TYPES,
    MSE_WEIGHTINGS,
    min_snr_weight,
    mse_weight,
    training_losses,
)
from diffusion_jax.discrete.process import (
    MEAN_TYPES,
    VAR_TYPES,
    GaussianDiffusion,
    ModelFn,
    classifier_free_guidance,
    eps_from_score,
    maybe_respace,
    p_mean_variance,
    p_mean_variance_from_output,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_v,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_mean_variance,
    q_posterior_mean_variance,
    q_sample,
    respace,
    score_from_eps,
    space_timesteps,
)

__all__ = [
    "DiscreteProcess",
    "GaussianDiffusion",
    "HYBRID_LAMBDA",
    "LOSS_TYPES",
    "MEAN_TYPES",
    "MSE_WEIGHTINGS",
    "ModelFn",
    "VAR_TYPES",
    "alpha_sigma",
    "bound_terms",
    "calc_bpd_loop",
    "chain_keys",
    "classifier_free_guidance",
    "ddim_sample_loop",
    "eps_and_x0",
    "eps_from_score",
    "lambda_from_t",
    "log_alpha_cumprod",
    "maybe_respace",
    "min_snr_weight",
    "model_time",
    "mse_weight",
    "p_mean_variance",
    "p_mean_variance_from_output",
    "p_sample",
    "p_sample_loop",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_v",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "prior_bpd",
    "q_mean_variance",
    "q_posterior_mean_variance",
    "q_sample",
    "respace",
    "sampled_bound_terms",
    "score_from_eps",
    "sigma_from_t",
    "space_timesteps",
    "t_from_lambda",
    "t_from_sigma",
    "training_losses",
    "vb_terms_bpd",
    "vb_terms_bpd_from_p",
]
