"""The DDPM chain as a ``samplers.Process``: real time t in [0, T-1] (Lu et al. 2022, DPM-Solver, on
discrete-time models: log abar interpolated linearly between the integer steps), the network's
prediction at integer and real t, ``DiscreteProcess``, and the chain's whole-loop samplers
(``p_sample``, ``p_sample_loop``, ``ddim_sample_loop``) over ``samplers``."""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffusion_jax import samplers
from diffusion_jax.discrete.process import (
    GaussianDiffusion,
    ModelFn,
    _at,
    _model_log_variance,
    _pred_x0_eps,
    _split_output,
    maybe_respace,
    predict_eps_from_x0,
    q_posterior_mean_variance,
)
from diffusion_jax.samplers import per_example

__all__ = [
    "DiscreteProcess",
    "alpha_sigma",
    "chain_keys",
    "ddim_sample_loop",
    "eps_and_x0",
    "lambda_from_t",
    "log_alpha_cumprod",
    "model_time",
    "p_sample",
    "p_sample_loop",
    "sigma_from_t",
    "t_from_lambda",
    "t_from_sigma",
]

# ----------------------------------------------------------------------------------------------
# Real time: the chain read as a process in t in [0, T-1] (Lu et al. 2022, DPM-Solver, on
# discrete-time models): log abar interpolated linearly between the integer steps


def _log_abar_table(d: GaussianDiffusion) -> jax.Array:
    """log abar_t at the integer steps [T], from whichever of abar, 1 - abar is accurate."""
    omab = jnp.square(d.sqrt_one_minus_alphas_cumprod)  # [T]
    return jnp.where(d.alphas_cumprod > 0.5, jnp.log1p(-omab), jnp.log(d.alphas_cumprod))


def _interp_steps(t: jax.Array, table: jax.Array) -> jax.Array:
    """table (at t = 0, ..., T-1) linearly interpolated at real t, clamped to [0, T-1]; any
    shape. Indexes floor(t) directly (no search: cheap inside compiled loops)."""
    t = jnp.clip(t, 0, table.shape[0] - 1)
    k = jnp.clip(jnp.floor(t), 0, max(table.shape[0] - 2, 0)).astype(jnp.int32)
    w = t - k
    return (1 - w) * table[k] + w * table[jnp.minimum(k + 1, table.shape[0] - 1)]


def _t_of_log_abar(d: GaussianDiffusion, g: jax.Array) -> jax.Array:
    """The inverse of ``log_alpha_cumprod``: real t in [0, T-1] where the interpolated
    (decreasing) log abar equals g (clamped at the ends); any shape."""
    table = _log_abar_table(d)[::-1]  # [T], increasing: log abar_{T-1}, ..., log abar_0
    num = table.shape[0]
    if num == 1:
        return jnp.zeros_like(g)
    g = jnp.clip(g, table[0], table[-1])
    j = jnp.clip(jnp.searchsorted(table, g, side="right", method="compare_all"), 1, num - 1)
    w = (g - table[j - 1]) / (table[j] - table[j - 1])  # [0, 1] from table[j - 1] to table[j]
    return (num - j - w).astype(table.dtype)  # reversed index j - 1 is t = num - j


def log_alpha_cumprod(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """log abar(t) = (1 - w) log abar_k + w log abar_{k+1}, k = floor(t), w = t - k, for real
    t in [0, T-1] (clamped there); any shape."""
    return _interp_steps(jnp.asarray(t, d.alphas_cumprod.dtype), _log_abar_table(d))


def alpha_sigma(d: GaussianDiffusion, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) = (sqrt(abar(t)), sqrt(1 - abar(t))), 1 - abar = -expm1(log abar)."""
    g = log_alpha_cumprod(d, t)
    return jnp.exp(0.5 * g), jnp.sqrt(-jnp.expm1(g))


def lambda_from_t(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """Half log-SNR lambda(t) = log(alpha / sigma) = (log abar - log(1 - abar)) / 2."""
    g = log_alpha_cumprod(d, t)
    return 0.5 * (g - jnp.log(-jnp.expm1(g)))


def t_from_lambda(d: GaussianDiffusion, lam: jax.Array) -> jax.Array:
    """The inverse of ``lambda_from_t``: log abar = log sigmoid(2 lambda), then t by inverse
    interpolation of the (decreasing) log abar_t table; clamped to [0, T-1]."""
    return _t_of_log_abar(d, jax.nn.log_sigmoid(2.0 * jnp.asarray(lam, d.alphas_cumprod.dtype)))


def sigma_from_t(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """VE noise level sigma_ve(t) = sigma / alpha = sqrt(1 / abar - 1) = exp(-lambda(t))."""
    return jnp.sqrt(jnp.expm1(-log_alpha_cumprod(d, t)))


def t_from_sigma(d: GaussianDiffusion, sigma: jax.Array) -> jax.Array:
    """The inverse of ``sigma_from_t``: log abar = -log(1 + sigma_ve^2), then t as in
    ``t_from_lambda``; clamped to [0, T-1]."""
    return _t_of_log_abar(d, -jnp.log1p(jnp.square(jnp.asarray(sigma, d.alphas_cumprod.dtype))))


def model_time(d: GaussianDiffusion, t: jax.Array) -> jax.Array:
    """The time the network is called with at real step t: ``timestep_map`` interpolated
    linearly (t itself for a schedule that is not respaced)."""
    t = jnp.asarray(t, d.alphas_cumprod.dtype)
    return _interp_steps(t, d.timestep_map.astype(t.dtype))


def eps_and_x0(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x: jax.Array,
    t: jax.Array,
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """(eps_hat, x0_hat), each [B, ...], from one network call at real t [B], with
    x = alpha x0 + sigma eps: eps-prediction x0 = (x - sigma eps) / alpha; x0-prediction
    eps = (x - alpha x0) / sigma; v-prediction x0 = alpha x - sigma v, eps = sigma x + alpha v.
    ``clip_denoised`` clips x0_hat to [-1, 1] and recomputes eps_hat from it."""
    out = model_fn(x, model_time(d, t))
    mean_out, _ = _split_output(d, out, x)  # a learned variance is not used here
    alpha, sigma = (per_example(v.astype(x.dtype), x) for v in alpha_sigma(d, t))
    if d.mean_type == "eps":
        eps, x0 = mean_out, (x - sigma * mean_out) / alpha
    elif d.mean_type == "x0":
        eps, x0 = (x - alpha * mean_out) / sigma, mean_out
    else:
        eps, x0 = sigma * x + alpha * mean_out, alpha * x - sigma * mean_out
    if clip_denoised:
        x0 = jnp.clip(x0, -1.0, 1.0)
        eps = (x - alpha * x0) / sigma
    return eps, x0


# ----------------------------------------------------------------------------------------------
# The process interface of ``samplers`` and the chain's samplers


class DiscreteProcess:
    """The DDPM chain of ``d`` as ``samplers.Process``: at an integer step t (int32 [B]) the
    tables of ``d`` (respaced or not), at real t in [0, T-1] (float) the interpolation above.
    Its chain is the reverse chain t = K-1, ..., 0 of ``d.chain(K)`` (``maybe_respace``), step
    i at t = K-1-i, its noise from fold_in(key, t) (Ho et al.'s loop); p(x_{t-1} | x_t) has the
    variance of ``d.var_type``; its solvers run from t = T-1 to t = 0 and end at sigma = 0."""

    def __init__(self, d: GaussianDiffusion):
        self.d = d
        self.t_min, self.t_max = 0.0, float(d.num_timesteps - 1)

    def denoise(
        self, model_fn: ModelFn, x: jax.Array, t: jax.Array, clip_denoised: bool
    ) -> samplers.Prediction:
        if jnp.issubdtype(t.dtype, jnp.integer):  # the tables
            out = model_fn(x, self.d.timestep_map[t])
            mean_out, v = _split_output(self.d, out, x)
            x0, eps = _pred_x0_eps(self.d, mean_out, x, t)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
                eps = predict_eps_from_x0(self.d, x, t, x0)
            return samplers.Prediction(eps, x0, v)
        eps, x0 = eps_and_x0(self.d, model_fn, x, t, clip_denoised)
        return samplers.Prediction(eps, x0)

    def chain(self, num_steps: int) -> DiscreteProcess:
        return DiscreteProcess(maybe_respace(self.d, num_steps or None))

    def chain_length(self) -> int:
        return self.d.num_timesteps

    def step_at(self, t: jax.Array, x: jax.Array) -> samplers.ChainStep:
        """The chain's step from t to t - 1 (t int32 [B])."""
        d = self.d
        return samplers.ChainStep(
            t, t - 1, t[0], _at(d.alphas_cumprod_prev, t, x), _at(d.posterior_variance, t, x)
        )

    def chain_step(self, i: jax.Array, x: jax.Array) -> samplers.ChainStep:
        t = jnp.full(x.shape[:1], self.d.num_timesteps - 1 - i, jnp.int32)  # [B]
        return self.step_at(t, x)

    def reverse(
        self, step: samplers.ChainStep, pred: samplers.Prediction, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """p(x_{t-1} | x_t) = N(mu~_t(x0_hat, x_t), sigma_t^2), no noise at t = 0."""
        mean, _, _ = q_posterior_mean_variance(self.d, pred.x0, x, step.t)
        log_variance = _model_log_variance(self.d, step.t, x, pred.var)
        nonzero = per_example((step.t != 0).astype(x.dtype), x)  # [B, 1, ...]
        return mean, nonzero * jnp.exp(0.5 * log_variance)

    def solver_grid(self, num_steps: int) -> samplers.SolverGrid:
        """``num_steps`` calls uniform in lambda from t = T-1 to t = 0 (Lu et al.'s advice for
        few steps), then the step to sigma = 0."""
        _check_num_steps(num_steps)
        d = self.d
        lam = jnp.linspace(lambda_from_t(d, d.num_timesteps - 1), lambda_from_t(d, 0), num_steps)
        t = t_from_lambda(d, lam).at[-1].set(0.0).at[0].set(d.num_timesteps - 1)
        return samplers.SolverGrid(t, lam, None)

    def sigma_ve(self, t: jax.Array) -> jax.Array:
        return sigma_from_t(self.d, t)

    def t_from_sigma_ve(self, sigma: jax.Array) -> jax.Array:
        return t_from_sigma(self.d, sigma)

    def finish(self, x: jax.Array) -> jax.Array:
        return x


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps (network calls) must be an int >= 1, got {num_steps!r}.")


def p_sample(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    x_t: jax.Array,
    t: jax.Array,
    key: jax.Array,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I), with no noise where t == 0
    (``samplers.ancestral_update``). Returns dict(sample, pred_x0), each [B, ...].
    """
    process = DiscreteProcess(d)
    step = process.step_at(t, x_t)
    sample, pred_x0 = samplers.ancestral_update(process, model_fn, x_t, step, key, clip_denoised)
    return dict(sample=sample, pred_x0=pred_x0)


def chain_keys(key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(key of x_T, key of the steps) of ``p_sample_loop`` / ``ddim_sample_loop``."""
    key_T, key_steps = jax.random.split(key)
    return key_T, key_steps


def _chain(
    d: GaussianDiffusion, model_fn: ModelFn, key_steps: jax.Array, num_steps, clip, eta=None
) -> tuple[DiscreteProcess, Callable]:
    """The process of the (respaced) chain and its step: ancestral (eta None) or DDIM."""
    process = DiscreteProcess(d).chain(num_steps)
    if eta is None:
        update = functools.partial(samplers.ancestral_update, process, model_fn, clip_denoised=clip)
    else:
        update = functools.partial(
            samplers.ddim_update, process, model_fn, eta=eta, clip_denoised=clip
        )
    return process, samplers.chain_step_fn(process, update, key_steps)


def p_sample_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    x_T: jax.Array | None = None,
    num_steps: int | None = None,
    clip_denoised: bool = True,
    pred_x0_every: int = 0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t), in one ``lax.scan``.

    ``num_steps`` < T respaces the chain (``space_timesteps`` / ``respace``; the model still sees
    the original t). The last step adds no noise. With ``pred_x0_every`` = k > 0, also returns
    the x0_hat of every k-th step (steps t with t % k == 0, from the noisiest to t = 0):
    (x0 [B, ...], snapshots [ceil(K/k), B, ...]).
    """
    key_T, key_steps = chain_keys(key)
    process, step = _chain(d, model_fn, key_steps, num_steps, clip_denoised)
    x = samplers.normal(key_T, shape, d.betas.dtype) if x_T is None else x_T
    return samplers.chain_sample(process, step, x, pred_x0_every)


def ddim_sample_loop(
    d: GaussianDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    key: jax.Array,
    num_steps: int,
    eta: float = 0.0,
    x_T: jax.Array | None = None,
    clip_denoised: bool = True,
) -> jax.Array:
    """DDIM (Song et al. 2021, ``samplers.ddim_update``) over ``num_steps`` evenly spaced
    steps, in one ``lax.scan``; abar = 1 after the last step, so it adds no noise there.
    eta = 0 is deterministic; eta = 1 with all T steps is ancestral sampling with the fixedsmall
    variance. The model's variance output (if any) is ignored.
    """
    key_T, key_steps = chain_keys(key)
    process, step = _chain(d, model_fn, key_steps, num_steps, clip_denoised, eta)
    x = samplers.normal(key_T, shape, d.betas.dtype) if x_T is None else x_T
    return samplers.chain_sample(process, step, x)
