"""Every sampler once: ancestral, DDIM (eta), DPM-Solver++(2M) and its SDE, and Heun, each a
small function over the ``Process`` interface that the discrete DDPM chain
(``diffusion.DiscreteProcess``) and continuous time (``vdm.ContinuousProcess``) both provide.

A process answers, at its own times t (the discrete chain's integer steps or real t in
[0, T-1]; continuous t in [0, 1]): the network's prediction ``denoise`` (eps_hat, x0_hat, and a
learned variance where there is one); alpha(t), sigma(t) and the half log-SNR
lambda(t) = log(alpha / sigma), with their inverses; the reverse model p(x_s | x_t) of one step of
its chain; and the grids its solvers visit. The samplers know nothing else of it, so a new
process gets every sampler, and a new sampler serves every process.

A sampler is ``step(i, state) -> state`` for steps i = 0 (the noisiest) .. N - 1, run whole in
one ``lax.scan`` (``*_sample``) or in segments of a traced start (``run_steps``, for the
product's progress bar): the segments rebuild the whole chain exactly. Pure JAX, no Flax, no
I/O; every function jits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

__all__ = [
    "ChainStep",
    "Prediction",
    "Process",
    "SolverGrid",
    "ancestral_update",
    "chain_sample",
    "chain_step_fn",
    "ddim_update",
    "dpmpp_2m_finish",
    "dpmpp_2m_init",
    "dpmpp_2m_sample",
    "dpmpp_2m_schedule",
    "dpmpp_2m_step",
    "dpmpp_2m_update",
    "euler_update",
    "heun_init",
    "heun_num_steps",
    "heun_sample",
    "heun_sigmas",
    "heun_step",
    "heun_update",
    "karras_sigmas",
    "normal",
    "per_example",
    "run_steps",
    "scan_steps",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


class Prediction(NamedTuple):
    """The network's answer at (x_t, t): eps_hat and x0_hat [B, ...] (x0_hat clipped to
    [-1, 1] when asked, eps_hat then recomputed from it), and the variance half of a
    ``learned_range`` output (None where the process has no learned variance)."""

    eps: jax.Array
    x0: jax.Array
    var: jax.Array | None = None


class ChainStep(NamedTuple):
    """Step i of a chain, from t to the next time s < t: the network's time ``t`` [B] and
    ``s`` [B], ``noise_index`` (the step's noise is fold_in(key, noise_index)), abar_s =
    alpha_s^2 and the posterior variance beta~ of q(x_s | x_t, x_0), these two broadcastable to
    x [B, 1, ...]."""

    t: jax.Array
    s: jax.Array
    noise_index: jax.Array
    abar_s: jax.Array
    posterior_variance: jax.Array


class SolverGrid(NamedTuple):
    """The times of a solver's network calls ``t`` [M], their half log-SNR ``lam`` [M] and
    the end: ``lam_end`` (a scalar, the last step lands there) or None (the last call's x0_hat
    is the sample: the step to sigma = 0)."""

    t: jax.Array
    lam: jax.Array
    lam_end: jax.Array | None


class Process(Protocol):
    """What a sampler asks of a diffusion process x_t = alpha(t) x_0 + sigma(t) eps."""

    t_max: float  # the time of the noisiest network call (the prior's x_T is drawn there)
    t_min: float  # the time of the cleanest one

    def denoise(
        self, model_fn: ModelFn, x: jax.Array, t: jax.Array, clip_denoised: bool
    ) -> Prediction: ...

    def chain(self, num_steps: int) -> Process:
        """The process whose ``chain_step`` runs a chain of ``num_steps`` steps."""

    def chain_length(self) -> int: ...

    def chain_step(self, i: jax.Array, x: jax.Array) -> ChainStep: ...

    def reverse(
        self, step: ChainStep, pred: Prediction, x: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """(mean, std) of p(x_s | x_t), each broadcastable to x."""

    def solver_grid(self, num_steps: int) -> SolverGrid: ...

    def sigma_ve(self, t: jax.Array) -> jax.Array:
        """sigma / alpha = exp(-lambda(t))."""

    def t_from_sigma_ve(self, sigma: jax.Array) -> jax.Array: ...

    def finish(self, x: jax.Array) -> jax.Array:
        """The sample of a chain ended at t_min (not at sigma = 0)."""


def normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """N(0, I) drawn in float32 (the same draws under x64), cast to ``dtype``."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def per_example(v: jax.Array, x: jax.Array) -> jax.Array:
    """v [B] (or a scalar) shaped to broadcast against x [B, ...]: [B, 1, ..., 1]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _full(x: jax.Array, value: jax.Array) -> jax.Array:
    """value (scalar) as a time array [B]."""
    return jnp.full(x.shape[:1], value, jnp.result_type(value))


# ----------------------------------------------------------------------------------------------
# Running steps


def scan_steps(step: Callable, state: Any, total: int) -> Any:
    """Steps 0, ..., total - 1 of ``step(i, state) -> state`` in one lax.scan."""
    steps = jnp.arange(total, dtype=jnp.int32)
    return jax.lax.scan(lambda s, i: (step(i, s), None), state, steps)[0]


def run_steps(step: Callable, state: Any, start: jax.Array | int, count: int, total: int) -> Any:
    """Steps start, ..., start + count - 1 in one fori_loop, those outside [0, total) skipped;
    ``start`` may be traced, so one compilation runs every segment of ``count`` steps."""

    def body(j, state):
        i = jnp.asarray(start, jnp.int32) + j
        return jax.lax.cond((i >= 0) & (i < total), lambda s: step(i, s), lambda s: s, state)

    return jax.lax.fori_loop(0, count, body, state)


# ----------------------------------------------------------------------------------------------
# The chain: ancestral sampling and DDIM


def ancestral_update(
    process: Process,
    model_fn: ModelFn,
    x: jax.Array,
    step: ChainStep,
    key: jax.Array,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One step of ancestral sampling: x_s = mean + std z ~ p(x_s | x_t) (Ho et al. 2020,
    Algorithm 2; VDM's sampler, their eq. 34), z ~ N(0, I) from ``key``. Returns
    (x_s, x0_hat), each [B, ...]."""
    pred = process.denoise(model_fn, x, step.t, clip_denoised)
    mean, std = process.reverse(step, pred, x)
    return mean + std * normal(key, x.shape, x.dtype), pred.x0


def ddim_update(
    process: Process,
    model_fn: ModelFn,
    x: jax.Array,
    step: ChainStep,
    key: jax.Array,
    eta: float = 0.0,
    clip_denoised: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """One step of DDIM (Song et al. 2021, eq. 12), t -> s:

      x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z,
      sigma = eta sqrt(beta~),  beta~ = (1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s),

    z ~ N(0, I) from ``key``. eta = 0 is deterministic; eta = 1 draws from q(x_s | x_t, x0_hat),
    ancestral sampling with the fixedsmall variance. A learned variance is not used. Returns
    (x_s, x0_hat), each [B, ...]."""
    pred = process.denoise(model_fn, x, step.t, clip_denoised)
    sigma = eta * jnp.sqrt(step.posterior_variance)
    dir_coef = jnp.sqrt(jnp.maximum(1.0 - step.abar_s - jnp.square(sigma), 0.0))
    noise = normal(key, x.shape, x.dtype)
    return jnp.sqrt(step.abar_s) * pred.x0 + dir_coef * pred.eps + sigma * noise, pred.x0


def chain_step_fn(process: Process, update: Callable, key: jax.Array) -> Callable:
    """Step i of a chain of ``update(x, step, key) -> (x_s, x0_hat)`` (``ancestral_update``,
    ``ddim_update`` with their other arguments bound): ``step(i, x) -> (x_s, x0_hat)`` at
    ``process.chain_step(i)``, its noise from fold_in(key, noise_index)."""

    def step(i, x):
        s = process.chain_step(i, x)
        return update(x, s, jax.random.fold_in(key, s.noise_index))

    return step


def chain_sample(
    process: Process, step: Callable, x: jax.Array, snapshot_every: int = 0
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The whole chain of ``step(i, x) -> (x, x0_hat)`` (``chain_step_fn``) on
    ``process.chain_length()`` steps from x, in one lax.scan, then ``process.finish``. With
    ``snapshot_every`` = k > 0 also the x0_hat of the steps with n = N - 1 - i steps after them
    and n % k == 0, from the noisiest on: (x [B, ...], snapshots [ceil(N / k), B, ...])."""
    num = process.chain_length()
    n_snap = -(-num // snapshot_every) if snapshot_every > 0 else 0
    snaps = jnp.zeros((n_snap,) + x.shape, x.dtype) if n_snap else None

    def body(carry, i):
        x, snaps = carry
        x, x0 = step(i, x)
        if n_snap:
            n = num - 1 - i
            j = n_snap - 1 - n // snapshot_every
            snaps = snaps.at[j].set(jnp.where(n % snapshot_every == 0, x0, snaps[j]))
        return (x, snaps), None

    (x, snaps), _ = jax.lax.scan(body, (x, snaps), jnp.arange(num, dtype=jnp.int32))
    x = process.finish(x)
    return (x, snaps) if n_snap else x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M) and its SDE


def dpmpp_2m_schedule(
    process: Process, num_steps: int, eta: float = 0.0, lower_order_final: bool = False
) -> dict[str, jax.Array]:
    """The M = ``num_steps`` steps of DPM-Solver++(2M) on ``process.solver_grid``, each [M]:
    the network times t_i and the coefficients of step i (t_i -> t_{i+1}) in
    ``dpmpp_2m_update``'s form x_{i+1} = a x_i + b D_i + n z,

      a = (sigma_{i+1} / sigma_i) e^{-eta h_i},  b = alpha_{i+1} (1 - e^{-(1 + eta) h_i}),
      n = sigma_{i+1} sqrt(1 - e^{-2 eta h_i}),  h_i = lambda_{i+1} - lambda_i,

    and c = 1/(2 r_i) = h_i / (2 h_{i-1}) of D_i, 0 at the first step. A grid that ends at
    sigma = 0 (``lam_end`` None) ends with a = n = 0, b = 1, c = 0: the sample is x0_hat at the
    last call. ``lower_order_final`` (the official DPM-Solver++'s rule): with 2 to 9 steps of
    finite h, the last of them is first order too (c = 0).
    """
    if not eta >= 0.0:
        raise ValueError(f"eta (the SDE's noise scale) must be >= 0, got {eta!r}.")
    grid = process.solver_grid(num_steps)
    lam = grid.lam if grid.lam_end is None else jnp.append(grid.lam, grid.lam_end)
    finite = lam.shape[0] - 1  # steps between finite lambdas
    h = lam[1:] - lam[:-1]  # [finite]
    log_var = jax.nn.log_sigmoid(-2.0 * lam)  # log sigma^2
    sigma_next = jnp.exp(0.5 * log_var[1:])
    alpha_next = jnp.exp(0.5 * jax.nn.log_sigmoid(2.0 * lam[1:]))
    ratio_sigma = jnp.exp(0.5 * (log_var[1:] - log_var[:-1]))
    zero, one = jnp.zeros((1,), lam.dtype), jnp.ones((1,), lam.dtype)
    a = ratio_sigma * jnp.exp(-eta * h)
    b = -alpha_next * jnp.expm1(-(1.0 + eta) * h)
    n = sigma_next * jnp.sqrt(-jnp.expm1(-2.0 * eta * h))
    c = jnp.concatenate([zero, h[1:] / (2.0 * h[:-1])])[:finite]
    if grid.lam_end is None:  # the last call's x0_hat
        a, b, n, c = (
            jnp.concatenate([v, end]) for v, end in ((a, zero), (b, one), (n, zero), (c, zero))
        )
    if lower_order_final and 2 <= finite < 10:
        c = c.at[finite - 1].set(0.0)
    return dict(t=grid.t, a=a, b=b, n=n, c=c)


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


def dpmpp_2m_init(x_T: jax.Array) -> dict[str, jax.Array]:
    """The state before step 0: dict(x = x_T, x0_prev = 0), each [B, ...]."""
    return dict(x=x_T, x0_prev=jnp.zeros_like(x_T))


def dpmpp_2m_step(
    process: Process,
    model_fn: ModelFn,
    num_steps: int,
    clip_denoised: bool = True,
    eta: float = 0.0,
    lower_order_final: bool = False,
    key: jax.Array | None = None,
) -> Callable:
    """Step i of DPM-Solver++(2M) (eta = 0) or its SDE (eta > 0, step i's noise from
    fold_in(key, i)): ``step(i, state) -> state`` on ``dpmpp_2m_init``'s state."""
    if eta and key is None:
        raise ValueError(f"eta={eta} (the SDE solver) needs the key of the steps' noise.")
    sched = dpmpp_2m_schedule(process, num_steps, eta, lower_order_final)

    def step(i, state):
        x, x0_prev = state["x"], state["x0_prev"]  # [B, ...] each
        x0 = process.denoise(model_fn, x, _full(x, sched["t"][i]), clip_denoised).x0
        coef = {k: sched[k][i].astype(x.dtype) for k in ("a", "b", "n", "c")}
        noise = 0.0
        if eta:
            noise = normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        return dict(x=dpmpp_2m_update(x, x0, x0_prev, noise, **coef), x0_prev=x0)

    return step


def dpmpp_2m_sample(
    process: Process,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    clip_denoised: bool = True,
    eta: float = 0.0,
    lower_order_final: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """DPM-Solver++(2M) (Lu et al. 2022b), multistep second order in the data-prediction form,
    from x_T over ``num_steps`` network calls (``dpmpp_2m_schedule``), in one lax.scan; with
    eta > 0 and a key, the SDE solver. Returns x0 [B, ...]."""
    step = dpmpp_2m_step(process, model_fn, num_steps, clip_denoised, eta, lower_order_final, key)
    return dpmpp_2m_finish(process, num_steps, scan_steps(step, dpmpp_2m_init(x_T), num_steps))


def dpmpp_2m_finish(process: Process, num_steps: int, state: dict[str, jax.Array]) -> jax.Array:
    """The sample after the last step: x, or ``process.finish(x)`` where the grid ends at
    t_min rather than at sigma = 0."""
    x = state["x"]
    return x if process.solver_grid(num_steps).lam_end is None else process.finish(x)


# ----------------------------------------------------------------------------------------------
# Heun (EDM)


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


def heun_num_steps(num_steps: int) -> int:
    """N = (num_steps + 1) // 2 Heun steps for ``num_steps`` network calls (N steps cost
    2N - 1: the last is Euler; an even ``num_steps`` leaves one call unused)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps (network calls) must be an int >= 1, got {num_steps!r}.")
    return (num_steps + 1) // 2


def heun_sigmas(process: Process, num_steps: int, rho: float = 7.0) -> jax.Array:
    """The N + 1 VE noise levels of ``heun_sample``: ``karras_sigmas`` from sigma_max =
    sigma_ve(t_max) to sigma_min = sigma_ve(t_min), then 0. [N + 1]."""
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}.")
    n = heun_num_steps(num_steps)
    s_min, s_max = process.sigma_ve(process.t_min), process.sigma_ve(process.t_max)
    sig = karras_sigmas(s_min, s_max, n, rho).at[0].set(s_max)
    sig = sig.at[-1].set(s_min) if n > 1 else sig
    return jnp.concatenate([sig, jnp.zeros((1,), sig.dtype)])


def heun_init(x_T: jax.Array) -> dict[str, jax.Array]:
    """The state before step 0: dict(x = x_T) [B, ...] (VP form, at sigma_max)."""
    return dict(x=x_T)


def heun_step(
    process: Process,
    model_fn: ModelFn,
    num_steps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
) -> Callable:
    """Step i of ``heun_sample``: ``step(i, state) -> state`` on ``heun_init``'s state."""
    sig = heun_sigmas(process, num_steps, rho)
    n = sig.shape[0] - 1
    t_of = process.t_from_sigma_ve(sig[:-1]).at[-1].set(process.t_min).at[0].set(process.t_max)

    def step(i, state):
        x = state["x"]  # VP form at sigma_i: x = alpha y, alpha = 1 / sqrt(1 + s^2)
        s, s_next = sig[i].astype(x.dtype), sig[i + 1].astype(x.dtype)
        y = x * jnp.sqrt(1.0 + jnp.square(s))
        x0 = process.denoise(model_fn, x, _full(x, t_of[i]), clip_denoised).x0

        def heun(y):
            y_euler = euler_update(y, x0, s, s_next)
            x_euler = y_euler / jnp.sqrt(1.0 + jnp.square(s_next))  # [B, ...]
            t_next = _full(x, t_of[jnp.minimum(i + 1, n - 1)])
            x0_euler = process.denoise(model_fn, x_euler, t_next, clip_denoised).x0
            return heun_update(y, x0, y_euler, x0_euler, s, s_next)

        y = jax.lax.cond(i < n - 1, heun, lambda y: euler_update(y, x0, s, s_next), y)
        return dict(x=y / jnp.sqrt(1.0 + jnp.square(s_next)))

    return step


def heun_sample(
    process: Process,
    model_fn: ModelFn,
    x_T: jax.Array,
    num_steps: int,
    rho: float = 7.0,
    clip_denoised: bool = True,
) -> jax.Array:
    """Heun's second-order method on the EDM noise levels (Karras et al. 2022, Algorithm 1), in
    one lax.scan; returns x0 [B, ...].

    Solves dy/ds = (y - D(y; s)) / s in the VE variable y = x / alpha, s = sigma / alpha
    (``heun_update``), from x_T at s = sigma_ve(t_max) over the ``heun_sigmas`` down to
    sigma_min = sigma_ve(t_min), then an Euler step to s = 0, which returns D(y; sigma_min), the
    x0 prediction at t_min. ``num_steps`` network calls buy N = (num_steps + 1) // 2 steps
    (2N - 1 calls). ``clip_denoised`` clips each D to [-1, 1].
    """
    step = heun_step(process, model_fn, num_steps, rho, clip_denoised)
    return scan_steps(step, heun_init(x_T), heun_num_steps(num_steps))["x"]
