"""The probability-flow ODE of a trained discrete-time DDPM: fast samplers, DDIM inversion and
likelihoods by the instantaneous change of variables.

Continuous time (Lu et al. 2022, "DPM-Solver", appendix on discrete-time models): log abar(t) is
the piecewise-linear interpolation of log abar_t between the integer steps t = 0, ..., T-1 (t = 0
is the paper's t = 1), for real t in [0, T-1]; then alpha(t) = sqrt(abar(t)),
sigma(t) = sqrt(1 - abar(t)), the half log-SNR lambda(t) = log(alpha / sigma) and the VE noise
level sigma_ve(t) = sigma / alpha = exp(-lambda). Every map between t, lambda and sigma_ve is
exact (and monotone): lambda -> t inverts the interpolation of log abar. Between integer steps
the network is called at fractional t (a float array [B]; its sinusoidal embedding accepts any
real t); for a respaced schedule at the linear interpolation of ``timestep_map``.

With x_t = alpha x0 + sigma eps and eps_hat(x, t) = E[eps | x_t = x], the probability-flow ODE
(Song et al. 2021) reads, in the variables used here (the same path, parametrised differently):

  y = x / alpha, s = sigma_ve:  dy/ds = eps_hat = (y - D(y; s)) / s   (D = x0_hat, EDM's form),
  u = log s = -lambda:          dx/du = sigma eps_hat - sigma^2 x.

Every sampler runs the ODE from t = T-1 (x_T, the chain's prior sample) to t = 0 (the smallest
noise level of the schedule, sigma_ve = sqrt(1/abar_0 - 1)) and returns the x0 prediction there,
D(x; t = 0): the same end point as ``diffusion.ddim_sample_loop``, whose last step goes to
abar = 1. Samplers run in one ``lax.scan``; each also has a segment API for the product's
sampler registry (``*_init`` / ``*_steps``) whose segments rebuild the whole loop.

Everything here is pure JAX (no Flax), jit-able; ``model_fn(x_t, t) -> output`` as in
``diffusion`` (eps, x0 or v per ``d.mean_type``; a learned variance's half is ignored).
"""

import math
import numbers
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, likelihood

ModelFn = diffusion.ModelFn
TRACES = ("hutchinson", "exact")  # how ode_log_likelihood computes tr(df/dx)
PROBES = ("rademacher", "gaussian")  # Hutchinson's probe distributions
# Vector-field evaluations of diffrax's Dopri5: 6 per attempted step (accepted or rejected; the
# last stage is the next step's first) and 1 at the start; the first step is (u1 - u0) / 64.
_DOPRI5_EVALS_PER_STEP, _DOPRI5_EXTRA_EVALS, _FIRST_STEP_FRACTION = 6, 1, 1.0 / 64


def _check_choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; allowed: {list(allowed)}.")


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps (network calls) must be an int >= 1, got {num_steps!r}.")


# ----------------------------------------------------------------------------------------------
# Continuous time


def _log_abar_table(d: diffusion.GaussianDiffusion) -> jax.Array:
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


def _t_of_log_abar(d: diffusion.GaussianDiffusion, g: jax.Array) -> jax.Array:
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


def log_alpha_cumprod(d: diffusion.GaussianDiffusion, t: jax.Array) -> jax.Array:
    """log abar(t) = (1 - w) log abar_k + w log abar_{k+1}, k = floor(t), w = t - k, for real
    t in [0, T-1] (clamped there); any shape."""
    return _interp_steps(jnp.asarray(t, d.alphas_cumprod.dtype), _log_abar_table(d))


def alpha_sigma(d: diffusion.GaussianDiffusion, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) = (sqrt(abar(t)), sqrt(1 - abar(t))), 1 - abar = -expm1(log abar)."""
    g = log_alpha_cumprod(d, t)
    return jnp.exp(0.5 * g), jnp.sqrt(-jnp.expm1(g))


def lambda_from_t(d: diffusion.GaussianDiffusion, t: jax.Array) -> jax.Array:
    """Half log-SNR lambda(t) = log(alpha / sigma) = (log abar - log(1 - abar)) / 2."""
    g = log_alpha_cumprod(d, t)
    return 0.5 * (g - jnp.log(-jnp.expm1(g)))


def t_from_lambda(d: diffusion.GaussianDiffusion, lam: jax.Array) -> jax.Array:
    """The inverse of ``lambda_from_t``: log abar = log sigmoid(2 lambda), then t by inverse
    interpolation of the (decreasing) log abar_t table; clamped to [0, T-1]."""
    return _t_of_log_abar(d, jax.nn.log_sigmoid(2.0 * jnp.asarray(lam, d.alphas_cumprod.dtype)))


def sigma_from_t(d: diffusion.GaussianDiffusion, t: jax.Array) -> jax.Array:
    """VE noise level sigma_ve(t) = sigma / alpha = sqrt(1 / abar - 1) = exp(-lambda(t))."""
    return jnp.sqrt(jnp.expm1(-log_alpha_cumprod(d, t)))


def t_from_sigma(d: diffusion.GaussianDiffusion, sigma: jax.Array) -> jax.Array:
    """The inverse of ``sigma_from_t``: log abar = -log(1 + sigma_ve^2), then t as in
    ``t_from_lambda``; clamped to [0, T-1]."""
    return _t_of_log_abar(d, -jnp.log1p(jnp.square(jnp.asarray(sigma, d.alphas_cumprod.dtype))))


def model_time(d: diffusion.GaussianDiffusion, t: jax.Array) -> jax.Array:
    """The time the network is called with at real step t: ``timestep_map`` interpolated
    linearly (t itself for a schedule that is not respaced)."""
    t = jnp.asarray(t, d.alphas_cumprod.dtype)
    return _interp_steps(t, d.timestep_map.astype(t.dtype))


def eps_and_x0(
    d: diffusion.GaussianDiffusion,
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
    mean_out, _ = diffusion._split_output(d, out, x)  # a learned variance is not used here
    alpha, sigma = (diffusion._bcast(v.astype(x.dtype), x) for v in alpha_sigma(d, t))
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
# The equations


def pf_ode_drift(x: jax.Array, eps: jax.Array, sigma: jax.Array) -> jax.Array:
    """The probability-flow ODE in u = log(sigma / alpha) = -lambda (Song et al. 2021, VP form
    dx/dt = -beta(t)/2 (x + grad log q_t) with grad log q_t = -eps / sigma, divided by
    du/dt = -dlambda/dt = beta(t) / (2 sigma^2)):

      dx/du = sigma eps_hat(x, t(u)) - sigma^2 x,  sigma^2 = sigmoid(2u).
    """
    return sigma * eps - jnp.square(sigma) * x


def karras_sigmas(
    sigma_min: jax.Array, sigma_max: jax.Array, num: int, rho: float = 7.0
) -> jax.Array:
    """EDM noise levels (Karras et al. 2022, eq. 5), decreasing, [num]:

      sigma_i = (sigma_max^(1/rho) + i / (num - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,

    i = 0, ..., num - 1; [sigma_max] when num = 1.
    """
    frac = jnp.arange(num, dtype=jnp.asarray(sigma_max).dtype) / max(num - 1, 1)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + frac * (lo - hi)) ** rho


def euler_update(y: jax.Array, denoised: jax.Array, s: jax.Array, s_next: jax.Array) -> jax.Array:
    """Euler's step of dy/ds = (y - D(y; s)) / s (EDM's ODE in the VE variable):

    y_next = y + (s_next - s) (y - D(y; s)) / s   (= D(y; s) at s_next = 0).
    """
    return y + (s_next - s) * (y - denoised) / s


def heun_update(
    y: jax.Array,
    denoised: jax.Array,
    y_euler: jax.Array,
    denoised_euler: jax.Array,
    s: jax.Array,
    s_next: jax.Array,
) -> jax.Array:
    """Heun's step of dy/ds = (y - D(y; s)) / s (Karras et al. 2022, Algorithm 1), s_next > 0:

    d = (y - D(y; s)) / s,  y' = y + (s_next - s) d  (``euler_update``),
    d' = (y' - D(y'; s_next)) / s_next,  y_next = y + (s_next - s) (d + d') / 2.
    """
    d1 = (y - denoised) / s
    d2 = (y_euler - denoised_euler) / s_next
    return y + (s_next - s) * 0.5 * (d1 + d2)


def dpmpp_2m_update(
    x: jax.Array,
    x0: jax.Array,
    x0_prev: jax.Array,
    noise: jax.Array,
    a: jax.Array,
    b: jax.Array,
    n: jax.Array,
    c: jax.Array,
) -> jax.Array:
    """One DPM-Solver++(2M) step (Lu et al. 2022b: Algorithm 2 at eta = 0; the SDE solver of
    their section 4 in k-diffusion's midpoint form, noise scale eta > 0), t_i to t_{i+1}:

      D_i = (1 + c) x0_i - c x0_{i-1},  c = 1/(2 r_i) = h_i / (2 h_{i-1}),
      x_{i+1} = (sigma_{i+1} / sigma_i) e^{-eta h_i} x_i + alpha_{i+1} (1 - e^{-(1+eta) h_i}) D_i
                + sigma_{i+1} sqrt(1 - e^{-2 eta h_i}) z,   z ~ N(0, I) (``noise``),

    h_i = lambda_{i+1} - lambda_i, with a, b, n the three coefficients (``dpmpp_2m_schedule``);
    c = 0 is the first-order step (DDIM at eta = 0). At eta = 0 this is the probability-flow
    ODE's x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i; eta = 1 is the
    variance-preserving reverse SDE's solver (k-diffusion's default).
    """
    denoised = x0 + c * (x0 - x0_prev)
    return a * x + b * denoised + n * noise


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
# Segments: a sampler is step(i, state) -> state for i = 0, ..., total - 1


def _scan_steps(step: Callable, state: dict, total: int) -> dict:
    """All steps in one lax.scan."""
    steps = jnp.arange(total, dtype=jnp.int32)
    return jax.lax.scan(lambda s, i: (step(i, s), None), state, steps)[0]


def _range_steps(step: Callable, state: dict, start: jax.Array | int, count: int, total: int):
    """Steps start, ..., start + count - 1 in one fori_loop; those outside [0, total) skipped."""

    def body(j, state):
        i = jnp.asarray(start, jnp.int32) + j
        return jax.lax.cond((i >= 0) & (i < total), lambda s: step(i, s), lambda s: s, state)

    return jax.lax.fori_loop(0, count, body, state)


def _full(x: jax.Array, value: jax.Array) -> jax.Array:
    """value (scalar) as a time array [B]."""
    return jnp.full(x.shape[:1], value, jnp.result_type(value))


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


def dpmpp_2m_schedule(
    d: diffusion.GaussianDiffusion,
    num_steps: int,
    eta: float = 0.0,
    lower_order_final: bool = False,
) -> dict[str, jax.Array]:
    """The steps of ``dpmpp_2m_sample`` (``eta`` = 0) and ``dpmpp_2m_sde_sample``, each
    [num_steps]: t_i (lambda uniform from lambda(T-1) to lambda(0), as Lu et al. recommend for
    few steps; t_0 = T-1, t_{M-1} = 0) and the coefficients of step i (t_i -> t_{i+1}, t_M:
    sigma = 0) in ``dpmpp_2m_update``'s form x_{i+1} = a x_i + b D_i + n z:

      a = (sigma_{i+1} / sigma_i) e^{-eta h_i},  b = alpha_{i+1} (1 - e^{-(1 + eta) h_i}),
      n = sigma_{i+1} sqrt(1 - e^{-2 eta h_i}),

    and c = 1/(2 r_i) = h_i / (2 h_{i-1}) of D_i (0 at the first and the last step). The last
    step (h = inf) is a = n = 0, b = 1: x_M = x0_hat(x_{M-1}, t = 0). ``lower_order_final``
    (the official DPM-Solver++'s rule): with fewer than 10 steps between t_0 and t_{M-1}, the
    step into t_{M-1} is first order too (c = 0).
    """
    _check_num_steps(num_steps)
    if not eta >= 0.0:
        raise ValueError(f"eta (the SDE's noise scale) must be >= 0, got {eta!r}.")
    lam = jnp.linspace(lambda_from_t(d, d.num_timesteps - 1), lambda_from_t(d, 0), num_steps)
    t = t_from_lambda(d, lam).at[-1].set(0.0).at[0].set(d.num_timesteps - 1)
    h = lam[1:] - lam[:-1]  # [M - 1]
    log_var = jax.nn.log_sigmoid(-2.0 * lam)  # log sigma^2
    sigma_next = jnp.exp(0.5 * log_var[1:])  # [M - 1]
    alpha_next = jnp.exp(0.5 * jax.nn.log_sigmoid(2.0 * lam[1:]))
    ratio_sigma = jnp.exp(0.5 * (log_var[1:] - log_var[:-1]))
    zero, one = jnp.zeros((1,), lam.dtype), jnp.ones((1,), lam.dtype)
    a = jnp.concatenate([ratio_sigma * jnp.exp(-eta * h), zero])
    b = jnp.concatenate([-alpha_next * jnp.expm1(-(1.0 + eta) * h), one])
    n = jnp.concatenate([sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h)), zero])
    c = jnp.concatenate([zero, h[1:] / (2.0 * h[:-1]), zero]) if num_steps > 1 else zero
    if lower_order_final and 2 <= num_steps - 1 < 10:
        c = c.at[num_steps - 2].set(0.0)
    return dict(t=t, a=a, b=b, n=n, c=c)


def _dpmpp_2m_step(
    d,
    model_fn,
    num_steps: int,
    clip_denoised: bool,
    eta: float = 0.0,
    lower_order_final: bool = False,
    key: jax.Array | None = None,
) -> Callable:
    """Step i of the solver: the state holds x and the previous x0 prediction; for eta > 0,
    fold_in(key, i) draws step i's noise."""
    if eta and key is None:
        raise ValueError(f"eta={eta} (the SDE solver) needs the key of the steps' noise.")
    sched = dpmpp_2m_schedule(d, num_steps, eta, lower_order_final)

    def step(i, state):
        x, x0_prev = state["x"], state["x0_prev"]  # [B, ...] each
        _, x0 = eps_and_x0(d, model_fn, x, _full(x, sched["t"][i]), clip_denoised)
        coef = {k: sched[k][i].astype(x.dtype) for k in ("a", "b", "n", "c")}
        noise = 0.0
        if eta:
            noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return dict(x=dpmpp_2m_update(x, x0, x0_prev, noise, **coef), x0_prev=x0)

    return step


def dpmpp_2m_init(
    d: diffusion.GaussianDiffusion, x_T: jax.Array, num_steps: int
) -> dict[str, jax.Array]:
    """The state before step 0: dict(x = x_T, x0_prev = 0), each [B, ...]."""
    _check_num_steps(num_steps)
    return dict(x=x_T, x0_prev=jnp.zeros_like(x_T))


def dpmpp_2m_steps(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    state: dict[str, jax.Array],
    start: jax.Array | int,
    count: int,
    num_steps: int,
    clip_denoised: bool = True,
    eta: float = 0.0,
    lower_order_final: bool = False,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Steps start, ..., start + count - 1 of ``dpmpp_2m_sample`` (or, with eta > 0 and the
    noise's ``key``, of ``dpmpp_2m_sde_sample``): num_steps steps in all, one network call
    each; steps >= num_steps are skipped; one fori_loop, ``start`` may be traced. Running steps
    0..num_steps-1 in segments from ``dpmpp_2m_init`` gives the whole solver: the result is
    state["x"]."""
    step = _dpmpp_2m_step(d, model_fn, num_steps, clip_denoised, eta, lower_order_final, key)
    return _range_steps(step, state, start, count, num_steps)


def dpmpp_2m_sample(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    clip_denoised: bool = True,
    lower_order_final: bool = False,
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022b), multistep second order in the data-prediction form,
    from x_T at t = T-1 to t = 0, in one ``lax.scan``; returns x0 [B, ...].

    ``num_steps`` = M network calls, one per step, at t_0 = T-1, ..., t_{M-1} = 0 uniform in
    lambda (``dpmpp_2m_schedule``). Step 0 is first order (DDIM); steps 1..M-2 use the previous
    x0 prediction (``dpmpp_2m_update``, eta = 0); the last step, from t = 0 to sigma = 0,
    returns the x0 prediction at t = 0 (first order, as the paper's final step and DDIM's last
    step). Between integer steps the network is called at fractional t. M = 1 returns
    x0_hat(x_T, T-1). ``clip_denoised`` clips each x0 prediction to [-1, 1];
    ``lower_order_final``: see ``dpmpp_2m_schedule``.
    """
    step = _dpmpp_2m_step(d, model_fn, num_steps, clip_denoised, 0.0, lower_order_final)
    return _scan_steps(step, dpmpp_2m_init(d, x_T, num_steps), num_steps)["x"]


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
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; ``dpmpp_2m_update``): the steps of
    ``dpmpp_2m_sample`` with noise of scale ``eta`` (1: k-diffusion's default; 0: the ODE
    solver) injected at every step but the last, step i's from fold_in(key, i); one
    ``lax.scan``, returns x0 [B, ...]. Needs M >= 2 network calls to add any noise."""
    step = _dpmpp_2m_step(d, model_fn, num_steps, clip_denoised, eta, lower_order_final, key)
    return _scan_steps(step, dpmpp_2m_init(d, x_T, num_steps), num_steps)["x"]


# ----------------------------------------------------------------------------------------------
# Heun (EDM)


def heun_num_steps(num_steps: int) -> int:
    """N = (num_steps + 1) // 2 Heun steps for ``num_steps`` network calls (N steps cost
    2N - 1: the last is Euler; an even ``num_steps`` leaves one call unused)."""
    _check_num_steps(num_steps)
    return (num_steps + 1) // 2


def heun_sigmas(d: diffusion.GaussianDiffusion, num_steps: int, rho: float = 7.0) -> jax.Array:
    """The N + 1 VE noise levels of ``heun_sample``: ``karras_sigmas`` from sigma_max =
    sigma_ve(T-1) to sigma_min = sigma_ve(0), then 0. [N + 1]."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}.")
    n = heun_num_steps(num_steps)
    s_min, s_max = sigma_from_t(d, 0), sigma_from_t(d, d.num_timesteps - 1)
    sig = karras_sigmas(s_min, s_max, n, rho).at[0].set(s_max)
    sig = sig.at[-1].set(s_min) if n > 1 else sig
    return jnp.concatenate([sig, jnp.zeros((1,), sig.dtype)])


def _heun_step(d, model_fn, num_steps: int, rho: float, clip_denoised: bool) -> Callable:
    sig = heun_sigmas(d, num_steps, rho)
    n = sig.shape[0] - 1
    t_of = t_from_sigma(d, sig[:-1]).at[-1].set(0.0).at[0].set(d.num_timesteps - 1)  # [N]

    def step(i, state):
        x = state["x"]  # VP form at sigma_i: x = alpha y, alpha = 1 / sqrt(1 + s^2)
        s, s_next = sig[i].astype(x.dtype), sig[i + 1].astype(x.dtype)
        y = x * jnp.sqrt(1.0 + jnp.square(s))
        _, x0 = eps_and_x0(d, model_fn, x, _full(x, t_of[i]), clip_denoised)

        def heun(y):
            y_euler = euler_update(y, x0, s, s_next)
            x_euler = y_euler / jnp.sqrt(1.0 + jnp.square(s_next))  # [B, ...]
            t_next = _full(x, t_of[jnp.minimum(i + 1, n - 1)])
            _, x0_euler = eps_and_x0(d, model_fn, x_euler, t_next, clip_denoised)
            return heun_update(y, x0, y_euler, x0_euler, s, s_next)

        y = jax.lax.cond(i < n - 1, heun, lambda y: euler_update(y, x0, s, s_next), y)
        return dict(x=y / jnp.sqrt(1.0 + jnp.square(s_next)))

    return step


def heun_init(d: diffusion.GaussianDiffusion, x_T: jax.Array, num_steps: int) -> dict:
    """The state before step 0: dict(x = x_T) [B, ...] (VP form, at sigma_max)."""
    heun_num_steps(num_steps)
    return dict(x=x_T)


def heun_steps(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    state: dict[str, jax.Array],
    start: jax.Array | int,
    count: int,
    num_steps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
) -> dict[str, jax.Array]:
    """Steps start, ..., start + count - 1 of ``heun_sample`` (N = ``heun_num_steps(num_steps)``
    steps in all, each 2 network calls but the last, 1; steps >= N are skipped), in one
    fori_loop; ``start`` may be traced. In segments from ``heun_init`` they give
    ``heun_sample``: the result is state["x"]."""
    step = _heun_step(d, model_fn, num_steps, rho, clip_denoised)
    return _range_steps(step, state, start, count, heun_num_steps(num_steps))


def heun_sample(
    d: diffusion.GaussianDiffusion,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Heun's second-order method on the EDM noise levels (Karras et al. 2022, Algorithm 1), in
    one ``lax.scan``; returns x0 [B, ...].

    Solves dy/ds = (y - D(y; s)) / s in the VE variable y = x / alpha, s = sigma / alpha
    (``heun_update``), from x_T at s = sigma_ve(T-1) over the ``heun_sigmas`` (rho = ``rho``)
    down to sigma_min = sigma_ve(0) (t = 0), then an Euler step to s = 0, which returns
    D(y; sigma_min), the x0 prediction at t = 0. ``num_steps`` network calls buy
    N = (num_steps + 1) // 2 steps (2N - 1 calls). The network is called at t = t_from_sigma(s),
    fractional between integer steps. ``clip_denoised`` clips each D to [-1, 1].
    """
    step = _heun_step(d, model_fn, num_steps, rho, clip_denoised)
    return _scan_steps(step, heun_init(d, x_T, num_steps), heun_num_steps(num_steps))["x"]


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
        t = _full(x, t_from_lambda(d, -u))

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
