"""The probability-flow ODE module against independent references.

Gaussian data x0 ~ N(mu, C), C = Q diag(v) Q^T, has a closed-form probability-flow ODE. In the VE
variables y = x / alpha, s = sigma / alpha (y = x0 + s eps), the exact E[eps | y] is
s (C + s^2 I)^{-1} (y - mu), so dy/ds = E[eps | y] moves each eigen-coordinate
z_k = Q_k^T (y - mu) as z_k(s) = z_k(s0) sqrt((v_k + s^2) / (v_k + s0^2)): the exact map between
two noise levels, the same whatever the time parametrisation (so the samplers' continuous time
and ``ddim_sample_loop``'s integer steps solve the same ODE), and the exact denoiser there is
D(y; s) = mu + C (C + s^2 I)^{-1} (y - mu). Every sampler here ends with D at t = 0, so each is
compared with  x_T -> exact flow from s(T-1) to s(0) -> D(.; s(0)).  The flow is affine, so the
ODE's log-density is log N(x_T; 0, I) + log|det dx_T/dx|, in closed form too.

The exact eps model below evaluates log abar(t) at real t by its own interpolation of the float64
log cumprod(1 - beta) (the continuous-time model of Lu et al. 2022 that ``ode`` implements), in
the model's dtype; references are float64 NumPy / SciPy.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as dl
from diffusion_jax import ode, samplers, schedules

T = 1000
BETAS = schedules.get_beta_schedule("linear", T)
# Nearly noise-free at t = 0 (sigma^2 = 1e-7) and nearly pure noise at T-1 (abar ~ 1e-11): the
# ODE's density at t = 0 is the data density itself to ~1e-5 nats.
BETAS_WIDE = schedules.get_beta_schedule("linear", T, beta_start=1e-7, beta_end=0.05)


class Gaussian:
    """x0 ~ N(mu, cov) and its closed forms (module docstring), float64 NumPy."""

    def __init__(self, mu, cov, betas=BETAS):
        self.mu, self.cov = np.asarray(mu, np.float64), np.asarray(cov, np.float64)
        self.v, self.q = np.linalg.eigh(self.cov)  # [D], [D, D]
        self.log_abar = np.cumsum(np.log1p(-betas))  # [T]

    def s2(self, t: int) -> float:
        """(sigma / alpha)^2 = 1 / abar - 1 at an integer step."""
        return float(np.expm1(-self.log_abar[t]))

    def flow_y(self, y, s2_from, s2_to):
        """The exact ODE map of y = x / alpha between VE noise levels s^2 (s2_from may be 0)."""
        z = (y - self.mu) @ self.q * np.sqrt((self.v + s2_to) / (self.v + s2_from))
        return self.mu + z @ self.q.T

    def denoise(self, y, s2):
        z = (y - self.mu) @ self.q * (self.v / (self.v + s2))
        return self.mu + z @ self.q.T

    def sample_reference(self, x_T):
        """x_T at t = T-1 -> exact ODE to t = 0 -> D(.; s(0))."""
        a_T = np.exp(self.log_abar[-1])
        y0 = self.flow_y(np.asarray(x_T, np.float64) / np.sqrt(a_T), self.s2(T - 1), self.s2(0))
        return self.denoise(y0, self.s2(0))

    def invert_reference(self, x0):
        """data (s = 0) -> exact ODE to x_T at t = T-1."""
        y = self.flow_y(np.asarray(x0, np.float64), 0.0, self.s2(T - 1))
        return np.exp(0.5 * self.log_abar[-1]) * y

    def ode_log_density(self, x):
        """log p_0(x) of the ODE model, x at t = 0: log N(x_T; 0, I) + log|det dx_T/dx|."""
        a0, a_T = np.exp(self.log_abar[0]), np.exp(self.log_abar[-1])
        y_T = self.flow_y(np.asarray(x, np.float64) / np.sqrt(a0), self.s2(0), self.s2(T - 1))
        x_T = np.sqrt(a_T) * y_T
        growth = np.sqrt((self.v + self.s2(T - 1)) / (self.v + self.s2(0)))
        log_det = np.sum(np.log(np.sqrt(a_T / a0) * growth))
        return stats.multivariate_normal(np.zeros(len(self.mu))).logpdf(x_T) + log_det

    def draw(self, n, seed):
        return np.random.default_rng(seed).multivariate_normal(self.mu, self.cov, size=n)

    def eps_model(self, dtype=jnp.float32):
        """The exact E[eps | x_t] at real t (x [B, D], t [B])."""
        table = jnp.asarray(self.log_abar, dtype)
        mu, v, q = (jnp.asarray(a, dtype) for a in (self.mu, self.v, self.q))

        def model_fn(x, t):
            g = _lerp(table, t.astype(dtype))[:, None]  # [B, 1]
            a, s2 = jnp.exp(g), -jnp.expm1(g)
            z = (x - jnp.sqrt(a) * mu) @ q / (a * v + s2)  # [B, D]
            return jnp.sqrt(s2) * z @ q.T

        return model_fn


def _lerp(table, t):
    """table[t] linearly interpolated at real t in [0, len - 1]."""
    k = jnp.clip(jnp.floor(t), 0, table.shape[0] - 2).astype(jnp.int32)
    return table[k] + (t - k) * (table[k + 1] - table[k])


def _random_cov(dim, seed, floor=0.02):
    a = np.random.default_rng(seed).normal(size=(dim, dim)) * 0.3
    return a @ a.T + floor * np.eye(dim)


DIAG = Gaussian([0.1, -0.2, 0.3, 0.0], np.diag([0.01, 0.09, 0.5, 1.0]))
FULL = Gaussian([0.1, -0.2, 0.3], _random_cov(3, 0))
FULL_WIDE = Gaussian(FULL.mu, FULL.cov, BETAS_WIDE)


_DIAG_EPS = DIAG.eps_model()


def toy_eps(x, t):
    """A nonlinear stand-in for a network: DIAG's exact eps plus a bump (x [B, 4], real t [B])."""
    return _DIAG_EPS(x, t) + 0.05 * jnp.sin(3.0 * x)


def count_calls(model_fn):
    """model_fn that counts its executions (once per batch call) in ``counter[0]``."""
    counter = [0]

    def bump(_):
        counter[0] += 1

    def counted(x, t):
        jax.debug.callback(bump, t)
        return model_fn(x, t)

    return counted, counter


# ----------------------------------------------------------------------------------------------
# Continuous time


def test_continuous_time_interpolates_log_abar_and_inverts_exactly():
    d = dl.GaussianDiffusion.create(BETAS)
    log_abar = np.cumsum(np.log1p(-BETAS))
    t = np.array([0.0, 0.25, 1.0, 3.5, 499.9, 998.5, 999.0])
    g = np.interp(t, np.arange(T), log_abar)  # float64 reference
    np.testing.assert_allclose(ode.log_alpha_cumprod(d, t), g, rtol=1e-5, atol=1e-9)
    alpha, sigma = ode.alpha_sigma(d, t)
    np.testing.assert_allclose(alpha, np.exp(g / 2), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.sqrt(-np.expm1(g)), rtol=1e-5)
    lam = 0.5 * (g - np.log(-np.expm1(g)))
    np.testing.assert_allclose(ode.lambda_from_t(d, t), lam, rtol=1e-5)
    np.testing.assert_allclose(ode.sigma_from_t(d, t), np.exp(-lam), rtol=1e-5)
    # Inverses, and monotone clamping outside [0, T-1].
    np.testing.assert_allclose(ode.t_from_lambda(d, lam), t, rtol=1e-4, atol=2e-3)
    np.testing.assert_allclose(ode.t_from_sigma(d, np.exp(-lam)), t, rtol=1e-4, atol=2e-3)
    assert float(ode.t_from_lambda(d, 50.0)) == 0.0 and float(ode.t_from_sigma(d, 1e6)) == T - 1
    # A respaced chain calls the network at the interpolated original steps.
    dr = dl.respace(d, np.array([0, 10, 30]))
    np.testing.assert_allclose(ode.model_time(dr, np.array([0.5, 1.25, 2.0])), [5, 15, 30])


def _as_mean_type(eps_fn, mean_type, learned):
    """The exact eps model rewritten to predict x0 or v (with this file's own alpha, sigma at
    real t), optionally with a (zero) learned-variance half appended."""
    table = jnp.asarray(DIAG.log_abar, jnp.float32)

    def model_fn(x, t):
        eps = eps_fn(x, t)
        lg = _lerp(table, t)[:, None]
        alpha, sigma = jnp.exp(lg / 2), jnp.sqrt(-jnp.expm1(lg))
        x0 = (x - sigma * eps) / alpha
        out = {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[mean_type]
        return jnp.concatenate([out, jnp.zeros_like(out)], -1) if learned else out

    return model_fn


def test_every_mean_type_gives_the_eps_models_predictions():
    """eps_and_x0 (which every ODE sampler and the likelihood go through) reads x0-, v- and
    learned-variance outputs as the eps model; one sampler run end to end with a v model."""
    g = DIAG
    eps_fn = g.eps_model()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    t = jnp.array([0.0, 0.5, 10.25, 500.0, 999.0], jnp.float32)
    d0 = dl.GaussianDiffusion.create(BETAS)
    eps0, x00 = ode.eps_and_x0(d0, eps_fn, x, t)
    a_t = np.exp(np.interp(t, np.arange(T), g.log_abar))[:, None]  # float64 reference
    np.testing.assert_allclose(x00, (x - np.sqrt(1 - a_t) * eps0) / np.sqrt(a_t), rtol=1e-4)
    for mean_type, learned in (("x0", False), ("v", False), ("eps", True), ("v", True)):
        var_type = "learned_range" if learned else "fixedlarge"
        d = dl.GaussianDiffusion.create(BETAS, mean_type=mean_type, var_type=var_type)
        eps, x0 = ode.eps_and_x0(d, _as_mean_type(eps_fn, mean_type, learned), x, t)
        np.testing.assert_allclose(eps, eps0, rtol=1e-3, atol=1e-4, err_msg=mean_type)
        np.testing.assert_allclose(x0, x00, rtol=1e-3, atol=1e-4, err_msg=mean_type)
    d = dl.GaussianDiffusion.create(BETAS, mean_type="v", var_type="learned_range")
    run = jax.jit(
        lambda d, f, x: ode.heun_sample(d, f, x, 9, clip_denoised=False), static_argnums=1
    )
    np.testing.assert_allclose(
        run(d, _as_mean_type(eps_fn, "v", True), x), run(d0, eps_fn, x), atol=2e-4
    )


# ----------------------------------------------------------------------------------------------
# Samplers: order of convergence against the exact ODE solution


def _sampler(name):
    """A jitted sampler (d, model, x_T, network calls) -> x0, no clipping."""
    if name == "dpmpp_2m":
        fn = lambda d, f, x_T, n: ode.dpmpp_2m_sample(d, f, x_T, n, clip_denoised=False)
    elif name == "heun":
        fn = lambda d, f, x_T, n: ode.heun_sample(d, f, x_T, n, clip_denoised=False)
    else:
        fn = lambda d, f, x_T, n: dl.ddim_sample_loop(
            d, f, x_T.shape, jax.random.key(0), n, x_T=x_T, clip_denoised=False
        )
    return jax.jit(fn, static_argnums=(1, 3))


@pytest.mark.parametrize(
    "name, calls, lo, hi",
    [
        ("dpmpp_2m", (20, 40, 80), 3.0, 5.5),  # second order: error / 4 per doubling
        ("heun", (39, 79, 159), 3.0, 5.5),  # N = 20, 40, 80 steps
        ("ddim", (40, 80, 160), 1.6, 2.5),  # first order (DDIM eta = 0 = Euler in sigma/alpha)
    ],
)
def test_samplers_converge_to_the_exact_ode_solution_at_their_order(name, calls, lo, hi):
    """RMS error against the exact Gaussian flow map + denoiser (module docstring), float64 so
    that round-off stays far below the discretisation error; the ratio of errors when the
    network calls double is ~2^order. DDIM walks the respaced integer steps, whose end points
    are those of the continuous path (t = T-1 and t = 0), so it solves the same ODE. The same
    sampler in float32 (the product's setting) matches float64 at the fewest calls."""
    g = DIAG
    x_T = np.random.default_rng(0).normal(size=(16, 4))
    ref = g.sample_reference(x_T)
    run = _sampler(name)
    d32 = dl.GaussianDiffusion.create(BETAS)
    got32 = (
        run(d32, g.eps_model(), jnp.asarray(x_T, jnp.float32), calls[0]) if name != "ddim" else None
    )
    with jax.enable_x64(True):
        d = dl.GaussianDiffusion.create(BETAS, dtype=jnp.float64)
        model = g.eps_model(jnp.float64)
        outs = [np.asarray(run(d, model, jnp.asarray(x_T), n)) for n in calls]
    errs = np.array([np.sqrt(np.mean((out - ref) ** 2)) for out in outs])
    ratios = errs[:-1] / errs[1:]
    assert np.all((ratios > lo) & (ratios < hi)), (errs, ratios)
    if got32 is not None:  # (ddim_sample_loop's float32 is tested in test_diffusion)
        np.testing.assert_allclose(got32, outs[0], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Samplers: segments, network calls, argument checks

SEGMENT_D = dl.GaussianDiffusion.create(BETAS)
SEGMENT_CASES = {  # name: (init, step, sample, number of steps for num_steps = 9)
    "dpmpp_2m": (samplers.dpmpp_2m_init, samplers.dpmpp_2m_step, ode.dpmpp_2m_sample, 9),
    "heun": (samplers.heun_init, samplers.heun_step, ode.heun_sample, 5),
}


@functools.cache
def _whole_sample(name):
    x_T = jax.random.normal(jax.random.key(3), (4, 4))
    return x_T, SEGMENT_CASES[name][2](SEGMENT_D, toy_eps, x_T, 9, clip_denoised=False)


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun"])
@pytest.mark.parametrize("count", [1, 4, 13])
def test_segments_rebuild_the_whole_sampler(name, count):
    """X_steps over [0, count), [count, 2 count), ... (start traced; the last segment runs past
    the end, skipped) from X_init give X_sample: DPM-Solver++(2M) with 9 steps, Heun with
    num_steps = 9 calls (N = 5 steps)."""
    init, step_of, _, total = SEGMENT_CASES[name]
    x_T, whole = _whole_sample(name)
    step = step_of(dl.DiscreteProcess(SEGMENT_D), toy_eps, 9, clip_denoised=False)
    run = jax.jit(lambda s, start: samplers.run_steps(step, s, start, count, total))
    state = init(x_T)
    for start in range(0, total, count):
        state = run(state, start)
    np.testing.assert_allclose(state["x"], whole, rtol=1e-5, atol=1e-6)
    assert not np.allclose(whole, x_T)


def test_network_calls_are_as_documented():
    d = SEGMENT_D
    x = jax.random.normal(jax.random.key(3), (4, 4))
    model, counter = count_calls(toy_eps)
    cases = (
        (lambda: ode.dpmpp_2m_sample(d, model, x, 7), 7),
        (lambda: ode.heun_sample(d, model, x, 7), 7),  # N = 4: 3 Heun steps + 1 Euler
        (lambda: ode.ddim_invert(d, model, x, 6), 6),
    )
    for fn, want in cases:
        counter[0] = 0
        jax.block_until_ready(jax.jit(fn)())
        assert counter[0] == want, (want, counter[0])
    assert samplers.heun_num_steps(7) == samplers.heun_num_steps(8) == 4  # 8 calls: one left unused


def test_one_call_samplers_return_the_denoised_prior_sample():
    """num_steps = 1: both samplers return D(x_T; T-1)."""
    g = DIAG
    d = dl.GaussianDiffusion.create(BETAS)
    x_T = np.random.default_rng(2).normal(size=(8, 4))
    a_T = np.exp(g.log_abar[-1])
    want = g.denoise(x_T / np.sqrt(a_T), g.s2(T - 1))
    for name in ("dpmpp_2m", "heun"):
        got = _sampler(name)(d, g.eps_model(), jnp.asarray(x_T, jnp.float32), 1)
        np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_clip_denoised_keeps_samples_in_range():
    d = SEGMENT_D
    x_T = 3.0 * jax.random.normal(jax.random.key(0), (8, 3))
    wide = lambda x, t: -2.0 * x  # x0 predictions far outside [-1, 1]
    t = jnp.full((8,), 99.0)
    assert np.max(np.abs(ode.eps_and_x0(d, wide, x_T, t)[1])) > 10.0
    eps, x0 = ode.eps_and_x0(d, wide, x_T, t, clip_denoised=True)  # eps recomputed from x0
    alpha, sigma = ode.alpha_sigma(d, t)
    np.testing.assert_allclose(alpha[:, None] * x0 + sigma[:, None] * eps, x_T, atol=1e-4)
    assert np.max(np.abs(x0)) == 1.0
    for fn in (ode.dpmpp_2m_sample, ode.heun_sample):
        out = jax.jit(lambda x, fn=fn: fn(d, wide, x, 5, clip_denoised=True))(x_T)
        assert np.max(np.abs(out)) <= 1.0 + 1e-6 and np.max(np.abs(out)) > 0.5


def test_bad_arguments_name_the_value_and_the_allowed_ones():
    d = dl.GaussianDiffusion.create(schedules.get_beta_schedule("cosine", 20))
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"num_steps .* int >= 1, got 0"):
        ode.dpmpp_2m_sample(d, toy_eps, x, 0)
    with pytest.raises(ValueError, match=r"num_steps .* got 2.5"):
        ode.heun_sample(d, toy_eps, x, 2.5)
    with pytest.raises(ValueError, match=r"rho must be > 0, got 0"):
        ode.heun_sample(d, toy_eps, x, 3, rho=0.0)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 20\], got 21"):
        ode.ddim_invert(d, toy_eps, x, 21)
    with pytest.raises(
        ValueError, match=r"Unknown trace 'jvp'; allowed: \['hutchinson', 'exact'\]"
    ):
        ode.ode_log_likelihood(d, toy_eps, x, jax.random.key(0), trace="jvp")
    with pytest.raises(ValueError, match=r"Unknown probe 'normal'; allowed: \['rademacher', "):
        ode.ode_log_likelihood(d, toy_eps, x, jax.random.key(0), probe="normal")
    with pytest.raises(ValueError, match=r"num_bins must be an int >= 2, got 1"):
        ode.ode_bpd(d, toy_eps, x, jax.random.key(0), num_bins=1)


# ----------------------------------------------------------------------------------------------
# DDIM inversion


def test_ddim_inversion_with_two_steps_is_the_documented_update():
    """K = 2 (steps t = 0, T-1), float64 NumPy: x_0 = sqrt(a_0) x0 + sqrt(1 - a_0) eps(sqrt(a_0)
    x0, 0), then x_T = sqrt(a_T) x0_hat + sqrt(1 - a_T) eps with eps = eps(x_0, 0) and
    x0_hat = (x_0 - sqrt(1 - a_0) eps) / sqrt(a_0)."""
    g = DIAG
    x0 = g.draw(6, 9)
    a0, a_T = np.exp(g.log_abar[0]), np.exp(g.log_abar[-1])

    def eps(x, a):  # the exact eps of DIAG at abar = a, float64
        return np.sqrt(1 - a) * (x - np.sqrt(a) * g.mu) / (a * g.v + 1 - a)

    x_first = np.sqrt(a0) * x0 + np.sqrt(1 - a0) * eps(np.sqrt(a0) * x0, a0)
    e = eps(x_first, a0)
    x0_hat = (x_first - np.sqrt(1 - a0) * e) / np.sqrt(a0)
    want = np.sqrt(a_T) * x0_hat + np.sqrt(1 - a_T) * e
    with jax.enable_x64(True):
        d = dl.GaussianDiffusion.create(BETAS, dtype=jnp.float64)
        got = ode.ddim_invert(d, g.eps_model(jnp.float64), jnp.asarray(x0), 2)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_ddim_inversion_reconstructs_and_converges_to_the_exact_flow():
    """ddim_sample_loop(x_T = ddim_invert(x0)) gives x0 back, and ddim_invert(x0) approaches the
    exact flow of x0 from s = 0 to t = T-1, both with errors falling ~1/K (float64)."""
    g = DIAG
    with jax.enable_x64(True):
        d = dl.GaussianDiffusion.create(BETAS, dtype=jnp.float64)
        model = g.eps_model(jnp.float64)
        x0 = g.draw(16, 4)
        exact_x_T = g.invert_reference(x0)
        invert = jax.jit(ode.ddim_invert, static_argnums=(1, 3))
        sample = _sampler("ddim")
        rec_err, inv_err = [], []
        for k in (40, 80, 160):
            x_T = invert(d, model, jnp.asarray(x0), k)
            back = sample(d, model, x_T, k)
            rec_err.append(np.max(np.abs(np.asarray(back) - x0)))
            inv_err.append(np.max(np.abs(np.asarray(x_T) - exact_x_T)))
    for errs in (np.array(rec_err), np.array(inv_err)):
        ratios = errs[:-1] / errs[1:]
        assert np.all((ratios > 1.6) & (ratios < 2.5)), (errs, ratios)


# ----------------------------------------------------------------------------------------------
# Likelihood


def test_ode_log_likelihood_with_exact_trace_is_the_exact_density():
    """float32, rtol = atol = 1e-5: the ODE model's log-density at t = 0 (exact flow map and
    Jacobian, module docstring) to 1e-3 nats, and the network evaluation count is exact."""
    g = FULL
    d = dl.GaussianDiffusion.create(BETAS)
    x = g.draw(16, 5)
    model, counter = count_calls(g.eps_model())
    fn = jax.jit(lambda x, key: ode.ode_log_likelihood(d, model, x, key, trace="exact"))
    logp, nfe = fn(jnp.asarray(x, jnp.float32), jax.random.key(0))
    np.testing.assert_allclose(logp, g.ode_log_density(x), atol=1e-3)
    # The first call also traced/compiled; count the second run's executions only.
    counter[0] = 0
    jax.block_until_ready(fn(jnp.asarray(x, jnp.float32), jax.random.key(0)))
    assert int(nfe) == counter[0] and 20 < int(nfe) < 500, (int(nfe), counter[0])


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_likelihood_is_unbiased_within_its_standard_error(probe):
    """64 examples, one probe each: the mean error against the exact log-density lies within 3
    standard errors (over examples) of 0, and the probes do vary the estimate."""
    g = FULL
    d = dl.GaussianDiffusion.create(BETAS)
    x = g.draw(64, 6)
    fn = jax.jit(
        lambda x: ode.ode_log_likelihood(d, g.eps_model(), x, jax.random.key(1), probe=probe)
    )
    logp, _ = fn(jnp.asarray(x, jnp.float32))
    err = np.asarray(logp, np.float64) - g.ode_log_density(x)
    se = err.std(ddof=1) / math.sqrt(len(err))
    assert err.std() > 1e-2, err.std()
    assert abs(err.mean()) < 3 * se + 1e-3, (err.mean(), se)


def test_ode_likelihood_is_the_data_density_when_the_schedule_ends_are_clean():
    """With sigma^2(t=0) = 1e-7 and abar(T-1) ~ 1e-11 the ODE density at t = 0 is N(mu, C)."""
    g = FULL_WIDE
    d = dl.GaussianDiffusion.create(BETAS_WIDE)
    x = g.draw(16, 7)
    logp, _ = jax.jit(
        lambda x: ode.ode_log_likelihood(d, g.eps_model(), x, jax.random.key(0), trace="exact")
    )(jnp.asarray(x, jnp.float32))
    want = stats.multivariate_normal(g.mu, g.cov).logpdf(x)
    np.testing.assert_allclose(logp, want, atol=2e-3)


def test_ode_bpd_bounds_the_discrete_nll_of_binned_gaussian_data():
    """Diagonal Gaussian data rounded to 33 levels; with the clean schedule the model's bin
    probabilities are products of normal CDF differences, the exact discrete NLL. The ODE
    bits/dim of 256 dequantized copies of 4 points, averaged per point, lies within 3 standard
    errors above it (Jensen's gap is O(delta^2 / var) ~ 1e-3 bits here)."""
    num_bins, delta = 33, 1.0 / 32
    g = Gaussian([0.1, -0.3], np.diag([0.04, 0.25]), BETAS_WIDE)
    levels = np.clip(np.round((g.draw(4, 8) + 1) / (2 * delta)), 0, num_bins - 1)
    x0 = 2 * delta * levels - 1  # [4, 2] on the grid
    sd = np.sqrt(np.diag(g.cov))
    cdf = lambda z: stats.norm.cdf(z)
    p_bin = cdf((x0 + delta - g.mu) / sd) - cdf((x0 - delta - g.mu) / sd)
    want = -np.log2(p_bin).sum(axis=1) / 2  # [4] bits/dim
    copies = np.repeat(x0, 256, axis=0)  # [1024, 2]
    out = jax.jit(
        lambda x: ode.ode_bpd(
            d=dl.GaussianDiffusion.create(BETAS_WIDE),
            model_fn=g.eps_model(),
            x0=x,
            key=jax.random.key(2),
            num_bins=num_bins,
            trace="exact",
        )
    )(jnp.asarray(copies, jnp.float32))
    bpd = np.asarray(out["bpd"], np.float64).reshape(4, 256)
    se = bpd.std(axis=1, ddof=1) / 16
    gap = bpd.mean(axis=1) - want
    assert np.all(gap > -3 * se) and np.all(gap < 3 * se + 5e-3), (gap, se)
    assert out["nfe"] > 0


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M) SDE and the lower-order final step


def _sde(d, f, x_T, key, n, eta=1.0, lower_order_final=False):
    return ode.dpmpp_2m_sde_sample(
        d, f, x_T, key, n, eta=eta, clip_denoised=False, lower_order_final=lower_order_final
    )


def test_dpmpp_2m_sde_samples_the_data_law():
    """With the exact eps of Gaussian data, x at t = 0 ~ N(sqrt(a0) mu, a0 C + (1 - a0) I)
    and the returned D(x; s0) = mu + C (C + s0^2)^-1 (y - mu) is N(mu, C^2 / (C + s0^2)) per
    eigen-coordinate (DIAG's C is diagonal): 4,000 samples of 40 calls match that law's mean and
    variance within 4 standard errors (+2 % for the discretisation), from any x_T. A noise term
    of the wrong size (e.g. sqrt(1 - e^{-eta h}) for sqrt(1 - e^{-2 eta h})) fails it."""
    g = DIAG
    d = dl.GaussianDiffusion.create(BETAS)
    n = 4000
    x_T = jax.random.normal(jax.random.key(0), (n, 4))
    out = np.asarray(jax.jit(lambda x, k: _sde(d, g.eps_model(), x, k, 40))(x_T, jax.random.key(1)))
    s0 = g.s2(0)
    var = g.v**2 / (g.v + s0)  # [4]
    np.testing.assert_array_less(np.abs(out.mean(0) - g.mu), 4 * np.sqrt(var / n))
    rel = out.var(0, ddof=1) / var - 1.0
    np.testing.assert_array_less(np.abs(rel), 4 * np.sqrt(2.0 / n) + 0.02)


def test_dpmpp_2m_sde_is_stochastic_and_its_eta_0_is_the_ode_solver():
    d = SEGMENT_D
    x_T = jax.random.normal(jax.random.key(3), (4, 4))
    ode_out = ode.dpmpp_2m_sample(d, toy_eps, x_T, 9, clip_denoised=False)
    zero = _sde(d, toy_eps, x_T, jax.random.key(0), 9, eta=0.0)
    np.testing.assert_allclose(zero, ode_out, rtol=1e-6, atol=1e-6)
    a = _sde(d, toy_eps, x_T, jax.random.key(0), 9)
    b = _sde(d, toy_eps, x_T, jax.random.key(1), 9)
    assert not np.allclose(a, b) and not np.allclose(a, ode_out)
    np.testing.assert_array_equal(a, _sde(d, toy_eps, x_T, jax.random.key(0), 9))
    with pytest.raises(ValueError, match=r"eta .* must be >= 0, got -1"):
        _sde(d, toy_eps, x_T, jax.random.key(0), 9, eta=-1.0)


@pytest.mark.parametrize("count", [1, 4])
def test_dpmpp_2m_sde_segments_rebuild_the_whole_sampler(count):
    d = SEGMENT_D
    x_T = jax.random.normal(jax.random.key(3), (4, 4))
    key = jax.random.key(5)
    whole = _sde(d, toy_eps, x_T, key, 9)
    process = dl.DiscreteProcess(d)
    step = samplers.dpmpp_2m_step(process, toy_eps, 9, clip_denoised=False, eta=1.0, key=key)
    run = jax.jit(lambda s, start: samplers.run_steps(step, s, start, count, 9))
    state = samplers.dpmpp_2m_init(x_T)
    for start in range(0, 9, count):
        state = run(state, start)
    np.testing.assert_allclose(state["x"], whole, rtol=1e-5, atol=1e-6)


def test_lower_order_final_makes_the_last_interval_first_order_below_10_steps():
    """c (the second-order coefficient) of the step into t_{M-1} is 0 with lower_order_final
    when M - 1 < 10 intervals, and the rest of the schedule is unchanged; from 10 intervals on
    the option changes nothing."""
    d = SEGMENT_D
    for m in (3, 8, 10, 11, 20):
        base = samplers.dpmpp_2m_schedule(dl.DiscreteProcess(d), m)
        low = samplers.dpmpp_2m_schedule(dl.DiscreteProcess(d), m, lower_order_final=True)
        want = np.asarray(base["c"]).copy()
        if m <= 10:
            assert want[m - 2] > 0
            want[m - 2] = 0.0
        np.testing.assert_array_equal(low["c"], want)
        for k in ("t", "a", "b", "n"):
            np.testing.assert_array_equal(low[k], base[k])
    x_T = jax.random.normal(jax.random.key(3), (4, 4))
    for m, changes in ((8, True), (11, False)):
        a, b = (ode.dpmpp_2m_sample(d, toy_eps, x_T, m, False, low) for low in (False, True))
        assert np.allclose(a, b) != changes, m
