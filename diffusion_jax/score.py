"""Score matching objectives and annealed Langevin sampling (Song & Ermon 2019).

Pure functions over a score function, no Flax and no I/O; every function is jit-able. ``x`` is a
batch ``[B, ...]``; the losses return one value per example, shape ``[B]``: squared norms and
traces are summed over all non-batch dimensions.

Score functions are called on the whole batch and must treat examples independently (no batch
statistics): the Jacobian-vector products below rely on it. Three calling conventions:

- ``ism_loss``, ``ssm_loss``: ``score_fn(x) -> [B, ...]``, the score ∇ₓ log p(x) of the data.
- ``dsm_loss``: ``score_fn(x_tilde, sigma)``, with ``sigma`` passed exactly as the caller gave it.
- ``ncsn_loss``, ``annealed_langevin``: ``score_fn(x_tilde, level)`` with ``level`` an int32 array
  ``[B]`` of zero-based indices into ``sigmas`` (0 is the largest σ), like the time step ``t`` of a
  DDPM model. A function of σ itself adapts as ``lambda x, i: f(x, sigmas[i])``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "PROJECTIONS",
    "ScoreFn",
    "annealed_langevin",
    "annealed_langevin_levels",
    "dsm_loss",
    "ism_loss",
    "langevin_denoise",
    "langevin_step",
    "ncsn_loss",
    "ncsn_score_fn",
    "ncsn_sigmas",
    "ssm_loss",
]

ScoreFn = Callable[..., jax.Array]
PROJECTIONS = ("rademacher", "gaussian")


def _concrete(value) -> np.ndarray | None:
    """``value`` as a NumPy array, or None when it is traced (then checks are skipped)."""
    try:
        return np.asarray(value)
    except jax.errors.TracerArrayConversionError:
        return None


def _check_positive(name: str, value) -> None:
    v = _concrete(value)
    if v is not None and not np.all(v > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _dot(a: jax.Array, b: jax.Array, lead: int = 1) -> jax.Array:
    """Σ a·b over all but the first ``lead`` dims: [*lead_dims, ...] -> lead_dims."""
    ab = a * b
    return jnp.sum(ab.reshape(*ab.shape[:lead], -1), axis=-1)


def _vjv(score_fn: ScoreFn, x: jax.Array, vs: jax.Array) -> tuple[jax.Array, jax.Array]:
    """s(x) and the quadratic forms vᵀ (∇ₓ s) v for each direction v in ``vs``.

    One forward-mode pass (``jax.jvp``) per direction; the score is computed once.
    x: [B, ...]; vs: [M, B, ...] -> s: [B, ...], vJv: [M, B].
    """
    jvp = lambda v: jax.jvp(score_fn, (x,), (v,))
    s, jv = jax.vmap(jvp, out_axes=(None, 0))(vs)  # [B, ...], [M, B, ...]
    return s, _dot(vs, jv, lead=2)  # [M, B]


def ism_loss(score_fn: ScoreFn, x: jax.Array) -> jax.Array:
    """Implicit score matching (Hyvärinen 2005), per example.

        J(x) = ½‖s(x)‖² + tr ∇ₓ s(x),

    whose expectation under the data equals ½E‖s − ∇ₓ log p‖² up to a constant. The trace is
    exact, Σ_d e_dᵀ (∇ₓ s) e_d with one forward-mode Jacobian-vector product per basis vector
    e_d, so the cost is D = prod(x.shape[1:]) evaluations: meant for low-dimensional x.

    x: [B, ...] -> [B].
    """
    event_shape = x.shape[1:]
    dim = math.prod(event_shape)
    basis = jnp.eye(dim, dtype=x.dtype).reshape(dim, 1, *event_shape)  # [D, 1, ...]
    s, vjv = _vjv(score_fn, x, jnp.broadcast_to(basis, (dim, *x.shape)))  # vjv: [D, B]
    return 0.5 * _dot(s, s) + vjv.sum(0)


def _projections(key: jax.Array, shape: tuple[int, ...], dtype, projection: str) -> jax.Array:
    """Random directions v with E[v vᵀ] = I."""
    if projection == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    return jax.random.normal(key, shape, dtype)


def ssm_loss(
    score_fn: ScoreFn,
    x: jax.Array,
    key: jax.Array,
    num_projections: int = 1,
    projection: str = "rademacher",
    *,
    variance_reduced: bool = False,
) -> jax.Array:
    """Sliced score matching (Song et al. 2019), per example, averaged over M projections.

        SSM:    vᵀ (∇ₓ s) v + ½ (vᵀ s)²
        SSM-VR: vᵀ (∇ₓ s) v + ½ ‖s‖²        (the second term's expectation taken analytically)

    with v ~ Rademacher or N(0, I), so E[v vᵀ] = I and both are unbiased estimates of
    ``ism_loss``. vᵀ (∇ₓ s) v is a Hutchinson trace estimate by one ``jax.jvp`` per projection.

    x: [B, ...] -> [B].
    """
    _check_count("num_projections", num_projections)
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    vs = _projections(key, (num_projections, *x.shape), x.dtype, projection)  # [M, B, ...]
    s, vjv = _vjv(score_fn, x, vs)  # [B, ...], [M, B]
    if variance_reduced:
        half_norm = 0.5 * _dot(s, s)  # [B]
    else:
        half_norm = 0.5 * _dot(vs, s[None], lead=2) ** 2  # [M, B]
    return jnp.mean(vjv + half_norm, axis=0)


def dsm_loss(score_fn: ScoreFn, x: jax.Array, sigma, key: jax.Array) -> jax.Array:
    """Denoising score matching (Vincent 2011) at noise level σ, per example.

        x̃ = x + σ z,  z ~ N(0, I),    ℓ = ½ ‖s(x̃, σ) − ∇_x̃ log q_σ(x̃ | x)‖² = ½ ‖s(x̃, σ) + z/σ‖²

    (∇_x̃ log q_σ(x̃ | x) = −(x̃ − x)/σ²). Its expectation is minimised by the score of the noised
    data q_σ = p ⊛ N(0, σ² I), where it equals ½ E‖∇ log q_σ(x̃ | x) − ∇ log q_σ(x̃)‖².

    sigma: a float or an array broadcastable to x (e.g. [B, 1, ...] per example), > 0; it is
    passed to ``score_fn`` as given. x: [B, ...] -> [B].
    """
    _check_positive("sigma", sigma)
    try:
        ok = jnp.broadcast_shapes(jnp.shape(sigma), x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"sigma of shape {jnp.shape(sigma)} does not broadcast to x of shape {x.shape}; "
            "give a per-example sigma the shape (B, 1, ...)"
        )
    z = jax.random.normal(key, x.shape, x.dtype)  # [B, ...]
    x_tilde = x + sigma * z
    residual = score_fn(x_tilde, sigma) + z / sigma  # [B, ...]
    return 0.5 * _dot(residual, residual)


def ncsn_loss(score_fn: ScoreFn, x: jax.Array, sigmas: jax.Array, key: jax.Array) -> jax.Array:
    """Noise conditional score network objective (Song & Ermon 2019, eq. 6), per example.

        ℓ = λ(σ_i) · dsm at σ_i,   λ(σ) = σ²,   i ~ Uniform{0, …, L−1} drawn per example,

    i.e. ½ ‖σ_i s(x̃, i) + z‖², so every level contributes on the same scale. ``score_fn(x̃, i)``
    gets the level index i, int32 [B] (see the module docstring).

    sigmas: [L]; x: [B, ...] -> [B].
    """
    sigmas = jnp.asarray(sigmas, x.dtype)
    level_key, noise_key = jax.random.split(key)
    levels = jax.random.randint(level_key, (x.shape[0],), 0, sigmas.shape[0])  # [B] int32
    sigma = sigmas[levels].reshape(-1, *(1,) * (x.ndim - 1))  # [B, 1, ...]
    per_level = dsm_loss(lambda x_tilde, _: score_fn(x_tilde, levels), x, sigma, noise_key)
    return sigma.reshape(-1) ** 2 * per_level


def ncsn_sigmas(sigma_max: float, sigma_min: float, num_levels: int) -> jax.Array:
    """Geometric noise levels σ_1 = sigma_max > … > σ_L = sigma_min, float32 [L].

    σ_i = sigma_max · (sigma_min / sigma_max)^((i−1)/(L−1)); both ends are levels, so L >= 2.
    """
    _check_count("num_levels", num_levels, minimum=2)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(
            f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, sigma_max={sigma_max!r}"
        )
    return jnp.asarray(np.geomspace(sigma_max, sigma_min, num_levels), jnp.float32)


def langevin_step(
    score_fn: ScoreFn, x: jax.Array, level: jax.Array, alpha, key: jax.Array
) -> jax.Array:
    """One Langevin step: x ← x + (α/2) s(x, level) + √α z, z ~ N(0, I).  x: [B, ...]."""
    z = jax.random.normal(key, x.shape, x.dtype)
    return x + 0.5 * alpha * score_fn(x, level) + jnp.sqrt(alpha) * z


def _langevin_level(
    score_fn: ScoreFn, x: jax.Array, sigmas: jax.Array, level, level_key, n_steps_each, step_lr
) -> jax.Array:
    """The ``n_steps_each`` Langevin steps of one level: α_i = ε σ_i² / σ_L²."""
    alpha = step_lr * (sigmas[level] / sigmas[-1]) ** 2
    labels = jnp.full(x.shape[:1], level, jnp.int32)  # [B]
    step = lambda x, k: (langevin_step(score_fn, x, labels, alpha, k), None)
    x, _ = jax.lax.scan(step, x, jax.random.split(level_key, n_steps_each))
    return x


def _check_langevin(sigmas: jax.Array, n_steps_each: int, step_lr) -> None:
    _check_count("n_steps_each", n_steps_each)
    _check_positive("step_lr", step_lr)
    concrete = _concrete(sigmas)
    if sigmas.ndim != 1 or sigmas.shape[0] < 1:
        raise ValueError(f"sigmas must be a non-empty 1-D array, got shape {sigmas.shape}")
    if concrete is not None and (np.any(concrete <= 0) or np.any(np.diff(concrete) > 0)):
        raise ValueError(f"sigmas must be positive and decreasing, got {concrete}")


def annealed_langevin(
    score_fn: ScoreFn,
    x_init: jax.Array,
    sigmas: jax.Array,
    key: jax.Array,
    n_steps_each: int,
    step_lr: float,
    *,
    return_all: bool = False,
    denoise: bool = False,
) -> jax.Array:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).

        for i = 1 … L:   α_i = ε σ_i² / σ_L²
            repeat T times:   x ← x + (α_i/2) s(x, i) + √α_i z,   z ~ N(0, I)

    with ε = ``step_lr`` and T = ``n_steps_each``; two nested ``lax.scan``s. ``score_fn(x, i)``
    receives the zero-based level index i into ``sigmas`` as int32 [B] (σ_1 = sigmas[0] is the
    largest). ``denoise`` adds the final step x ← x + σ_L² s(x, L) (Tweedie's formula, as in
    Jolicoeur-Martineau et al. 2021), which removes the last level's noise.

    sigmas: decreasing, positive [L]; x_init: [B, ...]. Returns the final x [B, ...], or with
    ``return_all`` the state after each level [L, B, ...] (its last entry is the final x).
    """
    sigmas = jnp.asarray(sigmas, x_init.dtype)
    _check_langevin(sigmas, n_steps_each, step_lr)
    num_levels = sigmas.shape[0]

    def level_loop(x, inputs):
        level, level_key = inputs
        x = _langevin_level(score_fn, x, sigmas, level, level_key, n_steps_each, step_lr)
        return x, x

    inputs = (jnp.arange(num_levels), jax.random.split(key, num_levels))
    x, xs = jax.lax.scan(level_loop, x_init, inputs)  # [B, ...], [L, B, ...]
    if denoise:
        x = langevin_denoise(score_fn, x, sigmas)
    return xs.at[-1].set(x) if return_all else x


def annealed_langevin_levels(
    score_fn: ScoreFn,
    x: jax.Array,
    sigmas: jax.Array,
    key: jax.Array,
    n_steps_each: int,
    step_lr: float,
    start: jax.Array | int,
    count: int,
) -> jax.Array:
    """Levels start, ..., start+count-1 (those < L) of ``annealed_langevin`` with the same
    ``key``: running all L levels in segments gives its result (without ``denoise``).
    ``start`` may be traced, so one compilation runs any segment of ``count`` levels."""
    sigmas = jnp.asarray(sigmas, x.dtype)
    _check_langevin(sigmas, n_steps_each, step_lr)
    num_levels = sigmas.shape[0]
    keys = jax.random.split(key, num_levels)

    def body(j, x):
        level = jnp.asarray(start, jnp.int32) + j
        run = lambda x: _langevin_level(
            score_fn, x, sigmas, level, keys[level], n_steps_each, step_lr
        )
        return jax.lax.cond(level < num_levels, run, lambda x: x, x)

    return jax.lax.fori_loop(0, count, body, x)


def langevin_denoise(score_fn: ScoreFn, x: jax.Array, sigmas: jax.Array) -> jax.Array:
    """Tweedie's formula at the last level: x ← x + σ_L² s(x, L)."""
    last = jnp.full(x.shape[:1], sigmas.shape[0] - 1, jnp.int32)
    return x + sigmas[-1] ** 2 * score_fn(x, last)


def ncsn_score_fn(net: Callable, sigmas: jax.Array) -> ScoreFn:
    """s(x, i) = net(x, i) / σ_i: the NCSNv2 parametrisation of a level-conditioned score."""

    def score_fn(x, level):
        level = jnp.broadcast_to(level, x.shape[:1]).astype(jnp.int32)  # [B]
        sigma = sigmas[level].reshape((-1,) + (1,) * (x.ndim - 1))
        return net(x, level) / sigma

    return score_fn
