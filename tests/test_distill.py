"""The distillation target (Salimans & Ho 2022, Algorithm 2), exactly, in float64: the teacher is
the closed-form denoiser of Gaussian data, its two DDIM steps and the target are recomputed here
in NumPy from the schedule's own definition, and the project's DDIM step driven by the target
lands on the teacher's two steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import distill, samplers, schedules, vdm

T = 1000
MU, S = 0.3, 0.5  # the data: x0 ~ N(MU, S^2) per dimension
GAMMA_MIN, GAMMA_MAX = -10.0, 5.0  # the continuous process: a linear gamma(t)


def _log_abar_np(t):
    """log abar at real t of the linear schedule, by its definition: the running sum of
    log(1 - beta) at the integer steps, linearly interpolated."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    return np.interp(t, np.arange(T), np.cumsum(np.log1p(-betas)))


def _alpha_sigma_np(kind, t):
    if kind == "discrete":
        g = _log_abar_np(t)
        return np.sqrt(np.exp(g)), np.sqrt(-np.expm1(g))
    gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * np.asarray(t)
    return np.sqrt(1 / (1 + np.exp(gamma))), np.sqrt(1 / (1 + np.exp(-gamma)))


def _denoise_np(z, alpha, sigma):
    """E[x0 | z_t] for x0 ~ N(MU, S^2): MU + alpha S^2 (z - alpha MU) / (alpha^2 S^2 + sigma^2)."""
    return MU + alpha * S**2 * (z - alpha * MU) / (alpha**2 * S**2 + sigma**2)


def _process(kind, mean_type="eps"):
    """(process, the teacher: the exact denoiser as an eps-model of the process's own time)."""
    if kind == "discrete":
        betas = schedules.get_beta_schedule("linear", T)
        d = dl.GaussianDiffusion.create(betas, mean_type=mean_type, dtype=jnp.result_type(float))
        process = dl.DiscreteProcess(d)
        table = jnp.asarray(np.cumsum(np.log1p(-betas)))

        def alpha_sigma(t):
            g = jnp.interp(t, jnp.arange(T, dtype=t.dtype), table)
            return jnp.sqrt(jnp.exp(g)), jnp.sqrt(-jnp.expm1(g))
    else:

        def gamma_fn(t):
            return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t

        process = vdm.ContinuousProcess(gamma_fn)

        def alpha_sigma(t):
            gamma = gamma_fn(t)
            return jnp.sqrt(jax.nn.sigmoid(-gamma)), jnp.sqrt(jax.nn.sigmoid(gamma))

    def teacher(z, t):  # [B, ...], t [B]
        alpha, sigma = (v.reshape((-1,) + (1,) * (z.ndim - 1)) for v in alpha_sigma(t))
        x0 = MU + alpha * S**2 * (z - alpha * MU) / (alpha**2 * S**2 + sigma**2)
        return (z - alpha * x0) / sigma

    return process, teacher


def _case(kind, num_steps, k):
    """The teacher's grid of 2N times, noisiest first, and z_t [len(k), 4, 4, 1]."""
    t_max = T - 1.0 if kind == "discrete" else 1.0
    t_grid = t_max * np.arange(2 * num_steps, 0, -1) / (2 * num_steps)  # [2N]
    return t_grid, np.random.default_rng(0).normal(size=(len(k), 4, 4, 1))


def _points_np(kind, t_grid, num_steps, k):
    """(alpha, sigma) at the teacher's grid points 2k, 2k + 1, 2k + 2 (the end: 1, 0), each
    [len(k)], and whether 2k + 2 is the end."""
    (a_t, s_t), (a_m, s_m) = (_alpha_sigma_np(kind, t_grid[i]) for i in (2 * k, 2 * k + 1))
    last = 2 * k + 2 == 2 * num_steps
    a_s, s_s = _alpha_sigma_np(kind, t_grid[np.minimum(2 * k + 2, 2 * num_steps - 1)])
    return a_t, s_t, a_m, s_m, np.where(last, 1.0, a_s), np.where(last, 0.0, s_s), last


def _two_steps_np(z_t, points):
    """(the teacher's x0_hat at t, its two DDIM steps' z_s, the target x~), each [B, 4, 4, 1]:
    z' = a' x0_hat + s' (z - a x0_hat) / s, twice; x~ = (z_s - (s_s/s_t) z_t) / (a_s - (s_s/s_t)
    a_t)."""
    a_t, s_t, a_m, s_m, a_s, s_s, _ = (p[(slice(None),) + (None,) * 3] for p in points)
    x1 = _denoise_np(z_t, a_t, s_t)
    z_m = a_m * x1 + s_m * (z_t - a_t * x1) / s_t
    x2 = _denoise_np(z_m, a_m, s_m)
    z_s = a_s * x2 + s_s * (z_m - a_m * x2) / s_m
    ratio = s_s / s_t
    return x1, z_s, (z_s - ratio * z_t) / (a_s - ratio * a_t)


@pytest.mark.parametrize("kind", ["discrete", "continuous"])
def test_the_target_stepped_by_ddim_reproduces_the_teachers_two_steps(kind):
    num_steps = 8  # the student's; the teacher's grid has 16
    k = np.array([0, 1, 3, 5, 7])  # student steps: the noisiest, middle ones and the last
    t_grid, z_t = _case(kind, num_steps, k)
    # The reference: the teacher's two DDIM steps and the target, in NumPy.
    points = _points_np(kind, t_grid, num_steps, k)
    a_t, s_t, _, _, a_s, s_s, last = points
    b = (slice(None),) + (None,) * 3
    _, z_s_ref, target_ref = _two_steps_np(z_t, points)

    with jax.enable_x64(True):
        process, teacher = _process(kind)
        grid = distill.distillation_grid(process, 2 * num_steps)
        assert grid.t.dtype == jnp.float64
        np.testing.assert_allclose(grid.t, t_grid, rtol=1e-15)
        np.testing.assert_allclose(grid.alpha[2 * k], a_t, rtol=1e-12)
        np.testing.assert_allclose(grid.sigma[2 * k + 2], s_s, rtol=1e-12, atol=1e-15)
        z = jnp.asarray(z_t)
        z_s = distill.teacher_two_steps(process, teacher, z, 2 * num_steps, jnp.asarray(k))
        np.testing.assert_allclose(z_s, z_s_ref, rtol=1e-10, atol=1e-12)
        kk = jnp.asarray(k)
        target = distill.distillation_target(
            z, z_s, grid.alpha[2 * kk], grid.sigma[2 * kk], grid.alpha[2 * kk + 2],
            grid.sigma[2 * kk + 2],
        )  # fmt: skip
        np.testing.assert_allclose(target, target_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(target[last], z_s_ref[last], rtol=1e-12)  # sigma_s = 0

        # The student: an x0-model whose prediction is the target, one step of samplers'
        # DDIM from t to s (a ChainStep built here), lands where the teacher's two did.
        if kind == "discrete":
            student_process, _ = _process(kind, mean_type="x0")
        else:  # ContinuousProcess is an eps-model: the eps that gives x0_hat = target
            student_process = process
        a_t_b, s_t_b = a_t[b], s_t[b]

        def student(x, t):
            if kind == "discrete":
                return target
            return (x - a_t_b * target) / s_t_b

        abar_s = jnp.asarray(a_s[b] ** 2)
        step = samplers.ChainStep(jnp.asarray(t_grid[2 * k]), None, 0, abar_s, 0 * abar_s)
        landed, x0_hat = samplers.ddim_update(
            student_process, student, z, step, jax.random.key(0), eta=0.0, clip_denoised=False
        )
        np.testing.assert_allclose(x0_hat, target_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(landed, z_s_ref, rtol=1e-10, atol=1e-12)

        # A student equal to the teacher's single step from t to s misses: its loss is > 0,
        # far above float64 rounding (the target agrees with its reference to 1e-10 relative,
        # a squared error of ~1e-20).
        teacher_x0 = _denoise_np(z_t, a_t_b, s_t_b)
        miss = np.mean((np.asarray(target) - teacher_x0) ** 2, axis=(1, 2, 3))  # [B]
        assert np.all(miss > 1e-8), miss


def test_the_loss_is_zero_at_the_target_and_the_teachers_single_step_misses():
    """``distillation_loss`` (z_t drawn from x0 and eps, the teacher's two steps, the target, the
    weight), against the same chain computed in NumPy; N traced under jit."""
    num_steps, kind = 4, "discrete"
    k = np.array([0, 1, 2, 3])
    t_grid, noise = _case(kind, num_steps, k)
    x0 = np.random.default_rng(1).normal(MU, S, size=noise.shape)
    b = (slice(None),) + (None,) * 3
    points = _points_np(kind, t_grid, num_steps, k)
    a_t, s_t = points[:2]
    z_t = a_t[b] * x0 + s_t[b] * noise
    # one_step: the teacher's own x0_hat at t, its single DDIM step's prediction.
    one_step, _, target = _two_steps_np(z_t, points)
    weight = (a_t / s_t) ** 2 + 1  # snr_plus_one

    with jax.enable_x64(True):
        process, teacher = _process(kind)
        student_process, _ = _process(kind, mean_type="x0")

        def loss(prediction, n):
            return distill.distillation_loss(
                student_process, lambda x, t: jnp.asarray(prediction), process, teacher,
                jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(k), n, "snr_plus_one",
                clip_denoised=False,
            )  # fmt: skip

        at_target = jax.jit(loss)(target, num_steps)  # N traced
        assert at_target.dtype == jnp.float64
        np.testing.assert_array_less(np.abs(at_target), 1e-18)
        missed = loss(one_step, num_steps)
        ref = weight * np.mean((target - one_step) ** 2, axis=(1, 2, 3))
        np.testing.assert_allclose(missed, ref, rtol=1e-9)
        assert np.all(ref > 1e-8), ref


def test_the_grid_at_a_traced_size_is_the_static_grid():
    process, _ = _process("discrete")
    grid = distill.distillation_grid(process, 8)
    points = jax.jit(lambda n, i: distill.grid_point(process, n, i))(8, jnp.arange(9))
    np.testing.assert_allclose(points[0][:-1], grid.t, rtol=1e-6)
    np.testing.assert_allclose(points[1], grid.alpha, rtol=1e-6)
    np.testing.assert_allclose(points[2], grid.sigma, rtol=1e-6, atol=1e-7)


def test_halving_the_grid_keeps_its_even_points():
    process, _ = _process("discrete")
    fine = distill.distillation_grid(process, 16)
    coarse = distill.distillation_grid(process, 8)
    np.testing.assert_allclose(coarse.t, fine.t[::2], rtol=1e-6)
    np.testing.assert_allclose(coarse.alpha, fine.alpha[::2], rtol=1e-6)
    assert coarse.alpha[-1] == 1 and coarse.sigma[-1] == 0
    with pytest.raises(ValueError, match=r"num_steps must be an int >= 1, got 0"):
        distill.distillation_grid(process, 0)


def test_the_weights_are_their_formulas():
    alpha = jnp.array([0.1, 0.6, 0.99])
    sigma = jnp.sqrt(1 - alpha**2)
    snr = (alpha / sigma) ** 2
    np.testing.assert_allclose(
        distill.distillation_weight(alpha, sigma, "truncated_snr"), [1.0, 1.0, snr[2]], rtol=1e-6
    )
    np.testing.assert_allclose(
        distill.distillation_weight(alpha, sigma, "snr_plus_one"), snr + 1, rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"'snr'; allowed: \('truncated_snr', 'snr_plus_one'\)"):
        distill.distillation_weight(alpha, sigma, "snr")
