"""Continuous-time diffusion: the variational diffusion model (VDM, Kingma et al. 2021) and the
weighted objectives of Kingma & Gao (2023). Pure JAX: arrays, a ``model_fn(z_t, t) -> ε̂`` with
continuous t in [0, 1], and a noise schedule ``gamma_fn(t) -> γ(t)``.

The process is variance preserving and written in γ(t) = log σ²_t/α²_t = −λ(t) (λ the log-SNR):
α²_t = sigmoid(−γ_t), σ²_t = sigmoid(γ_t), z_t = α_t x + σ_t ε; γ increases from γ(0) = γ_min
(almost no noise) to γ(1) = γ_max (almost pure noise). The bound on −log P(x) of data of
``num_bins`` grey levels is

    L = L_0 + L_diffusion + L_1:  E_q[−log p(x | z_0)] + ½ E_{t~U(0,1)}[γ'(t) ‖ε − ε̂(z_t, t)‖²]
                                  + KL(q(z_1 | x) ‖ N(0, I))                        (VDM eq. 17)

and, for T steps of the chain (t_i = i/T, s = t − 1/T), its finite form with
½ T E_i[(exp(γ_t − γ_s) − 1) ‖ε − ε̂‖²] for the diffusion term (VDM eq. 11); L_T ≥ L_2T ≥ L_∞.

Schedules (``GAMMAS``): ``linear`` (γ linear in t between γ_min and γ_max, VDM's fixed
baseline), ``cosine`` (Nichol & Dhariwal's α_t = cos(π u/2), truncated to [γ_min, γ_max]),
``beta_linear`` (the continuous form of DDPM's linear β from β_1 to β_T over T steps) and
``learned`` (VDM's monotone network ``monotone_shape`` between learned or fixed endpoints).
Everything takes t of shape [B] and is jit- and vmap-able; all in float32 unless given float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import samplers
from diffusion_jax.samplers import per_example

__all__ = [
    "ContinuousProcess",
    "GAMMAS",
    "GammaFn",
    "ModelFn",
    "WEIGHTINGS",
    "alpha_sigma",
    "bits_per_dim_scale",
    "bound_terms",
    "diffusion_loss",
    "diffusion_loss_from_gamma",
    "finite_diffusion_loss",
    "gamma_and_derivative",
    "gamma_beta_linear",
    "gamma_cosine",
    "gamma_learned",
    "gamma_linear",
    "init_monotone_params",
    "level_values",
    "monotone_shape",
    "normalised_shape",
    "predict_x",
    "prior_loss",
    "q_posterior",
    "q_sample",
    "reconstruction_loss",
    "snr_net_time",
    "variance_gradient",
    "weight",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (z_t [B, ...], t [B]) -> ε̂ [B, ...]
GammaFn = Callable[[jax.Array], jax.Array]  # t [B] -> γ(t) [B]

GAMMAS = ("learned", "linear", "cosine", "beta_linear")
WEIGHTINGS = ("elbo", "sigmoid", "edm", "min_snr")


def _flat_sum(v: jax.Array) -> jax.Array:
    return v.reshape(v.shape[0], -1).sum(axis=1)  # [B]


def bits_per_dim_scale(x: jax.Array) -> float:
    """1 / (D ln 2): nats summed over the D = H·W·C dimensions of one example -> bits/dim."""
    return 1.0 / (math.prod(x.shape[1:]) * math.log(2.0))


# ----------------------------------------------------------------------------- the process


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """α_t = sqrt(sigmoid(−γ_t)), σ_t = sqrt(sigmoid(γ_t)): α² + σ² = 1, σ²/α² = exp(γ)."""
    return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))


def q_sample(x: jax.Array, gamma_t: jax.Array, noise: jax.Array) -> jax.Array:
    """z_t = α_t x + σ_t ε ~ q(z_t | x) = N(α_t x, σ²_t I); x, noise [B, ...], γ_t [B]."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, x))
    return alpha * x + sigma * noise


def q_posterior(
    x: jax.Array, z_t: jax.Array, gamma_s: jax.Array, gamma_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """q(z_s | z_t, x) for s < t (VDM appendix A): with c = 1 − exp(γ_s − γ_t) = σ²_{t|s}/σ²_t,

        mean = (α_s/α_t) ((1 − c) z_t + c α_t x),   variance = c σ²_s.

    Returns (mean [B, ...], variance [B, 1, ...])."""
    g_s, g_t = per_example(gamma_s, x), per_example(gamma_t, x)
    c = -jnp.expm1(g_s - g_t)
    a_s, _ = alpha_sigma(g_s)
    a_t, _ = alpha_sigma(g_t)
    mean = (a_s / a_t) * ((1.0 - c) * z_t + c * a_t * x)
    return mean, c * jax.nn.sigmoid(g_s)


def predict_x(z_t: jax.Array, gamma_t: jax.Array, eps: jax.Array) -> jax.Array:
    """x̂ = (z_t − σ_t ε̂)/α_t."""
    alpha, sigma = alpha_sigma(per_example(gamma_t, z_t))
    return (z_t - sigma * eps) / alpha


# ----------------------------------------------------------------------------- schedules


def gamma_linear(t: jax.Array, gamma_min: float, gamma_max: float) -> jax.Array:
    """γ(t) = γ_min + (γ_max − γ_min) t: VDM's fixed linear schedule."""
    return gamma_min + (gamma_max - gamma_min) * t


def gamma_cosine(t: jax.Array, gamma_min: float, gamma_max: float) -> jax.Array:
    """The cosine schedule α = cos(π u/2), σ = sin(π u/2), i.e. γ = 2 log tan(π u/2), with u
    running linearly over [u(γ_min), u(γ_max)], u(γ) = (2/π) atan(exp(γ/2)), as t goes 0 -> 1."""
    u0 = 2.0 / math.pi * math.atan(math.exp(gamma_min / 2))
    u1 = 2.0 / math.pi * math.atan(math.exp(gamma_max / 2))
    u = u0 + (u1 - u0) * t
    return 2.0 * jnp.log(jnp.tan(0.5 * math.pi * u))


def gamma_beta_linear(
    t: jax.Array, beta_start: float, beta_end: float, num_timesteps: int
) -> jax.Array:
    """DDPM's linear β_1 … β_T in continuous time: with i = 1 + t (T − 1) (t = 0: the chain's
    first step, t = 1: its last), −log ᾱ ≈ Σ_{j ≤ i} β_j = i β_1 + (β_T − β_1) i (i − 1)/(2 (T − 1))
    taken at real i, and γ = log((1 − ᾱ)/ᾱ) = log(expm1(−log ᾱ))."""
    n = num_timesteps
    i = 1.0 + t * (n - 1)
    neg_log_abar = i * beta_start + (beta_end - beta_start) * i * (i - 1.0) / (2.0 * (n - 1))
    return jnp.log(jnp.expm1(neg_log_abar))


def init_monotone_params(key: jax.Array, hidden: int = 1024) -> dict[str, jax.Array]:
    """Parameters of ``monotone_shape``: a linear part and a sigmoid layer of ``hidden`` units
    (VDM's noise-schedule network), initialised near the identity."""
    k2, k3 = jax.random.split(key)
    return {
        "w1": jnp.ones((), jnp.float32),
        "b1": jnp.zeros((), jnp.float32),
        "w2": jax.random.normal(k2, (hidden,), jnp.float32),
        "b2": jnp.zeros((hidden,), jnp.float32),
        "w3": jax.random.normal(k3, (hidden,), jnp.float32) / math.sqrt(hidden),
    }


def monotone_shape(params: dict[str, jax.Array], t: jax.Array) -> jax.Array:
    """VDM's monotone network (their appendix H), increasing in t for any parameters:

        h(t) = |w1| t + b1 + Σ_j |w3_j| (2 sigmoid(|w2_j| (2t − 1) + b2_j) − 1) / hidden.

    t [B] -> h [B]."""
    hidden = params["w2"].shape[0]
    u = jnp.abs(params["w2"]) * (2.0 * t[..., None] - 1.0) + params["b2"]  # [B, hidden]
    bump = jnp.sum(jnp.abs(params["w3"]) * (2.0 * jax.nn.sigmoid(u) - 1.0), axis=-1)
    return jnp.abs(params["w1"]) * t + params["b1"] + bump / hidden


def normalised_shape(params: dict[str, jax.Array], t: jax.Array) -> jax.Array:
    """s(t) = (h(t) − h(0))/(h(1) − h(0)) [B]: the monotone shape h rescaled to run 0 -> 1."""
    ends = monotone_shape(params, jnp.asarray([0.0, 1.0], t.dtype))  # [2]
    return (monotone_shape(params, t) - ends[0]) / (ends[1] - ends[0])


def gamma_learned(
    params: dict[str, jax.Array], t: jax.Array, gamma_min: jax.Array, gamma_max: jax.Array
) -> jax.Array:
    """γ(t) = γ_min + (γ_max − γ_min) s(t), s the normalised monotone shape (VDM §3.4: the
    endpoints and the shape apart)."""
    return gamma_min + (gamma_max - gamma_min) * normalised_shape(params, t)


def gamma_and_derivative(gamma_fn: GammaFn, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(γ(t), γ'(t)) [B] by forward-mode differentiation (γ acts elementwise on t)."""
    return jax.jvp(gamma_fn, (t,), (jnp.ones_like(t),))


def snr_net_time(gamma: jax.Array, gamma_min: float, gamma_max: float) -> jax.Array:
    """The time the network sees: 1000 (γ − γ_min)/(γ_max − γ_min), the configured endpoints
    (VDM's score network: a function of the noise level, so the schedule's shape between the
    endpoints changes only which levels are drawn, not what the network computes)."""
    return 1000.0 * (gamma - gamma_min) / (gamma_max - gamma_min)


# ----------------------------------------------------------------------------- the loss


def weight(name: str, lam: jax.Array, bias: float = 2.0, snr_gamma: float = 5.0) -> jax.Array:
    """w(λ) of Kingma & Gao (2023), λ = −γ the log-SNR: ``elbo`` 1 (the bound); ``sigmoid``
    sigmoid(b − λ); ``edm`` N(λ; 2.4, 2.4²)·(exp(−λ) + 0.25)/0.25 (EDM's loss, their table 1);
    ``min_snr`` min(1, γ_snr exp(−λ)), min-SNR-γ's factor (Hang et al. 2023) on the ε-MSE."""
    if name == "elbo":
        return jnp.ones_like(lam)
    if name == "sigmoid":
        return jax.nn.sigmoid(bias - lam)
    if name == "edm":
        density = jnp.exp(-0.5 * ((lam - 2.4) / 2.4) ** 2) / (2.4 * math.sqrt(2 * math.pi))
        return density * (jnp.exp(-lam) + 0.25) / 0.25
    if name == "min_snr":
        return jnp.minimum(1.0, snr_gamma * jnp.exp(-lam))
    raise ValueError(f"weighting={name!r} is not one of {WEIGHTINGS}.")


def diffusion_loss_from_gamma(
    eps_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x: jax.Array,
    gamma_t: jax.Array,
    dgamma_t: jax.Array,
    noise: jax.Array,
    w: jax.Array | None = None,
) -> jax.Array:
    """½ w(λ_t) γ'(t) ‖ε − ε̂(z_t)‖² [B] in nats (VDM eq. 17; w = 1 the bound, Kingma & Gao
    eq. 6 otherwise), z_t = α_t x + σ_t ε; ``eps_fn(z_t, γ_t)`` the network at that noise."""
    z_t = q_sample(x, gamma_t, noise)
    err = _flat_sum(jnp.square(noise - eps_fn(z_t, gamma_t)))  # [B]
    scale = dgamma_t if w is None else w * dgamma_t
    return 0.5 * scale * err


def diffusion_loss(
    model_fn: ModelFn,
    gamma_fn: GammaFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    w: jax.Array | None = None,
) -> jax.Array:
    """The continuous diffusion term ½ w γ'(t) ‖ε − ε̂(z_t, t)‖² [B] (nats) at t [B]."""
    gamma_t, dgamma_t = gamma_and_derivative(gamma_fn, t)
    return diffusion_loss_from_gamma(lambda z, g: model_fn(z, t), x, gamma_t, dgamma_t, noise, w)


def finite_diffusion_loss(
    model_fn: ModelFn,
    gamma_fn: GammaFn,
    x: jax.Array,
    t: jax.Array,
    noise: jax.Array,
    num_steps: int,
) -> jax.Array:
    """The diffusion term of T = ``num_steps`` steps (VDM eq. 11 in ε form), [B] nats:
    t_i = ceil(t T)/T, s = t_i − 1/T, ½ T (exp(γ_t − γ_s) − 1) ‖ε − ε̂(z_t, t_i)‖²; with t
    uniform on (0, 1] its expectation is the T-step chain's Σ_i KL term."""
    t_i = jnp.maximum(jnp.ceil(t * num_steps), 1.0) / num_steps
    gamma_t, gamma_s = gamma_fn(t_i), gamma_fn(t_i - 1.0 / num_steps)
    z_t = q_sample(x, gamma_t, noise)
    err = _flat_sum(jnp.square(noise - model_fn(z_t, t_i)))
    return 0.5 * num_steps * jnp.expm1(gamma_t - gamma_s) * err


def level_values(num_bins: int, dtype=jnp.float32) -> jax.Array:
    """The grey levels in model space: level k -> 2k/(num_bins − 1) − 1, [num_bins] of
    ``dtype`` (computed in it: float64 data gets float64 levels)."""
    return 2.0 * jnp.arange(num_bins, dtype=dtype) / (num_bins - 1) - 1.0


def reconstruction_loss(
    x: jax.Array, gamma_0: jax.Array, noise: jax.Array, num_bins: int
) -> jax.Array:
    """L_0 = −log p(x | z_0) [B] nats, z_0 = α_0 x + σ_0 ε, and p(x | z_0) VDM's factorised
    decoder over the ``num_bins`` levels v_k of each dimension:
    p(v_k | z_0) ∝ exp(−(z_0/α_0 − v_k)² / (2 exp(γ_0))), evaluated at the level of x."""
    z_0 = q_sample(x, gamma_0, noise)
    alpha, _ = alpha_sigma(per_example(gamma_0, x))
    v = level_values(num_bins, x.dtype)  # [K]
    logits = (
        -0.5
        * jnp.exp(-per_example(gamma_0, x))[..., None]
        * jnp.square((z_0 / alpha)[..., None] - v)
    )  # [B, ..., K]
    index = jnp.round((x + 1.0) * (num_bins - 1) / 2.0).astype(jnp.int32)  # [B, ...]
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp_x = jnp.take_along_axis(logp, index[..., None], axis=-1)[..., 0]
    return -_flat_sum(logp_x)


def prior_loss(x: jax.Array, gamma_1: jax.Array) -> jax.Array:
    """L_1 = KL(q(z_1 | x) ‖ N(0, I)) = ½ Σ (σ²_1 + α²_1 x² − log σ²_1 − 1) [B] nats."""
    g = per_example(gamma_1, x)
    var = jax.nn.sigmoid(g)
    kl = 0.5 * (var + jax.nn.sigmoid(-g) * jnp.square(x) - jax.nn.log_sigmoid(g) - 1.0)
    return _flat_sum(kl)


def bound_terms(
    model_fn: ModelFn,
    gamma_fn: GammaFn,
    x: jax.Array,
    key: jax.Array,
    num_bins: int,
    num_t: int = 1,
    num_steps: int = 0,
) -> dict[str, jax.Array]:
    """Per-example terms of the bound, in bits/dim [B]: ``decoder`` L_0, ``diffusion``
    (continuous, ``num_steps`` = 0; else the T-step chain's), ``prior`` L_1, and ``total``.

    The diffusion term is an unbiased estimate from ``num_t`` = K stratified t per example
    (t_k = (k + u_k)/K, independent u_k ~ U(0, 1) and noise for each), one network call each,
    scanned; L_0 and L_1 take one noise draw (L_1 is exact)."""
    b = x.shape[0]
    gamma_ends = gamma_fn(jnp.asarray([0.0, 1.0], x.dtype))
    k_dec, k_t, k_noise = jax.random.split(key, 3)
    decoder = reconstruction_loss(
        x, jnp.full((b,), gamma_ends[0]), jax.random.normal(k_dec, x.shape, x.dtype), num_bins
    )
    prior = prior_loss(x, jnp.full((b,), gamma_ends[1]))

    def one(carry, k):
        u = jax.random.uniform(jax.random.fold_in(k_t, k), (b,), x.dtype)
        t = (k + u) / num_t  # [B] in stratum k
        noise = jax.random.normal(jax.random.fold_in(k_noise, k), x.shape, x.dtype)
        if num_steps:
            term = finite_diffusion_loss(model_fn, gamma_fn, x, t, noise, num_steps)
        else:
            term = diffusion_loss(model_fn, gamma_fn, x, t, noise)
        return carry + term / num_t, None

    diff, _ = jax.lax.scan(one, jnp.zeros((b,), x.dtype), jnp.arange(num_t))
    scale = bits_per_dim_scale(x)
    out = {"decoder": decoder * scale, "diffusion": diff * scale, "prior": prior * scale}
    out["total"] = out["decoder"] + out["diffusion"] + out["prior"]
    return out


def variance_gradient(
    loss_fn: Callable[[Any, jax.Array, jax.Array], jax.Array],
) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
    """``loss_fn(rest, a, b) -> L [B]`` whose gradient with respect to the per-example inputs
    a, b [B] is that of the batch's Σ (L − L̄)² (the cotangent scaled by 2 (L − L̄)), and with
    respect to ``rest`` that of Σ L: VDM §4's variance-minimising update of the noise schedule
    (a, b its normalised shape and derivative at the batch's t; the bound itself does not depend
    on the shape), in the same single backward pass as the network's gradient."""

    @jax.custom_vjp
    def f(rest, a, b):
        return loss_fn(rest, a, b)

    def fwd(rest, a, b):
        value, vjp = jax.vjp(loss_fn, rest, a, b)
        return value, (value, vjp)

    def bwd(res, g):
        value, vjp = res
        g_rest, g_a, g_b = vjp(g)
        centred = 2.0 * (value - jnp.mean(value))
        return g_rest, g_a * centred, g_b * centred

    f.defvjp(fwd, bwd)
    return f


# ----------------------------------------------------------------------------- the process


class ContinuousProcess:
    """Continuous time under ``gamma_fn`` as ``samplers.Process``, t in [0, 1]: alpha, sigma
    from γ(t) (``alpha_sigma``), the half log-SNR λ = −γ/2, an ε-predicting ``model_fn(z_t,
    t)``. Its chain of N steps runs from t = 1 to 0 on the uniform grid t_i = (N − i)/N, step i's
    noise from fold_in(key, i), p(z_s | z_t) = q(z_s | z_t, x = x̂(z_t)) (VDM eq. 34); its
    solvers visit the same grid; a chain that ends at t = 0 returns z_0/α_0 (``finish``). There
    is no learned variance."""

    t_min, t_max = 0.0, 1.0

    def __init__(self, gamma_fn: GammaFn, num_steps: int = 0):
        self.gamma_fn = gamma_fn
        self.num_steps = num_steps

    def _gamma(self, t: jax.Array) -> jax.Array:
        """γ(t) of any shape (gamma_fn takes [B])."""
        t = jnp.asarray(t, jnp.result_type(float))  # float32, or float64 under x64
        return self.gamma_fn(t.reshape(-1)).reshape(t.shape)

    def denoise(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, clip_denoised: bool):
        gamma_t = self.gamma_fn(t)
        eps = model_fn(x, t)
        x_hat = predict_x(x, gamma_t, eps)
        if clip_denoised:
            x_hat = jnp.clip(x_hat, -1.0, 1.0)
            alpha, sigma = alpha_sigma(per_example(gamma_t, x))
            eps = (x - alpha * x_hat) / sigma
        return samplers.Prediction(eps, x_hat)

    def chain(self, num_steps: int) -> ContinuousProcess:
        return ContinuousProcess(self.gamma_fn, num_steps)

    def chain_length(self) -> int:
        return self.num_steps

    def chain_step(self, i: jax.Array, x: jax.Array) -> samplers.ChainStep:
        """Step i from t = (N − i)/N to s = t − 1/N."""
        n = self.num_steps
        t = (n - i).astype(x.dtype) / n  # the data's precision
        tb = jnp.full(x.shape[:1], t, x.dtype)  # [B]
        sb = jnp.full(x.shape[:1], t - 1.0 / n, x.dtype)
        g_t, g_s = per_example(self.gamma_fn(tb), x), per_example(self.gamma_fn(sb), x)
        variance = -jnp.expm1(g_s - g_t) * jax.nn.sigmoid(g_s)  # c σ²_s (``q_posterior``)
        return samplers.ChainStep(tb, sb, i, jax.nn.sigmoid(-g_s), variance)

    def reverse(self, step: samplers.ChainStep, pred: samplers.Prediction, x: jax.Array):
        mean, var = q_posterior(pred.x0, x, self.gamma_fn(step.s), self.gamma_fn(step.t))
        return mean, jnp.sqrt(var)

    def solver_grid(self, num_steps: int) -> samplers.SolverGrid:
        """Calls at t_i = (N − i)/N, i < N, landing at t = 0."""
        t = (num_steps - jnp.arange(num_steps)).astype(jnp.result_type(float)) / num_steps
        return samplers.SolverGrid(t, -0.5 * self._gamma(t), -0.5 * self._gamma(0.0))

    def sigma_ve(self, t: jax.Array) -> jax.Array:
        """σ/α = exp(γ/2)."""
        return jnp.exp(0.5 * self._gamma(t))

    def t_from_sigma_ve(self, sigma: jax.Array, iterations: int = 40) -> jax.Array:
        """t with γ(t) = 2 log σ (γ increasing), by bisection on [0, 1]; clamped there."""
        target = 2.0 * jnp.log(jnp.asarray(sigma, jnp.result_type(float)))
        lo, hi = jnp.zeros_like(target), jnp.ones_like(target)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = self._gamma(mid) < target
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, iterations, halve, (lo, hi))
        return 0.5 * (lo + hi)

    def finish(self, z_0: jax.Array) -> jax.Array:
        """The chain's image: z_0/α_0 clipped to [−1, 1] (the level nearest to it is the mode
        of VDM's decoder p(x | z_0))."""
        gamma_0 = self.gamma_fn(jnp.zeros((z_0.shape[0],), z_0.dtype))
        alpha, _ = alpha_sigma(per_example(gamma_0, z_0))
        return jnp.clip(z_0 / alpha, -1.0, 1.0)
