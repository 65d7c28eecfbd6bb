"""The probability-flow ODE of a trained discrete-time DDPM: its fast samplers, DDIM inversion
and likelihoods by the instantaneous change of variables.

The chain is read in real time t in [0, T-1] (``diffusion.DiscreteProcess``; Lu et al. 2022,
"DPM-Solver", appendix on discrete-time models): log abar(t) interpolated linearly between the
integer steps, alpha(t) = sqrt(abar(t)), sigma(t) = sqrt(1 - abar(t)), the half log-SNR
lambda(t) = log(alpha / sigma) and the VE noise level sigma_ve(t) = sigma / alpha =
exp(-lambda); every map between t, lambda and sigma_ve is exact and monotone
(``diffusion.lambda_from_t`` etc., importable from here too). Between integer steps the network
is called at fractional t.

With x_t = alpha x0 + sigma eps and eps_hat(x, t) = E[eps | x_t = x], the probability-flow ODE
(Song et al. 2021) reads, in the variables used here (the same path, parametrised differently):

  y = x / alpha, s = sigma_ve:  dy/ds = eps_hat = (y - D(y; s)) / s   (D = x0_hat, EDM's form),
  u = log s = -lambda:          dx/du = sigma eps_hat - sigma^2 x.

The solvers (DPM-Solver++(2M) and its SDE, Heun) are written once in ``samplers``, for every
process; ``dpmpp_2m_sample``, ``dpmpp_2m_sde_sample`` and ``heun_sample`` here run them on a
GaussianDiffusion ``d`` from x_T at t = T-1 to t = 0 and return the x0 prediction there, the
end point of ``diffusion.ddim_sample_loop``.

Everything here is pure JAX (no Flax), jit-able; ``model_fn(x_t, t) -> output`` as in
``diffusion`` (eps, x0 or v per ``d.mean_type``; a learned variance's half is ignored).
"""

import math
import numbers
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, likelihood, samplers
from diffusion_jax.diffusion import (  # the real-time maps, importable here too
    alpha_sigma,
    eps_and_x0,
    lambda_from_t,
    log_alpha_cumprod,
    model_time,
    sigma_from_t,
    t_from_lambda,
    t_from_sigma,
)

__all__ = [
    "PROBES",
    "TRACES",
    "alpha_sigma",
    "ddim_invert",
    "dequantized_bpd",
    "dpmpp_2m_sample",
    "dpmpp_2m_sde_sample",
    "eps_and_x0",
    "exact_divergence",
    "heun_sample",
    "hutchinson_divergence",
    "lambda_from_t",
    "log_alpha_cumprod",
    "model_time",
    "ode_bpd",
    "ode_log_likelihood",
    "pf_ode_drift",
    "sigma_from_t",
    "standard_normal_logpdf",
    "t_from_lambda",
    "t_from_sigma",
]

ModelFn = diffusion.ModelFn
TRACES = ("hutchinson", "exact")  # how ode_log_likelihood computes tr(df/dx)
PROBES = ("rademacher", "gaussian")  # Hutchinson's probe distributions
# Vector-field evaluations of diffrax's Dopri5: 6 per attempted step (accepted or rejected; the
# last stage is the next step's first) and 1 at the start; the first step is (u1 - u0) / 64.
_DOPRI5_EVALS_PER_STEP, _DOPRI5_EXTRA_EVALS, _FIRST_STEP_FRACTION = 6, 1, 1.0 / 64


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; allowed: {list(allowed)}.")


# ----------------------------------------------------------------------------------------------
# The equations


def pf_ode_drift(x: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """The probability-flow ODE in u = log(sigma / alpha) = -lambda (Song et al. 2021, VP form
    dx/dt = -beta(t)/2 (x + grad log q_t) with grad log q_t = -eps / sigma, divided by
    du/dt = -dlambda/dt = beta(t) / (2 sigma^2)):

      dx/du = sigma eps_hat(x, t(u)) - sigma^2 x,  sigma^2 = sigmoid(2u).
    """
    return sigma * eps - jnp.square(sigma) * x


def hutchinson_divergence(
    f: Callable[[jax.Array], jax.Array], x: jax.Array, probe: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(f(x), tr(df/dx) estimate [B]) = (f(x), v^T (df/dx) v) with E[v v^T] = I (Hutchinson
    1989), one jvp; f maps each example on its own, x [B, ...], probe v [B, ...]."""
    fx, jv = jax.jvp(f, (x,), (probe,))
    return fx, likelihood.sum_flat(probe * jv)


def exact_divergence(
    f: Callable[[jax.Array], jax.Array], x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(f(x), tr(df/dx) [B]) = (f(x), sum_k e_k^T (df/dx) e_k): one linearisation and n = prod(
    x.shape[1:]) jvps (vmapped); f maps each example on its own. For small n."""
    n = math.prod(x.shape[1:])
    fx, f_lin = jax.linearize(f, x)
    basis = jnp.broadcast_to(jnp.eye(n, dtype=x.dtype)[:, None, :], (n, x.shape[0], n))
    cols = jax.vmap(f_lin)(basis.reshape((n,) + x.shape))  # [n, B, ...]: J e_k
    return fx, jnp.einsum("kbk->b", cols.reshape(n, x.shape[0], n))


def standard_normal_logpdf(x: jax.Array) -> jax.Array:
    """log N(x; 0, I) = -n/2 log(2 pi) - |x|^2 / 2 in nats per example [B], x [B, ...],
    n = prod(x.shape[1:])."""
    n = math.prod(x.shape[1:])
    return -0.5 * n * math.log(2.0 * math.pi) - 0.5 * likelihood.sum_flat(jnp.square(x))


def dequantized_bpd(logp: jax.Array, num_dims: int, num_bins: int) -> jax.Array:
    """Bits/dim of discrete data from the density at its uniformly dequantized point:

      -log P(x0) <= E_u[-log p(x0 + u)] - n log(2 delta),  u ~ U(-delta, delta)^n,
      delta = 1 / (num_bins - 1),  bpd = (-log p - n log(2 delta)) / (n ln 2)

    (Jensen; bins of width 2 delta around the levels of the [-1, 1] grid)."""
    log_bin_width = math.log(2.0 / (num_bins - 1))
    return (-logp - num_dims * log_bin_width) / (num_dims * math.log(2.0))


# ----------------------------------------------------------------------------------------------
# The solvers of ``samplers`` on a GaussianDiffusion


def dpmpp_2m_sample(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    clip_denoised: bool = True,
    lower_order_final: bool = False,
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022b; ``samplers.dpmpp_2m_sample``) from x_T at t = T-1
    to t = 0 in ``num_steps`` = M network calls uniform in lambda; returns x0 [B, ...]. Step 0
    is first order (DDIM); the last, from t = 0 to sigma = 0, returns the x0 prediction at
    t = 0. M = 1 returns x0_hat(x_T, T-1)."""
    process = diffusion.DiscreteProcess(d)
    return samplers.dpmpp_2m_sample(
        process, model_fn, x_T, num_steps, clip_denoised, lower_order_final=lower_order_final
    )


def dpmpp_2m_sde_sample(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    key: jax.Array,
    num_steps: int,
    eta: float = 1.0,
    clip_denoised: bool = True,
    lower_order_final: bool = False,
) -> jax.Array:
    """DPM-Solver++(2M) SDE: the steps of ``dpmpp_2m_sample`` with noise of scale ``eta`` (1:
    k-diffusion's default; 0: the ODE solver) at every step but the last, step i's from
    fold_in(key, i); returns x0 [B, ...]. Needs M >= 2 network calls to add any noise."""
    return samplers.dpmpp_2m_sample(
        diffusion.DiscreteProcess(d),
        model_fn,
        x_T,
        num_steps,
        clip_denoised,
        eta,
        lower_order_final,
        key,
    )


def heun_sample(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Heun's method on the EDM noise levels (``samplers.heun_sample``) from x_T at t = T-1 to
    the x0 prediction at t = 0, in ``num_steps`` network calls; returns x0 [B, ...]."""
    process = diffusion.DiscreteProcess(d)
    return samplers.heun_sample(process, model_fn, x_T, num_steps, rho, clip_denoised)


# ----------------------------------------------------------------------------------------------
# DDIM inversion


def ddim_invert(
    d: diffusion.GaussianDiffusion, model_fn: ModelFn, x0: jax.Array, num_steps: int
) -> jax.Array:
    """Deterministic DDIM inversion x0 -> x_T over ``ddim_sample_loop``'s ``num_steps`` respaced
    steps t_0 = 0 < ... < t_{K-1} = T-1, run forwards in one ``lax.scan``; K network calls.

    Step k (t_{k-1} -> t_k, abar_{t_{-1}} = 1 at the data) is DDIM's eta = 0 update read
    backwards, an explicit Euler step of dy/ds = eps_hat in y = x / alpha, s = sigma / alpha:

      x0_hat = (x - sqrt(1 - abar_{k-1}) eps_hat) / sqrt(abar_{k-1}),
      x_k = sqrt(abar_k) x0_hat + sqrt(1 - abar_k) eps_hat,

    with eps_hat = eps_theta(x_{t_{k-1}}, t_{k-1}); at k = 0, where the data has no noise level,
    eps_theta(sqrt(abar_{t_0}) x0, t_0). So ``ddim_sample_loop(d, f, x0.shape, key, num_steps,
    x_T=ddim_invert(d, f, x0, num_steps), clip_denoised=False)`` gives x0 back up to O(1/K).
    """
    dr = diffusion.maybe_respace(d, num_steps)

    def body(x, k):
        t_in = jnp.full(x.shape[:1], jnp.maximum(k - 1, 0), jnp.int32)  # [B]
        x_in = jnp.where(k == 0, dr.sqrt_alphas_cumprod[0].astype(x.dtype) * x, x)
        eps = diffusion.p_mean_variance(dr, model_fn, x_in, t_in, False)["pred_eps"]
        abar_prev, abar = dr.alphas_cumprod_prev[k], dr.alphas_cumprod[k]
        x0_hat = (x - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
        return (jnp.sqrt(abar) * x0_hat + jnp.sqrt(1.0 - abar) * eps).astype(x.dtype), None

    return jax.lax.scan(body, x0, jnp.arange(dr.num_timesteps, dtype=jnp.int32))[0]


# ----------------------------------------------------------------------------------------------
# Likelihood


def _probe(key: jax.Array, shape: tuple[int, ...], dtype, probe: str) -> jax.Array:
    """A Hutchinson probe [B, ...] with E[v v^T] = I: Rademacher (+-1) or N(0, I)."""
    if probe == "rademacher":
        return jax.random.rademacher(key, shape, jnp.float32).astype(dtype)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def ode_log_likelihood(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x: jax.Array,
    key: jax.Array,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    max_steps: int = 4096,
) -> tuple[jax.Array, jax.Array]:
    """log p_0(x) [B] in nats of the probability-flow ODE's continuous density at t = 0 (the
    smallest step; x is taken as the state there), and the number of network evaluations.

    Instantaneous change of variables (Song et al. 2021; Chen et al. 2018): along the ODE
    dx/du = f(x, u) (``pf_ode_drift``, u = log sigma_ve from u(t=0) to u(T-1), the path t = 0 ->
    T-1; the network is called at fractional t = t_from_lambda(-u)),

      log p_0(x(u_0)) = log N(x(u_1); 0, I) + int_{u_0}^{u_1} tr(df/dx(x(u), u)) du,

    solved jointly for (x, the integral) by diffrax's Dopri5 with a PIDController(rtol, atol)
    (one step size for the batch). ``trace``: ``hutchinson`` (v^T (df/dx) v, one jvp, with one
    ``probe`` v per example drawn from ``key`` and kept for the whole path: unbiased up to the
    solver's tolerance) or ``exact`` (prod(x.shape[1:]) jvps; small data only). The prior
    N(0, I) stands for q(x_{T-1}).

    The evaluation count is that of the drift f (each one network call, with its jvp(s)):
    6 per attempted step (Dopri5, first same as last) plus 1 at the start.
    Returns (logp [B], nfe int32 scalar).
    """
    _check_choice("trace", trace, TRACES)
    _check_choice("probe", probe, PROBES)
    dtype = x.dtype
    u0 = -lambda_from_t(d, 0).astype(dtype)
    u1 = -lambda_from_t(d, d.num_timesteps - 1).astype(dtype)
    v = _probe(key, x.shape, dtype, probe) if trace == "hutchinson" else None

    def vector_field(u, state, args):
        del args
        x, _ = state  # [B, ...], [B]
        sigma = jnp.sqrt(jax.nn.sigmoid(2.0 * u))  # sigma(t(u))
        t_u = t_from_lambda(d, -u)
        t = jnp.full(x.shape[:1], t_u, jnp.result_type(t_u))  # [B]

        def f(x):
            eps, _ = eps_and_x0(d, model_fn, x, t)
            return pf_ode_drift(x, eps, sigma)

        fx, div = exact_divergence(f, x) if v is None else hutchinson_divergence(f, x, v)
        return fx, div

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vector_field),
        diffrax.Dopri5(),
        t0=u0,
        t1=u1,
        dt0=(u1 - u0) * _FIRST_STEP_FRACTION,
        y0=(x, jnp.zeros(x.shape[:1], dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=max_steps,
    )
    x_T, integral = sol.ys[0][-1], sol.ys[1][-1]  # [B, ...], [B]
    nfe = _DOPRI5_EVALS_PER_STEP * sol.stats["num_steps"] + _DOPRI5_EXTRA_EVALS
    return standard_normal_logpdf(x_T) + integral, jnp.asarray(nfe, jnp.int32)


def ode_bpd(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x0: jax.Array,
    key: jax.Array,
    num_bins: int = 256,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    trace: str = "hutchinson",
    probe: str = "rademacher",
    max_steps: int = 4096,
) -> dict[str, jax.Array]:
    """Bits/dim of discrete data x0 [B, ...] (levels 2k/(num_bins-1) - 1) under the
    probability-flow ODE: ``ode_log_likelihood`` at x0 + u, u ~ U(-delta, delta) per dimension
    (delta = 1/(num_bins - 1), the bins of ``likelihood.discretized_gaussian_log_likelihood``),
    plus the dequantization's log-volume (``dequantized_bpd``): an upper bound on the discrete
    data's bits/dim in expectation over u (and the Hutchinson probe). ``key`` gives u and the
    probe. Returns dict(bpd [B], nfe int32 scalar).
    """
    if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}.")
    key_u, key_probe = jax.random.split(key)
    delta = 1.0 / (num_bins - 1)
    u = jax.random.uniform(key_u, x0.shape, jnp.float32, -delta, delta).astype(x0.dtype)
    logp, nfe = ode_log_likelihood(
        d, model_fn, x0 + u, key_probe, rtol, atol, trace, probe, max_steps
    )
    return dict(bpd=dequantized_bpd(logp, math.prod(x0.shape[1:]), num_bins), nfe=nfe)
