"""The continuous-time maths core (``diffusion_jax.vdm``) against exact truth: Gaussian data with
its exact denoiser, where −log p(x), the posterior, the probability-flow map and every
expectation over ε and t are known in closed form or by quadrature (float64)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import samplers, schedules, timesteps, vdm

S = 0.5  # data x ~ N(MU, S^2) per dimension
MU = 0.3


def exact_eps(mu=MU, s=S):
    """ε̂(z_t, γ_t) = E[ε | z_t] for x ~ N(mu, s²): z_t ~ N(α mu, α² s² + σ²)."""

    def eps(z, gamma):
        g = gamma.reshape(gamma.shape + (1,) * (z.ndim - gamma.ndim))
        a2, s2 = jax.nn.sigmoid(-g), jax.nn.sigmoid(g)
        return jnp.sqrt(s2) * (z - jnp.sqrt(a2) * mu) / (a2 * s**2 + s2)

    return eps


def model_of(gamma_fn, mu=MU, s=S):
    eps = exact_eps(mu, s)
    return lambda z, t: eps(z, gamma_fn(t))


def gauss_hermite(n=8):
    """Nodes and weights of E over N(0, 1) (exact for polynomials of degree < 2n)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


def gauss_legendre_01(pieces=64, n=16):
    """Composite Gauss–Legendre nodes and weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    edges = np.linspace(0.0, 1.0, pieces + 1)
    nodes = (edges[:-1, None] + (x[None] + 1) / 2 * np.diff(edges)[:, None]).ravel()
    weights = (w[None] / 2 * np.diff(edges)[:, None]).ravel()
    return nodes, weights


def _expect(loss_fn, x, t_nodes, t_weights):
    """Σ_t w_t E_ε[loss_fn(x, t, ε)] [B] with every (example, t) pair in one batch."""
    eps_nodes, eps_w = gauss_hermite()
    b, n = x.shape[0], len(t_nodes)
    xr = jnp.repeat(x, n, axis=0)  # [B n, 1]
    tr = jnp.tile(jnp.asarray(t_nodes, x.dtype), b)  # [B n]
    total = 0.0
    for e, we in zip(eps_nodes, eps_w, strict=True):
        total = total + we * np.asarray(loss_fn(xr, tr, jnp.full(xr.shape, e, x.dtype)))
    return (total.reshape(b, n) * np.asarray(t_weights)).sum(axis=1)


def expected_diffusion(gamma_fn, x, mu=MU, s=S):
    """E_{t ~ U(0,1), ε}[½ γ'(t) ‖ε − ε̂‖²] for each x [B, 1] by quadrature, via
    vdm.diffusion_loss."""
    t_nodes, t_w = gauss_legendre_01()
    model = model_of(gamma_fn, mu, s)
    return _expect(lambda x, t, e: vdm.diffusion_loss(model, gamma_fn, x, t, e), x, t_nodes, t_w)


def expected_finite(gamma_fn, x, num_steps, mu=MU, s=S):
    """E_{i ~ U{1..T}, ε}[the T-step diffusion term] (exact sum over i), via vdm."""
    model = model_of(gamma_fn, mu, s)
    t_nodes = np.arange(1, num_steps + 1) / num_steps
    return _expect(
        lambda x, t, e: vdm.finite_diffusion_loss(model, gamma_fn, x, t, e, num_steps),
        x,
        t_nodes,
        np.full(num_steps, 1.0 / num_steps),
    )


def test_continuous_bound_is_minus_log_likelihood_in_the_limit():
    """VDM appendix: with the exact ε̂ the bound is tight as γ_min → −∞, γ_max → ∞. The data are
    continuous here, so L_0 is the Gaussian decoder's E[−log N(x; z_0/α_0, e^{γ_0})]."""
    with jax.enable_x64(True):
        x = jnp.asarray([[-1.2], [0.0], [0.3], [0.9]], jnp.float64)
        reference = 0.5 * np.log(2 * np.pi * S**2) + (np.asarray(x[:, 0]) - MU) ** 2 / (2 * S**2)
        gaps = []
        for lo, hi in ((-6.0, 6.0), (-12.0, 12.0), (-30.0, 30.0)):

            def gamma_fn(t, lo=lo, hi=hi):
                return vdm.gamma_linear(t, lo, hi)

            diffusion = expected_diffusion(gamma_fn, x)
            decoder = 0.5 * np.log(2 * np.pi * np.exp(lo)) + 0.5
            prior = np.asarray(vdm.prior_loss(x, jnp.full((4,), hi)))
            bound = diffusion + decoder + prior  # bounds -log p_model(x), not -log p_data(x)
            gaps.append(np.max(np.abs(bound - reference)))
        assert gaps[0] > gaps[1] > gaps[2]
        assert gaps[2] < 1e-8, gaps


def test_finite_bound_decreases_to_the_continuous_one():
    """L_2T ≤ L_T (VDM eq. 11–12, over the data: the denoiser's error grows with the noise) and
    L_T → L_∞ as T grows; exact sums over i, x over the data by Gauss–Hermite."""
    with jax.enable_x64(True):
        nodes, weights = gauss_hermite(12)
        x = jnp.asarray(MU + S * nodes[:, None], jnp.float64)  # [12, 1]

        def gamma_fn(t):
            return vdm.gamma_linear(t, -8.0, 6.0)

        cont = float(weights @ expected_diffusion(gamma_fn, x))
        finite = [
            float(weights @ expected_finite(gamma_fn, x, n)) for n in (1, 2, 4, 8, 16, 64, 256)
        ]
        assert all(b <= a for a, b in zip(finite, finite[1:], strict=False)), finite
        assert finite[-1] >= cont
        gaps = [f - cont for f in finite]
        assert gaps[-1] < 1e-3 * gaps[0], gaps
        assert 0.2 < gaps[-1] / gaps[-2] < 0.3, gaps  # O(1/T): T x 4, the gap / 4


def test_diffusion_loss_does_not_depend_on_the_schedule_shape():
    """VDM eq. 14: between fixed endpoints the expected continuous loss is the same for any
    monotone γ (linear, cosine, a learned monotone network), by quadrature."""
    with jax.enable_x64(True):
        x = jnp.asarray([[-0.9], [0.2], [1.1]], jnp.float64)
        lo, hi = -7.0, 5.0
        params = vdm.init_monotone_params(jax.random.key(3), hidden=16)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        params["w3"] = params["w3"] * 40.0  # a clearly non-linear shape
        params["b2"] = jax.random.normal(jax.random.key(4), (16,), jnp.float64) * 3.0
        shapes = {
            "linear": lambda t: vdm.gamma_linear(t, lo, hi),
            "cosine": lambda t: vdm.gamma_cosine(t, lo, hi),
            "learned": lambda t: vdm.gamma_learned(params, t, lo, hi),
        }
        t = jnp.linspace(0.0, 1.0, 11)
        assert np.max(np.abs(shapes["learned"](t) - shapes["linear"](t))) > 0.3  # not linear
        for fn in shapes.values():
            np.testing.assert_allclose(fn(jnp.asarray([0.0, 1.0])), [lo, hi], atol=1e-10)
        values = {k: expected_diffusion(fn, x) for k, fn in shapes.items()}
        for k in ("cosine", "learned"):
            np.testing.assert_allclose(values[k], values["linear"], rtol=1e-7)


def test_beta_linear_is_the_continuous_form_of_ddpm_linear():
    betas = schedules.get_beta_schedule("linear", 1000)
    abar = np.cumprod(1 - betas)
    discrete = np.log((1 - abar) / abar)  # γ of steps 1..T
    t = np.arange(1000) / 999.0
    with jax.enable_x64(True):
        cont = np.asarray(vdm.gamma_beta_linear(jnp.asarray(t), 1e-4, 0.02, 1000))
    np.testing.assert_allclose(cont, discrete, atol=0.1)
    assert abs(cont[0] - discrete[0]) < 1e-3  # γ(0): log(β_1 / (1 − β_1))


def test_posterior_is_gaussian_conditioning():
    """q(z_s | z_t, x) against the conditional of the joint Gaussian (z_s, z_t) given x."""
    with jax.enable_x64(True):
        gs, gt = jnp.asarray([-3.0, 0.5]), jnp.asarray([-1.0, 4.0])
        x = jnp.asarray([[0.4], [-0.8]])
        z_t = jnp.asarray([[0.1], [1.3]])
        mean, var = vdm.q_posterior(x, z_t, gs, gt)
        a_s, s_s = np.sqrt(1 / (1 + np.exp(gs))), np.sqrt(1 / (1 + np.exp(-gs)))
        a_t, s_t = np.sqrt(1 / (1 + np.exp(gt))), np.sqrt(1 / (1 + np.exp(-gt)))
        a_ts = a_t / a_s
        cov = a_ts * s_s**2  # Cov(z_s, z_t | x)
        ref_mean = a_s * x[:, 0] + cov / s_t**2 * (z_t[:, 0] - a_t * x[:, 0])
        ref_var = s_s**2 - cov**2 / s_t**2
        np.testing.assert_allclose(mean[:, 0], ref_mean, rtol=1e-12)
        np.testing.assert_allclose(var.reshape(-1), ref_var, rtol=1e-12)


def test_reconstruction_and_prior_terms():
    num_bins = 5
    levels = 2 * np.arange(num_bins) / (num_bins - 1) - 1
    x = jnp.asarray([[levels[1], levels[4]]], jnp.float32)  # [1, 2]
    noise = jnp.asarray([[0.3, -1.1]], jnp.float32)
    g0 = -2.0
    got = float(vdm.reconstruction_loss(x, jnp.asarray([g0]), noise, num_bins)[0])
    a, s = math.sqrt(1 / (1 + math.exp(g0))), math.sqrt(1 / (1 + math.exp(-g0)))
    ref = 0.0
    for xi, ei, k in ((levels[1], 0.3, 1), (levels[4], -1.1, 4)):
        zr = (a * xi + s * ei) / a
        logits = -0.5 * np.exp(-g0) * (zr - levels) ** 2
        ref -= logits[k] - np.log(np.sum(np.exp(logits)))
    assert got == pytest.approx(ref, rel=1e-5)
    # Sharp decoder: no loss when the noise is far below the level spacing.
    assert float(vdm.reconstruction_loss(x, jnp.asarray([-14.0]), noise, num_bins)[0]) < 1e-6
    g1 = 3.0
    kl = float(vdm.prior_loss(x, jnp.asarray([g1]))[0])
    a2, s2 = 1 / (1 + math.exp(g1)), 1 / (1 + math.exp(-g1))
    ref_kl = sum(0.5 * (s2 + a2 * v**2 - math.log(s2) - 1) for v in (levels[1], levels[4]))
    assert kl == pytest.approx(ref_kl, rel=1e-6)


def test_bound_terms_estimate_is_unbiased():
    """vdm.bound_terms' stratified K-t estimate averages to the quadrature value (digits-like
    8 levels data, the exact denoiser of the Gaussian fit): mean over many keys within 4 standard
    errors, in bits/dim."""
    with jax.enable_x64(True):
        x = jnp.asarray([[0.25], [-0.5]], jnp.float64)

        def gamma_fn(t):
            return vdm.gamma_linear(t, -6.0, 4.0)

        model = model_of(gamma_fn)
        truth = expected_diffusion(gamma_fn, x) / math.log(2)
        keys = jax.random.split(jax.random.key(0), 400)
        draws = jax.vmap(
            lambda k: vdm.bound_terms(model, gamma_fn, x, k, num_bins=9, num_t=4)["diffusion"]
        )(keys)  # [400, 2]
        mean = np.asarray(draws.mean(0))
        se = np.asarray(draws.std(0)) / math.sqrt(400)
        assert np.all(np.abs(mean - truth) < 4 * se + 1e-9), (mean, truth, se)


def _pf_ode_target(z1, lo, hi):
    """The probability-flow map of N(MU, S²) data: the standardised value is kept."""
    g = np.asarray([lo, hi])
    a2, s2 = 1 / (1 + np.exp(g)), 1 / (1 + np.exp(-g))
    m, v = np.sqrt(a2) * MU, a2 * S**2 + s2
    return m[0] + np.sqrt(v[0]) * (z1 - m[1]) / np.sqrt(v[1])


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("dpmpp_2m", 2), ("heun", 2)])
def test_deterministic_samplers_converge_at_their_order(solver, order):
    """The samplers of ``samplers`` on continuous time (``vdm.ContinuousProcess``) converge to
    the probability-flow map at their order: DDIM (eta = 0) and DPM-Solver++(2M) to z_0 at
    t = 0; Heun, whose last step goes to sigma = 0, to x_hat(z_0) there."""
    with jax.enable_x64(True):
        lo, hi = -5.0, 5.0

        def gamma_fn(t):
            return vdm.gamma_linear(t, lo, hi)

        model = model_of(gamma_fn)
        z1 = jnp.asarray([[-1.5], [0.2], [1.0]], jnp.float64)
        target = _pf_ode_target(np.asarray(z1), lo, hi)
        if solver == "heun":  # x_hat(z_0, t = 0)
            t0 = jnp.zeros((3,), jnp.float64)
            target = np.asarray(vdm.predict_x(target, gamma_fn(t0), model(target, t0)))
        errs = []
        for n in (16, 32, 64, 128):
            process = vdm.ContinuousProcess(gamma_fn).chain(n)
            if solver == "ddim":
                update = functools.partial(
                    samplers.ddim_update, process, model, eta=0.0, clip_denoised=False
                )
                step = samplers.chain_step_fn(process, update, jax.random.key(0))
                z0 = samplers.run_steps(lambda i, z, step=step: step(i, z)[0], z1, 0, n, n)
            elif solver == "dpmpp_2m":
                step = samplers.dpmpp_2m_step(process, model, n, clip_denoised=False)
                z0 = samplers.run_steps(step, samplers.dpmpp_2m_init(z1), 0, n, n)["x"]
            else:
                z0 = samplers.heun_sample(process, model, z1, 2 * n, clip_denoised=False)
            errs.append(np.max(np.abs(np.asarray(z0) - target)))
        rates = np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:]))
        assert np.all(np.abs(rates - order) < 0.3), (errs, rates)
        assert errs[-1] < 1e-2


def test_ancestral_sampler_converges_weakly_at_order_one():
    """The chain's final variance, propagated exactly through ancestral steps' linear
    Gaussian steps (z_s = a z_t + b + c ξ, read off the step at z_t = 0 and 1 with its own
    noise ξ), against the variance of z_0 under the data."""
    with jax.enable_x64(True):
        lo, hi = -5.0, 5.0

        def gamma_fn(t):
            return vdm.gamma_linear(t, lo, hi)

        model = model_of(gamma_fn)
        pts = jnp.asarray([[0.0], [1.0]], jnp.float64)
        target_var = MU * 0 + S**2 / (1 + np.exp(lo)) + 1 / (1 + np.exp(-lo))
        errs = []
        for n in (8, 16, 32, 64):
            mean, var = 0.0, 1.0  # z_1 ~ N(0, 1), the sampler's start
            process = vdm.ContinuousProcess(gamma_fn).chain(n)
            for j in range(n):
                t, s = (n - j) / n, (n - j - 1) / n
                key = jax.random.key(j)
                xi = np.asarray(samplers.normal(key, pts.shape, pts.dtype))[:, 0]
                step = process.chain_step(jnp.int32(j), pts)
                out = samplers.ancestral_update(process, model, pts, step, key, False)[0]
                out = np.asarray(out)[:, 0]
                g_s, g_t = jnp.full((2,), gamma_fn(s)), jnp.full((2,), gamma_fn(t))
                c = float(np.sqrt(vdm.q_posterior(pts, pts, g_s, g_t)[1][0, 0]))
                b = out[0] - c * xi[0]
                a = out[1] - c * xi[1] - b
                mean, var = a * mean + b, a * a * var + c * c
            errs.append(abs(var - target_var))
        rates = np.log2(np.asarray(errs[:-1]) / np.asarray(errs[1:]))
        assert np.all(np.abs(rates - 1) < 0.3), (errs, rates)


def test_variance_gradient_is_that_of_the_batch_variance():
    def loss(rest, a, b):  # [B]
        return rest["w"] * a**2 + jnp.sin(b) * rest["v"]

    f = vdm.variance_gradient(loss)
    rest = {"w": jnp.asarray(1.3), "v": jnp.asarray(-0.4)}
    a, b = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([0.1, 0.7, -0.3])
    np.testing.assert_allclose(f(rest, a, b), loss(rest, a, b))
    g_rest, g_a, g_b = jax.grad(lambda *z: f(*z).sum(), argnums=(0, 1, 2))(rest, a, b)
    r_rest = jax.grad(lambda r: loss(r, a, b).sum())(rest)

    def spread(a, b):
        v = loss(rest, a, b)
        return jnp.sum((v - v.mean()) ** 2)

    r_a, r_b = jax.grad(spread, argnums=(0, 1))(a, b)
    np.testing.assert_allclose(g_a, r_a, rtol=1e-6)
    np.testing.assert_allclose(g_b, r_b, rtol=1e-6)
    for k in rest:
        np.testing.assert_allclose(g_rest[k], r_rest[k], rtol=1e-6)


def test_low_discrepancy_times_cover_the_interval():
    t = np.sort(np.asarray(timesteps.sample_continuous_t(jax.random.key(1), 8)))
    assert np.all((t >= 0) & (t < 1))
    np.testing.assert_allclose(np.diff(t), 1 / 8, atol=1e-6)
    u = np.asarray(timesteps.sample_continuous_t(jax.random.key(2), 1000, "uniform"))
    assert 0.45 < u.mean() < 0.55 and len(np.unique(u)) == 1000
    with pytest.raises(ValueError, match="sampler='sobol' is not one of"):
        timesteps.sample_continuous_t(jax.random.key(0), 4, "sobol")


def test_weightings():
    lam = jnp.asarray([-4.0, 0.0, 3.0])
    np.testing.assert_allclose(vdm.weight("elbo", lam), 1.0)
    np.testing.assert_allclose(
        vdm.weight("sigmoid", lam, bias=1.0), 1 / (1 + np.exp(lam - 1)), rtol=1e-6
    )
    np.testing.assert_allclose(
        vdm.weight("min_snr", lam, snr_gamma=5.0), np.minimum(1, 5 * np.exp(-np.asarray(lam)))
    )
    lam_np = np.asarray(lam)
    edm = (
        np.exp(-0.5 * ((lam_np - 2.4) / 2.4) ** 2)
        / (2.4 * np.sqrt(2 * np.pi))
        * (np.exp(-lam_np) + 0.25)
        / 0.25
    )
    np.testing.assert_allclose(vdm.weight("edm", lam), edm, rtol=1e-6)
    with pytest.raises(ValueError, match="weighting='p2' is not one of"):
        vdm.weight("p2", lam)


def test_monotone_shape_is_increasing_and_normalised():
    params = vdm.init_monotone_params(jax.random.key(0), hidden=32)
    params = jax.tree.map(lambda p: p * 5.0 - 1.0, params)  # signs and sizes of any kind
    t = jnp.linspace(0.0, 1.0, 257)
    s = np.asarray(vdm.normalised_shape(params, t))
    assert np.all(np.diff(s) > 0)
    np.testing.assert_allclose(s[[0, -1]], [0.0, 1.0], atol=1e-6)


def test_the_decoder_term_keeps_float64_data_in_float64():
    """L_0 of float64 data at 256 levels against NumPy in float64: the levels are computed in the
    data's dtype (in float32 they put the term 6.4e-4 relative off)."""
    num_bins = 256
    rng = np.random.default_rng(1)
    levels = rng.integers(0, num_bins, (4, 8))
    x = 2 * levels / (num_bins - 1) - 1.0
    g0, eps = np.full((4,), -13.3), rng.standard_normal((4, 8))
    with jax.enable_x64(True):
        got = np.asarray(
            vdm.reconstruction_loss(jnp.asarray(x), jnp.asarray(g0), jnp.asarray(eps), num_bins)
        )
    a = np.sqrt(1 / (1 + np.exp(g0)))[:, None]
    z = a * x + np.sqrt(1 / (1 + np.exp(-g0)))[:, None] * eps
    v = 2 * np.arange(num_bins) / (num_bins - 1) - 1.0
    logits = -0.5 * np.exp(-g0)[:, None, None] * (z[..., None] / a[..., None] - v) ** 2
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp, levels[..., None], -1)[..., 0].sum(-1)
    np.testing.assert_allclose(got, want, rtol=1e-9)
