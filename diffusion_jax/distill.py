"""Progressive distillation (Salimans & Ho 2022), the maths: the target that makes a student's one
DDIM step land where the teacher's two land, over the ``samplers.Process`` interface (the
discrete chain at real t in [0, T-1], continuous time at t in [0, 1]).

A round distils a teacher sampling on a grid of 2N DDIM steps into a student of N: the student's
step k runs from the teacher's grid point 2k to 2k + 2, and its x-prediction is trained towards
``distillation_target`` (the paper's Algorithm 2) with the weight ``distillation_weight``. The
grid ends at sigma = 0 (alpha = 1): the last step returns x0_hat, as ``samplers.ddim_update``'s
chain does. Pure JAX, no Flax, no I/O; every function jits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from diffusion_jax import samplers
from diffusion_jax.samplers import per_example

__all__ = [
    "DISTILL_WEIGHTS",
    "DistillGrid",
    "alpha_sigma",
    "ddim_step",
    "distillation_grid",
    "distillation_loss",
    "distillation_target",
    "distillation_weight",
    "distilled_step",
    "grid_point",
    "teacher_two_steps",
]

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
DISTILL_WEIGHTS = ("truncated_snr", "snr_plus_one")


class DistillGrid(NamedTuple):
    """A sampling grid of N DDIM steps, noisiest first: the network's times ``t`` [N] and
    ``alpha``, ``sigma`` [N + 1] at those times and at the end (alpha = 1, sigma = 0)."""

    t: jax.Array
    alpha: jax.Array
    sigma: jax.Array


def alpha_sigma(process: samplers.Process, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(alpha(t), sigma(t)) of a variance-preserving process from its sigma_ve = sigma / alpha:
    alpha = 1 / sqrt(1 + sigma_ve^2), sigma = sigma_ve alpha."""
    sigma_ve = process.sigma_ve(t)
    alpha = jax.lax.rsqrt(1.0 + jnp.square(sigma_ve))
    return alpha, sigma_ve * alpha


def grid_point(
    process: samplers.Process, num_steps: jax.Array | int, i: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t_i, alpha_i, sigma_i) of the grid of N = ``num_steps`` steps at index i in [0, N] (any
    shape; N and i may be traced, so one compilation serves every round):

      t_i = t_max (N - i) / N,  (alpha_i, sigma_i) = (alpha(t_i), sigma(t_i)) for i < N,
      (alpha_N, sigma_N) = (1, 0): the last step lands on x0_hat.

    Uniform in the process's time (t_min = 0 for both processes); halving N keeps the even
    points, so a student's grid is every other point of its teacher's."""
    dtype = jnp.result_type(float)
    n = jnp.asarray(num_steps, dtype)
    t = process.t_max * (n - i) / n
    alpha, sigma = alpha_sigma(process, jnp.minimum(t, process.t_max))
    end = i >= num_steps
    return t, jnp.where(end, 1.0, alpha), jnp.where(end, 0.0, sigma)


def distillation_grid(process: samplers.Process, num_steps: int) -> DistillGrid:
    """The whole grid of ``grid_point`` for N = ``num_steps`` steps: t [N], alpha, sigma
    [N + 1]."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}.")
    t, alpha, sigma = grid_point(process, num_steps, jnp.arange(num_steps + 1))
    return DistillGrid(t[:-1], alpha, sigma)


def ddim_step(
    process: samplers.Process,
    model_fn: ModelFn,
    z: jax.Array,
    t: jax.Array,
    alpha_s: jax.Array,
    clip_denoised: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The project's deterministic DDIM step (``samplers.ddim_update``, eta = 0) from time t
    [B] to the point alpha_s [B] (sigma_s = sqrt(1 - alpha_s^2)) of the grid:
    z_s = alpha_s x0_hat + sigma_s eps_hat. Returns (z_s, x0_hat), each [B, ...]."""
    abar_s = per_example(jnp.square(alpha_s), z)  # [B, 1, ...]
    step = samplers.ChainStep(t, t, jnp.int32(0), abar_s, jnp.zeros_like(abar_s))
    key = jax.random.key(0)  # unused: eta = 0 draws no noise
    return samplers.ddim_update(process, model_fn, z, step, key, 0.0, clip_denoised)


def distilled_step(
    process: samplers.Process, model_fn: ModelFn, num_steps: int, clip_denoised: bool = True
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Step i of the sampler a student of N = ``num_steps`` steps was distilled for (on its
    teacher, the teacher's own DDIM on that grid): ``step(i, z) -> z``, DDIM from grid point i
    to i + 1, i = 0 (z_T ~ N(0, I) at t_max) .. N - 1 (which returns x0_hat)."""

    def step(i, z):
        b = z.shape[:1]
        t, _, _ = grid_point(process, num_steps, i)
        _, alpha_s, _ = grid_point(process, num_steps, i + 1)
        z_s, _ = ddim_step(
            process, model_fn, z, jnp.full(b, t), jnp.full(b, alpha_s), clip_denoised
        )
        return z_s

    return step


def teacher_two_steps(
    process: samplers.Process,
    teacher_fn: ModelFn,
    z_t: jax.Array,
    teacher_steps: jax.Array | int,
    k: jax.Array,
    clip_denoised: bool = False,
) -> jax.Array:
    """The teacher's two DDIM steps from point 2k to 2k + 2 of its grid of 2N =
    ``teacher_steps`` steps (k int32 [B] < N, one student step each): z_{t'} = DDIM(z_t; t ->
    t'), z_{t''} = DDIM(z_{t'}; t' -> t''). Returns z_{t''} [B, ...]."""
    t, _, _ = grid_point(process, teacher_steps, 2 * k)  # [B]
    t_mid, alpha_mid, _ = grid_point(process, teacher_steps, 2 * k + 1)
    _, alpha_s, _ = grid_point(process, teacher_steps, 2 * k + 2)
    z_mid, _ = ddim_step(process, teacher_fn, z_t, t, alpha_mid, clip_denoised)
    z_s, _ = ddim_step(process, teacher_fn, z_mid, t_mid, alpha_s, clip_denoised)
    return z_s


def distillation_target(
    z_t: jax.Array,
    z_s: jax.Array,
    alpha_t: jax.Array,
    sigma_t: jax.Array,
    alpha_s: jax.Array,
    sigma_s: jax.Array,
) -> jax.Array:
    """The x the student's one DDIM step from t to s must predict to land on the teacher's z_s
    (Salimans & Ho 2022, Algorithm 2):

      x~ = (z_s - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t),

    the solution of z_s = alpha_s x~ + sigma_s (z_t - alpha_t x~) / sigma_t. alpha, sigma are
    [B] (or scalars); z_t, z_s, the result [B, ...]. At sigma_s = 0 it is z_s / alpha_s."""
    ratio = per_example(sigma_s / sigma_t, z_t)
    return (z_s - ratio * z_t) / (per_example(alpha_s, z_t) - ratio * per_example(alpha_t, z_t))


def distillation_weight(alpha_t: jax.Array, sigma_t: jax.Array, kind: str) -> jax.Array:
    """The weight of the x-space loss w ||x~ - x_hat||^2 at t (Salimans & Ho 2022, section 4):
    "truncated_snr" max(SNR, 1) or "snr_plus_one" SNR + 1 (the v-loss ||v~ - v_hat||^2 written
    in x space), SNR = alpha^2 / sigma^2. Shapes as alpha_t."""
    snr = jnp.square(alpha_t / sigma_t)
    if kind == "truncated_snr":
        return jnp.maximum(snr, 1.0)
    if kind == "snr_plus_one":
        return snr + 1.0
    raise ValueError(f"distillation weight {kind!r}; allowed: {DISTILL_WEIGHTS}.")


def distillation_loss(
    process: samplers.Process,
    student_fn: ModelFn,
    teacher_process: samplers.Process,
    teacher_fn: ModelFn,
    x0: jax.Array,
    noise: jax.Array,
    k: jax.Array,
    num_steps: jax.Array | int,
    weight: str = "snr_plus_one",
    clip_denoised: bool = True,
) -> jax.Array:
    """One draw of the student's loss (Salimans & Ho 2022, Algorithm 2), per example [B]:

      z_t = alpha_t x0 + sigma_t eps,  t = t_k of the student's grid of N = ``num_steps`` steps,
      x~ = ``distillation_target``(z_t, the teacher's two DDIM steps to t_{k+1}),
      L = w(t) mean ||x~ - x0_hat(z_t, t)||^2  (w: ``distillation_weight``),

    k int32 [B] in [0, N), noise eps [B, ...]. The teacher (its own process: an eps model with a
    learned variance, or an earlier student) steps with ``clip_denoised``; the target carries no
    gradient; the student's x0_hat is unclipped. N may be traced."""
    t, alpha_t, sigma_t = grid_point(process, num_steps, k)  # [B] each
    _, alpha_s, sigma_s = grid_point(process, num_steps, k + 1)
    z_t = per_example(alpha_t, x0) * x0 + per_example(sigma_t, x0) * noise  # [B, ...]
    z_s = teacher_two_steps(teacher_process, teacher_fn, z_t, 2 * num_steps, k, clip_denoised)
    target = jax.lax.stop_gradient(
        distillation_target(z_t, z_s, alpha_t, sigma_t, alpha_s, sigma_s)
    )
    x0_hat = process.denoise(student_fn, z_t, t, False).x0
    error = jnp.mean(jnp.square(target - x0_hat), axis=tuple(range(1, x0.ndim)))  # [B]
    return distillation_weight(alpha_t, sigma_t, weight) * error
