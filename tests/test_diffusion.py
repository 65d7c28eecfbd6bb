"""The DDPM math core against independent references.

References are computed here in float64 NumPy / SciPy from the betas alone: closed forms, a grid
Bayes product, Monte Carlo, and the exact linear denoiser of Gaussian data:

  x0 ~ N(mu, s^2 I), x_t = sqrt(a) x0 + sqrt(1 - a) eps (a = abar_t)  =>  (eps, x_t) jointly
  Gaussian with Cov(eps, x_t) = sqrt(1 - a), Var(x_t) = a s^2 + 1 - a, so
  E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
  E[x0 | x_t] = mu + sqrt(a) s^2 (x_t - sqrt(a) mu) / (a s^2 + 1 - a),
  Var(x0 | x_t) = s^2 (1 - a) / (a s^2 + 1 - a),  Var(eps | x_t) = a s^2 / (a s^2 + 1 - a).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as dl
from diffusion_jax import samplers, schedules, timesteps

LN2 = math.log(2.0)
MU, SD = 0.1, 0.3  # the Gaussian data
BETAS_50 = schedules.get_beta_schedule("cosine", 50)
BETAS_1000 = schedules.get_beta_schedule("linear", 1000)


def make(mean_type="eps", var_type="fixedlarge", betas=BETAS_50, dtype=jnp.float32):
    return dl.GaussianDiffusion.create(betas, mean_type=mean_type, var_type=var_type, dtype=dtype)


def np_tables(betas):
    """Float64 reference tables from the betas, written out independently of the library."""
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return dict(
        abar=abar,
        abar_prev=abar_prev,
        post_var=post_var,
        coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        coef2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
    )


def gaussian_eps_model(d, mu=MU, var=SD**2):
    """The exact E[eps | x_t] for x0 ~ N(mu, var I) (module docstring), x of shape [B, D]."""

    def model_fn(x_t, t):
        a = d.alphas_cumprod[t][:, None]
        one_minus_a = jnp.square(d.sqrt_one_minus_alphas_cumprod[t])[:, None]
        return jnp.sqrt(one_minus_a) * (x_t - jnp.sqrt(a) * mu) / (a * var + one_minus_a)

    return model_fn


def chain_moments(abar, kind, m0, v0=1.0, mu=MU, var=SD**2, eta=0.0, fixedlarge=True):
    """Exact mean and variance after a reverse chain over steps with cumulative alphas ``abar``
    (increasing t) driven by the exact linear denoiser, from x_T ~ N(m0, v0); float64 NumPy.

    Each step is affine in x_t plus independent noise: x_s = L x_t + c + sigma z.
    """
    m, v = np.asarray(m0, np.float64), float(v0)
    for k in range(len(abar) - 1, -1, -1):
        a_t, a_s = abar[k], (abar[k - 1] if k > 0 else 1.0)
        v_t = a_t * var + 1.0 - a_t
        g = np.sqrt(a_t) * var / v_t  # x0_hat = mu + g (x_t - sqrt(a_t) mu)
        h = np.sqrt(1.0 - a_t) / v_t  # eps_hat = h (x_t - sqrt(a_t) mu)
        beta = 1.0 - a_t / a_s
        beta_tilde = beta * (1.0 - a_s) / (1.0 - a_t)
        if kind == "ancestral":
            c1, c2 = beta * np.sqrt(a_s) / (1.0 - a_t), (1.0 - a_s) * np.sqrt(1 - beta) / (1 - a_t)
            slope = c1 * g + c2
            offset = c1 * (mu - g * np.sqrt(a_t) * mu)
            sigma2 = (beta if fixedlarge else beta_tilde) if k > 0 else 0.0
        else:  # ddim
            sigma2 = eta**2 * beta_tilde
            r = np.sqrt(1.0 - a_s - sigma2)
            slope = np.sqrt(a_s) * g + r * h
            offset = np.sqrt(a_s) * (mu - g * np.sqrt(a_t) * mu) - r * h * np.sqrt(a_t) * mu
        m, v = slope * m + offset, slope**2 * v + sigma2
    return m, v


D50_SMALL = make(var_type="fixedsmall")
MODEL_50 = gaussian_eps_model(D50_SMALL)


# ----------------------------------------------------------------------------------------------
# The schedule pytree


def test_create_tables_match_float64_reference():
    d = make()
    ref = np_tables(BETAS_50)
    expected = {
        "betas": BETAS_50,
        "log_betas": np.log(BETAS_50),
        "alphas_cumprod": ref["abar"],
        "alphas_cumprod_prev": ref["abar_prev"],
        "sqrt_alphas_cumprod": np.sqrt(ref["abar"]),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ref["abar"]),
        "log_one_minus_alphas_cumprod": np.log(1 - ref["abar"]),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ref["abar"]),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ref["abar"] - 1),
        "posterior_variance": ref["post_var"],
        "posterior_log_variance_clipped": np.log(
            np.append(ref["post_var"][1], ref["post_var"][1:])
        ),
        "posterior_mean_coef1": ref["coef1"],
        "posterior_mean_coef2": ref["coef2"],
    }
    for name, value in expected.items():
        table = getattr(d, name)
        assert table.dtype == jnp.float32 and table.shape == (50,), name
        np.testing.assert_allclose(table, value, rtol=2e-6, atol=1e-30, err_msg=name)
    np.testing.assert_array_equal(d.timestep_map, np.arange(50))
    assert d.num_timesteps == 50 and (d.mean_type, d.var_type) == ("eps", "fixedlarge")
    leaves = jax.tree_util.tree_leaves(d)  # the parametrisation is static, not a leaf
    assert len(leaves) == 14 and all(isinstance(x, jax.Array) for x in leaves)
    one = make(betas=np.array([0.3]))  # T = 1: the clipped log variance falls back to log beta
    np.testing.assert_allclose(one.posterior_log_variance_clipped, np.log([0.3]), rtol=1e-6)


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match=r"'epsilon'.*'eps', 'x0', 'v'"):
        make(mean_type="epsilon")
    with pytest.raises(ValueError, match=r"'learned'.*'fixedlarge', 'fixedsmall', 'learned_range'"):
        make(var_type="learned")
    with pytest.raises(ValueError, match=r"\(0, 1\).*1\.0"):
        make(betas=np.array([0.1, 1.0]))
    d, x = make(), jnp.zeros((2, 4))
    t = jnp.zeros(2, jnp.int32)
    with pytest.raises(ValueError, match=r"'l2'.*'simple', 'vlb', 'hybrid', 'kl'"):
        dl.training_losses(d, lambda x, t: x, x, jax.random.key(0), loss_type="l2")
    with pytest.raises(ValueError, match="2x channels"):
        dl.p_mean_variance(make(var_type="learned_range"), lambda x, t: x, x, t)
    with pytest.raises(ValueError, match="shape"):
        dl.p_mean_variance(d, lambda x, t: x[:, :2], x, t)
    for k in (0, 51):
        with pytest.raises(ValueError, match=rf"num_steps must be in \[1, 50\], got {k}"):
            dl.space_timesteps(50, k)
    with pytest.raises(ValueError, match="increasing"):
        dl.respace(d, np.array([3, 2]))
    with pytest.raises(ValueError, match="< T = 50"):
        dl.respace(d, np.array([3, 50]))


# ----------------------------------------------------------------------------------------------
# Forward process and posterior


def test_q_sample_moments_match_q_mean_variance():
    d = make()
    t = jnp.array([0, 10, 30, 49], jnp.int32)
    n = 20_000
    x0 = jnp.broadcast_to(jnp.array([0.8, -0.3, 0.0, 1.0])[:, None], (4, n))  # [B, N]
    noise = jnp.asarray(np.random.default_rng(0).standard_normal((4, n)), jnp.float32)
    x_t = np.asarray(dl.q_sample(d, x0, t, noise))
    mean, var, log_var = (np.asarray(a)[:, 0] for a in dl.q_mean_variance(d, x0, t))
    np.testing.assert_allclose(np.exp(log_var), var, rtol=1e-5)
    assert np.all(np.abs(x_t.mean(1) - mean) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(x_t.var(1) / var - 1) < 5 * np.sqrt(2 / n))


@pytest.mark.parametrize("t", [1, 5, 25, 49])
def test_posterior_equals_grid_bayes_product(t):
    """q(x_{t-1} | x_t, x0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x0), normalised on a grid."""
    x0, x_t = 0.37, -0.4
    beta, abar_prev = BETAS_50[t], np.prod(1 - BETAS_50[:t])
    y = np.linspace(-10, 10, 400_001)  # x_{t-1}
    log_p = stats.norm.logpdf(x_t, np.sqrt(1 - beta) * y, np.sqrt(beta))
    log_p += stats.norm.logpdf(y, np.sqrt(abar_prev) * x0, np.sqrt(1 - abar_prev))
    p = np.exp(log_p - log_p.max())
    p /= np.trapezoid(p, y)
    grid_mean = np.trapezoid(y * p, y)
    grid_var = np.trapezoid((y - grid_mean) ** 2 * p, y)
    mean, var, log_var = dl.q_posterior_mean_variance(
        make(), jnp.full((1, 1), x0), jnp.full((1, 1), x_t), jnp.array([t], jnp.int32)
    )
    np.testing.assert_allclose(mean[0, 0], grid_mean, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(var[0, 0], grid_var, rtol=2e-5)
    np.testing.assert_allclose(log_var[0, 0], np.log(grid_var), atol=2e-5)


def test_posterior_at_t0_is_the_data_point():
    d = make()
    x0, x_t = jnp.array([[0.37, -1.0]]), jnp.array([[2.0, 0.5]])
    mean, var, log_var = dl.q_posterior_mean_variance(d, x0, x_t, jnp.zeros(1, jnp.int32))
    np.testing.assert_allclose(mean, x0, rtol=1e-6)
    np.testing.assert_array_equal(var, 0.0)
    np.testing.assert_allclose(log_var, np.log(np_tables(BETAS_50)["post_var"][1]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Parametrisations and model variances


T_MIX = jnp.array([0, 3, 10, 25, 40, 45], jnp.int32)


def _consistent_outputs(x_t, t, eps):
    """eps, x0 and v outputs that describe the same denoiser (float64 NumPy)."""
    a = np.cumprod(1 - BETAS_50)[np.asarray(t)][:, None]
    x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    return {"eps": eps, "x0": x0, "v": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}


def test_conversions_match_closed_forms():
    d = make()
    rng = np.random.default_rng(1)
    x_t, eps = rng.standard_normal((2, 6, 5))
    out = _consistent_outputs(x_t, T_MIX, eps)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        dl.predict_x0_from_eps(d, f32(x_t), T_MIX, f32(eps)), out["x0"], **tol
    )
    np.testing.assert_allclose(
        dl.predict_eps_from_x0(d, f32(x_t), T_MIX, f32(out["x0"])), eps, **tol
    )
    np.testing.assert_allclose(
        dl.predict_x0_from_v(d, f32(x_t), T_MIX, f32(out["v"])), out["x0"], **tol
    )
    np.testing.assert_allclose(dl.predict_eps_from_v(d, f32(x_t), T_MIX, f32(out["v"])), eps, **tol)
    np.testing.assert_allclose(dl.predict_v(d, f32(out["x0"]), T_MIX, f32(eps)), out["v"], **tol)


@pytest.mark.parametrize("var_type", ["fixedlarge", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_eps_x0_v_give_identical_posteriors(var_type, clip):
    rng = np.random.default_rng(2)
    x_t, eps = rng.standard_normal((2, 6, 5))
    var_part = np.tanh(rng.standard_normal((6, 5)))
    results = {}
    for mean_type, output in _consistent_outputs(x_t, T_MIX, eps).items():
        d = make(mean_type, var_type)
        if var_type == "learned_range":
            output = np.concatenate([output, var_part], axis=-1)
        output = jnp.asarray(output, jnp.float32)
        model = lambda x, t, o=output: o
        results[mean_type] = dl.p_mean_variance(
            d, model, jnp.asarray(x_t, jnp.float32), T_MIX, clip
        )
    for mean_type in ("x0", "v"):
        for key in ("mean", "variance", "log_variance", "pred_x0", "pred_eps"):
            np.testing.assert_allclose(
                results[mean_type][key], results["eps"][key], rtol=1e-4, atol=2e-5, err_msg=key
            )


def test_model_variances():
    ref = np_tables(BETAS_50)
    x = jnp.zeros((6, 3))
    v = np.linspace(-1, 1, 6)[:, None] * np.ones((1, 3))
    t = np.asarray(T_MIX)
    clipped = np.log(np.append(ref["post_var"][1], ref["post_var"][1:]))[t][:, None]
    large = np.log(np.append(ref["post_var"][1], BETAS_50[1:]))[t][:, None]
    expected = {
        "fixedsmall": clipped,
        "fixedlarge": large,
        "learned_range": (v + 1) / 2 * np.log(BETAS_50)[t][:, None] + (1 - v) / 2 * clipped,
    }
    for var_type, log_var in expected.items():
        out = jnp.concatenate([x, jnp.asarray(v, jnp.float32)], -1) if var_type[0] == "l" else x
        p = dl.p_mean_variance(make(var_type=var_type), lambda x, t, o=out: o, x, T_MIX)
        np.testing.assert_allclose(p["log_variance"], np.broadcast_to(log_var, (6, 3)), rtol=1e-5)
        np.testing.assert_allclose(p["variance"], np.exp(p["log_variance"]), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Losses


def _grid_data(rng, shape, num_bins=256):
    return jnp.asarray(2 * rng.integers(0, num_bins, shape) / (num_bins - 1) - 1, jnp.float32)


@pytest.mark.parametrize("var_type", ["fixedsmall", "fixedlarge"])
def test_vlb_equals_seed_weight_times_mse(var_type):
    """L_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - abar_t)) ||eps - eps_theta||^2 + C_t (t > 0),
    with C_t = D/2 (-1 + log(sigma_t^2 / beta~_t) + beta~_t / sigma_t^2) (0 for fixedsmall), and
    the discretised decoder at t = 0; bits/dim = nats / (D ln 2)."""
    d = make(var_type=var_type)
    rng = np.random.default_rng(3)
    B, D = 16, 8
    x0 = _grid_data(rng, (B, D))
    noise = jnp.asarray(rng.standard_normal((B, D)), jnp.float32)
    t = jnp.asarray(np.concatenate([[0, 0], rng.integers(1, 50, B - 2)]), jnp.int32)
    model = lambda x, t: 0.7 * x - 0.1  # any eps_theta
    out = {
        k: dl.training_losses(d, model, x0, jax.random.key(0), loss_type=k, t=t, noise=noise)
        for k in ("kl", "vlb", "simple")
    }
    ref, ti = np_tables(BETAS_50), np.asarray(t)
    a = ref["abar"][ti][:, None]
    x_t = np.sqrt(a) * np.asarray(x0, np.float64) + np.sqrt(1 - a) * np.asarray(noise, np.float64)
    eps_theta = 0.7 * x_t - 0.1
    sq = np.sum((np.asarray(noise, np.float64) - eps_theta) ** 2, axis=1)  # [B]
    tp = np.maximum(ti, 1)  # the KL formula at t > 0 (t = 0 rows use the decoder below)
    sigma2 = ref["post_var"][tp] if var_type == "fixedsmall" else BETAS_50[tp]
    beta, post = BETAS_50[tp], ref["post_var"][tp]
    weight = beta**2 / (2 * sigma2 * (1 - beta) * (1 - ref["abar"][tp]))
    const = D / 2 * (-1 + np.log(sigma2 / post) + post / sigma2)
    kl_bpd = (weight * sq + const) / (D * LN2)
    # t = 0: -log of the discretised N(x0_hat, beta~_1) decoder (mean coef1 = 1, coef2 = 0).
    x0_hat = (x_t - np.sqrt(1 - a) * eps_theta) / np.sqrt(a)
    delta, scale = 1 / 255, np.sqrt(ref["post_var"][1])
    x0n = np.asarray(x0, np.float64)
    lo = np.where(x0n < -1 + delta, -np.inf, x0n - delta)
    hi = np.where(x0n > 1 - delta, np.inf, x0n + delta)
    mass = stats.norm.cdf(hi, x0_hat, scale) - stats.norm.cdf(lo, x0_hat, scale)
    decoder_bpd = -np.log(np.maximum(mass, 1e-300)).mean(axis=1) / LN2  # used where t = 0
    expected = np.where(ti == 0, decoder_bpd, kl_bpd)
    np.testing.assert_allclose(out["kl"]["loss"], expected, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out["kl"]["vb"], out["kl"]["loss"])
    prior = 0.5 * (-1 - np.log(1 - ref["abar"][-1]) + (1 - ref["abar"][-1]))
    prior = (prior + 0.5 * ref["abar"][-1] * x0n**2).mean(axis=1) / LN2
    np.testing.assert_allclose(out["vlb"]["loss"], 50 * expected + prior, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(out["simple"]["loss"], sq / D, rtol=1e-5)


def test_prior_bpd_closed_form_and_in_vlb():
    """L_T = KL(N(sqrt(a_T) x0, 1 - a_T) || N(0, 1)) per dim, on a short chain where it is large;
    the vlb loss is T L_t + L_T."""
    betas = schedules.get_beta_schedule("linear", 10)
    d = make(betas=betas)
    x0 = _grid_data(np.random.default_rng(14), (5, 7))
    a_T = np.prod(1 - betas)
    kl = 0.5 * (-1 - np.log(1 - a_T) + (1 - a_T) + a_T * np.asarray(x0, np.float64) ** 2)
    prior = dl.prior_bpd(d, x0)
    np.testing.assert_allclose(prior, kl.mean(1) / LN2, rtol=1e-5)
    assert np.all(prior > 0.1)
    t = jnp.arange(5, dtype=jnp.int32) * 2
    model = lambda x, t: 0.5 * x
    kw = dict(t=t, noise=jnp.ones_like(x0))
    vlb = dl.training_losses(d, model, x0, jax.random.key(0), "vlb", **kw)
    kl_loss = dl.training_losses(d, model, x0, jax.random.key(0), "kl", **kw)
    np.testing.assert_allclose(vlb["loss"], 10 * kl_loss["loss"] + prior, rtol=1e-6)


def test_simple_loss_targets_for_x0_and_v():
    rng = np.random.default_rng(4)
    x0 = _grid_data(rng, (6, 5))
    noise = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    model = lambda x, t: 0.5 * x
    ref = np_tables(BETAS_50)
    a = ref["abar"][np.asarray(T_MIX)][:, None]
    x_t = np.sqrt(a) * np.asarray(x0) + np.sqrt(1 - a) * np.asarray(noise)
    v = np.sqrt(a) * np.asarray(noise) - np.sqrt(1 - a) * np.asarray(x0)
    for mean_type, target in (("x0", np.asarray(x0)), ("v", v)):
        out = dl.training_losses(
            make(mean_type), model, x0, jax.random.key(0), t=T_MIX, noise=noise
        )
        np.testing.assert_allclose(out["mse"], ((target - 0.5 * x_t) ** 2).mean(1), rtol=1e-4)
        np.testing.assert_allclose(out["loss"], out["mse"])


def test_hybrid_freezes_the_mean_in_the_bound():
    d = make(var_type="learned_range")
    rng = np.random.default_rng(5)
    x0 = _grid_data(rng, (8, 4))

    def loss(params, loss_type, key="loss"):
        w_mean, w_var = params
        model = lambda x, t: jnp.concatenate([w_mean * x, jnp.tanh(w_var * x)], axis=-1)
        out = dl.training_losses(d, model, x0, jax.random.key(1), loss_type=loss_type)
        return jnp.mean(out[key])

    @jax.jit
    def grads_and_values(params):
        grads = {k: jax.grad(loss)(params, k) for k in ("hybrid", "simple", "kl")}
        values = {k: loss(params, "hybrid", k) for k in ("loss", "mse", "vb")}
        return grads, values

    g, values = grads_and_values((jnp.float32(0.3), jnp.float32(0.5)))
    np.testing.assert_allclose(g["hybrid"][0], g["simple"][0], rtol=1e-6)  # mean: simple only
    np.testing.assert_allclose(g["hybrid"][1], dl.HYBRID_LAMBDA * 50 * g["kl"][1], rtol=1e-5)
    assert abs(float(g["kl"][1])) > 0 and abs(float(g["kl"][0])) > 0
    expected = values["mse"] + dl.HYBRID_LAMBDA * 50 * values["vb"]
    np.testing.assert_allclose(values["loss"], expected, rtol=1e-6)


def test_min_snr_weight_is_min_snr_gamma_on_the_x0_error():
    """Float64 NumPy from the betas: SNR = abar / (1 - abar); the eps weight min(SNR, 5) / SNR,
    x0 min(SNR, 5), v min(SNR, 5) / (SNR + 1); 1 where SNR <= gamma for eps."""
    betas = schedules.get_beta_schedule("linear", 50, beta_start=1e-4, beta_end=0.2)
    abar = np.cumprod(1 - betas)
    snr = abar / (1 - abar)
    t = jnp.arange(50, dtype=jnp.int32)
    want = {
        "eps": np.minimum(snr, 5) / snr,
        "x0": np.minimum(snr, 5),
        "v": np.minimum(snr, 5) / (snr + 1),
    }
    for mean_type, w in want.items():
        d = dl.GaussianDiffusion.create(betas, mean_type=mean_type)
        np.testing.assert_allclose(dl.min_snr_weight(d, t, 5.0), w, rtol=1e-4)
    assert dl.mse_weight(d, t, "none") is None
    with pytest.raises(ValueError, match=r"mse_weighting 'snr'; allowed: \['none', 'min_snr'\]"):
        dl.mse_weight(d, t, "snr")
    d = make(var_type="learned_range")
    x0 = _grid_data(np.random.default_rng(0), (8, 4))
    model = lambda x, t: jnp.concatenate([0.3 * x, jnp.tanh(x)], axis=-1)
    t = jnp.array([0, 1, 3, 7, 12, 20, 33, 49], jnp.int32)
    plain = dl.training_losses(d, model, x0, jax.random.key(1), t=t)
    weighted = dl.training_losses(
        d, model, x0, jax.random.key(1), t=t, mse_weighting="min_snr", min_snr_gamma=2.0
    )
    np.testing.assert_allclose(weighted["mse"], plain["mse"])  # reported unweighted
    np.testing.assert_allclose(
        weighted["loss"], dl.min_snr_weight(d, t, 2.0) * plain["mse"], rtol=1e-6
    )


def test_hybrid_with_its_own_t_for_the_vb_term():
    """t_vb: the mse term at t (noise as given), the vb term at t_vb with its own noise, times
    the weights; the network sees the 2B examples in one call. The two terms equal single-t
    losses computed apart; hybrid_train_mean lets the vb term train the mean too."""
    d = make(var_type="learned_range")
    x0 = _grid_data(np.random.default_rng(5), (8, 4))
    t = jnp.array([0, 1, 3, 7, 12, 20, 33, 49], jnp.int32)
    t_vb = jnp.array([49, 0, 2, 30, 5, 1, 17, 40], jnp.int32)
    weights = jnp.linspace(0.5, 2.0, 8)
    calls = []

    def model_of(params):
        w_mean, w_var = params

        def model(x, tt):
            calls.append(x.shape[0])
            return jnp.concatenate([w_mean * x + 0.01 * tt[:, None], jnp.tanh(w_var * x)], -1)

        return model

    key = jax.random.key(3)
    noise = jax.random.normal(jax.random.key(4), x0.shape)
    params = (jnp.float32(0.3), jnp.float32(0.5))
    out = dl.training_losses(
        d, model_of(params), x0, key, "hybrid", t=t, noise=noise, t_vb=t_vb, vb_weights=weights
    )
    assert calls == [16]
    apart = dl.training_losses(d, model_of(params), x0, key, "hybrid", t=t, noise=noise)
    np.testing.assert_allclose(out["mse"], apart["mse"], rtol=1e-6)
    noise_vb = samplers.normal(jax.random.fold_in(jax.random.split(key)[1], 1), x0.shape, x0.dtype)
    kl = dl.training_losses(d, model_of(params), x0, key, "kl", t=t_vb, noise=noise_vb)
    np.testing.assert_allclose(out["vb"], kl["vb"], rtol=1e-5)
    np.testing.assert_allclose(out["vb_loss"], 50 * kl["vb"], rtol=1e-5)
    expected = apart["mse"] + dl.HYBRID_LAMBDA * 50 * kl["vb"] * weights
    np.testing.assert_allclose(out["loss"], expected, rtol=1e-5)

    def mean_grad(train_mean):
        def f(p):
            o = dl.training_losses(
                d,
                model_of(p),
                x0,
                key,
                "hybrid",
                t=t,
                noise=noise,
                t_vb=t_vb,
                hybrid_lambda=0.1,
                hybrid_train_mean=train_mean,
            )
            return jnp.mean(o["loss"])

        return jax.grad(f)(params)[0]

    def simple_grad(p):
        return jnp.mean(dl.training_losses(d, model_of(p), x0, key, t=t, noise=noise)["loss"])

    np.testing.assert_allclose(mean_grad(False), jax.grad(simple_grad)(params)[0], rtol=1e-5)
    assert abs(float(mean_grad(True) - mean_grad(False))) > 1e-3
    with pytest.raises(ValueError, match="t_vb .* needs loss_type 'hybrid', got 'vlb'"):
        dl.training_losses(d, model_of(params), x0, key, "vlb", t_vb=t_vb)


def test_training_losses_sample_t_uniformly():
    """With zero noise and a model that outputs t, the eps-MSE is t^2: read t back."""
    d = make()
    x0 = jnp.zeros((4096, 1))
    model = lambda x, t: jnp.broadcast_to(t[:, None].astype(x.dtype), x.shape)
    out = jax.jit(lambda k: dl.training_losses(d, model, x0, k, noise=jnp.zeros_like(x0)))(
        jax.random.key(7)
    )
    assert all(v.shape == (4096,) for v in out.values())
    t = np.sqrt(np.asarray(out["mse"]))
    np.testing.assert_allclose(t, np.round(t), atol=1e-3)
    counts = np.bincount(np.round(t).astype(int), minlength=50)
    assert counts.shape == (50,) and counts.min() > 0 and stats.chisquare(counts).pvalue > 1e-4


# ----------------------------------------------------------------------------------------------
# Importance sampling of t


def test_loss_history_update_matches_a_fifo():
    history = timesteps.init_loss_history(5, history_per_t=3)
    t = jnp.array([1, 1, 4, 1, 1, 0], jnp.int32)
    losses = jnp.arange(6.0)
    history = jax.jit(timesteps.update_loss_history)(history, t, losses)
    expected = np.full((5, 3), np.nan)
    expected[1] = [1.0, 3.0, 4.0]  # the oldest (0.0) dropped
    expected[4, -1], expected[0, -1] = 2.0, 5.0
    np.testing.assert_array_equal(history, expected)


def test_importance_sampling():
    T, k = 10, 4
    rng = np.random.default_rng(6)
    # Not warm (a NaN slot left): uniform with unit weights.
    cold = timesteps.init_loss_history(T, k).at[:, :].set(1.0).at[3, 0].set(jnp.nan)
    t, w = timesteps.sample_t_importance(jax.random.key(0), cold, 1000)
    np.testing.assert_allclose(timesteps.importance_probs(cold), np.full(T, 0.1), rtol=1e-6)
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)
    # Warm: p_t ~ sqrt(mean L_t^2), mixed with 0.1% uniform.
    history = rng.uniform(0.1, 2.0, (T, k)) * np.arange(1, T + 1)[:, None]
    root_ms = np.sqrt((history**2).mean(1))
    p_ref = 0.999 * root_ms / root_ms.sum() + 0.001 / T
    p = timesteps.importance_probs(jnp.asarray(history, jnp.float32))
    np.testing.assert_allclose(p, p_ref, rtol=1e-5)
    t, w = jax.jit(timesteps.sample_t_importance, static_argnums=2)(
        jax.random.key(1), jnp.asarray(history, jnp.float32), 200_000
    )
    counts = np.bincount(np.asarray(t), minlength=T)
    assert stats.chisquare(counts, p_ref * t.shape[0]).pvalue > 1e-4
    np.testing.assert_allclose(w, 1 / (T * p_ref[np.asarray(t)]), rtol=1e-5)
    # Unbiased: E_p[w_t f(t)] = mean_t f(t), exactly and in the Monte-Carlo average.
    f = rng.standard_normal(T) + 3
    np.testing.assert_allclose((p_ref * (1 / (T * p_ref)) * f).sum(), f.mean(), rtol=1e-12)
    mc = np.mean(np.asarray(w) * f[np.asarray(t)])
    assert abs(mc - f.mean()) < 0.02 * f.mean()


# ----------------------------------------------------------------------------------------------
# The bound for Gaussian data with the exact denoiser (T = 1000, the paper's schedule)

D1000 = make(betas=BETAS_1000)
MODEL_1000 = gaussian_eps_model(D1000)
BPD_1000 = jax.jit(lambda x0, key: dl.calc_bpd_loop(D1000, MODEL_1000, x0, key))


def test_calc_bpd_loop_terms_use_fold_in_keys():
    """terms_bpd[:, t] and mse[:, t] are vb_terms_bpd / the eps-MSE at x_t = q_sample(x0, t, eps_t)
    with eps_t drawn (in float32) from fold_in(key, t)."""
    d, model = D50_SMALL, MODEL_50
    x0 = _grid_data(np.random.default_rng(13), (4, 6))
    key = jax.random.key(3)
    out = jax.jit(lambda x0, k: dl.calc_bpd_loop(d, model, x0, k))(x0, key)
    vb_terms = jax.jit(lambda x0, x_t, t: dl.vb_terms_bpd(d, model, x0, x_t, t))
    for t_i in (0, 1, 17, 49):
        t = jnp.full(4, t_i, jnp.int32)
        eps = jax.random.normal(jax.random.fold_in(key, t_i), x0.shape, jnp.float32)
        x_t = dl.q_sample(d, x0, t, eps)
        np.testing.assert_allclose(
            out["terms_bpd"][:, t_i], vb_terms(x0, x_t, t), rtol=1e-5, atol=1e-7
        )
        mse = np.mean((np.asarray(model(x_t, t)) - np.asarray(eps)) ** 2, axis=1)
        np.testing.assert_allclose(out["mse"][:, t_i], mse, rtol=1e-4)
    np.testing.assert_allclose(out["prior_bpd"], dl.prior_bpd(d, x0), rtol=1e-6)


def test_bound_terms_in_segments_are_those_of_one_pass():
    """bound_terms over t = s, ..., s + 7 with s traced (T = 50: the last segment runs past T and
    gives zeros there) rebuilds calc_bpd_loop's terms and MSE; x0_sq_err is the squared error of
    the clipped x0_hat on [0, 255] at the same x_t."""
    d, model = D50_SMALL, MODEL_50
    x0 = _grid_data(np.random.default_rng(14), (4, 6))
    key = jax.random.key(5)
    whole = dl.calc_bpd_loop(d, model, x0, key)
    seg = jax.jit(lambda s: dl.bound_terms(d, model, x0, key, s, 7))
    parts = [seg(s) for s in range(0, 50, 7)]  # 8 segments: 56 t, the last 6 past T
    for name in ("terms_bpd", "mse"):
        got = np.concatenate([p[name] for p in parts], axis=1)
        np.testing.assert_allclose(got[:, :50], whole[name], rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(got[:, 50:], 0.0)
    sq = np.concatenate([p["x0_sq_err"] for p in parts], axis=1)
    for t_i in (0, 23, 49):
        t = jnp.full(4, t_i, jnp.int32)
        eps = jax.random.normal(jax.random.fold_in(key, t_i), x0.shape, jnp.float32)
        x_t = dl.q_sample(d, x0, t, eps)
        x0_hat = np.clip(dl.predict_x0_from_eps(d, x_t, t, model(x_t, t)), -1, 1)
        want = np.mean((127.5 * (x0_hat - np.asarray(x0))) ** 2, axis=1)
        np.testing.assert_allclose(sq[:, t_i], want, rtol=1e-4, atol=1e-6)


def test_bound_is_above_and_close_to_exact_nll_of_discretised_gaussian():
    """Data: N(MU, SD^2) rounded to 256 bins in [-1, 1] (edges open): exact entropy H from the
    bin probabilities. E[bound] >= E[-log p_model] >= H; with the exact linear denoiser of the
    data's first two moments the gap is small."""
    num_bins, delta = 256, 1 / 255
    centres = 2 * np.arange(num_bins) / (num_bins - 1) - 1
    edges = np.concatenate([[-np.inf], centres[:-1] + delta, [np.inf]])
    probs = np.diff(stats.norm.cdf(edges, MU, SD))
    entropy_bpd = -(probs * np.log2(probs)).sum()
    mean = (probs * centres).sum()
    var = (probs * (centres - mean) ** 2).sum()
    model = gaussian_eps_model(D1000, mean, var)
    rng = np.random.default_rng(8)
    x0 = jnp.asarray(rng.choice(centres, size=(64, 256), p=probs), jnp.float32)
    out = jax.jit(lambda x0, key: dl.calc_bpd_loop(D1000, model, x0, key))(x0, jax.random.key(0))
    total = np.asarray(out["total_bpd"])
    assert out["terms_bpd"].shape == (64, 1000) and out["mse"].shape == (64, 1000)
    np.testing.assert_allclose(total, np.sum(out["terms_bpd"], 1) + out["prior_bpd"], rtol=1e-5)
    se = total.std() / math.sqrt(total.size)
    gap = total.mean() - entropy_bpd
    assert se < 0.04
    assert gap > 3 * se, (gap, se)  # a bound on the NLL, well beyond Monte-Carlo noise
    assert gap < 0.25, (gap, entropy_bpd)  # and close to it (~0.15 bits/dim)


def test_bound_terms_match_gaussian_closed_forms():
    """Continuous x0 ~ N(MU, SD^2): for t > 0, E[L_t] = 1/2 (-1 + log(sigma^2 / beta~) +
    beta~ / sigma^2 + coef1^2 Var(x0 | x_t) / sigma^2) per dim, E[mse_t] = Var(eps | x_t), and
    E[L_T] = 1/2 (-1 - log(1 - a_T) + 1 - a_T + a_T (MU^2 + SD^2))."""
    rng = np.random.default_rng(9)
    x0 = jnp.asarray(MU + SD * rng.standard_normal((64, 256)), jnp.float32)
    n = x0.size
    out = BPD_1000(x0, jax.random.key(1))
    ref = np_tables(BETAS_1000)
    a, post, sigma2 = ref["abar"][1:], ref["post_var"][1:], BETAS_1000[1:]
    v = a * SD**2 + 1 - a
    var_x0 = SD**2 * (1 - a) / v
    quad = ref["coef1"][1:] ** 2 * var_x0 / (2 * sigma2)  # the random part: quad * chi^2_1
    kl = (0.5 * (-1 + np.log(sigma2 / post) + post / sigma2) + quad) / LN2
    terms = np.asarray(out["terms_bpd"])[:, 1:].mean(0)
    tol = 5 * quad * np.sqrt(2 / n) / LN2 + 1e-6
    assert np.all(np.abs(terms - kl) < tol), np.max(np.abs(terms - kl) / tol)
    assert abs(terms.sum() - kl.sum()) < tol.sum()
    mse_ref = a * SD**2 / v
    mse = np.asarray(out["mse"])[:, 1:].mean(0)
    assert np.all(np.abs(mse - mse_ref) < 5 * mse_ref * np.sqrt(2 / n) + 1e-6)
    a_T = ref["abar"][-1]
    prior = 0.5 * (-1 - np.log(1 - a_T) + 1 - a_T + a_T * (MU**2 + SD**2)) / LN2
    np.testing.assert_allclose(np.mean(out["prior_bpd"]), prior, rtol=0.05)


# ----------------------------------------------------------------------------------------------
# Samplers


SHAPE = (512, 16)


def _check_moments(x, mean, var):
    x = np.asarray(x, np.float64)
    n = x.size
    assert abs(x.mean() - mean) < 5 * math.sqrt(var / n), (x.mean(), mean)
    assert abs(x.var() / var - 1) < 5 * math.sqrt(2 / n), (x.var(), var)


@pytest.mark.parametrize(
    "kind, num_steps, eta, var_type",
    [
        ("ancestral", None, 0.0, "fixedlarge"),
        ("ancestral", None, 0.0, "fixedsmall"),
        ("ancestral", 100, 0.0, "fixedlarge"),
        ("ddim", 500, 0.0, "fixedlarge"),
        ("ddim", 50, 0.0, "fixedlarge"),
        ("ddim", 100, 1.0, "fixedlarge"),
        ("ddim", 50, 0.5, "fixedlarge"),
    ],
)
def test_samplers_match_exact_chain_moments(kind, num_steps, eta, var_type):
    """The output law of each chain driven by the exact denoiser is Gaussian with moments given
    by an affine recursion (``chain_moments``); with all T = 1000 steps (ancestral) or 500 DDIM
    steps it also reproduces the data's N(MU, SD^2)."""
    d = make(var_type=var_type, betas=BETAS_1000)
    model = gaussian_eps_model(d)
    key = jax.random.key(11)
    if kind == "ancestral":
        fn = lambda k: dl.p_sample_loop(
            d, model, SHAPE, k, num_steps=num_steps, clip_denoised=False
        )
    else:
        fn = lambda k: dl.ddim_sample_loop(d, model, SHAPE, k, num_steps, eta, clip_denoised=False)
    x = jax.jit(fn)(key)
    steps = dl.space_timesteps(1000, num_steps or 1000)
    abar = np.cumprod(1 - BETAS_1000)[steps]
    mean, var = chain_moments(abar, kind, 0.0, eta=eta, fixedlarge=var_type == "fixedlarge")
    _check_moments(x, mean, var)
    if num_steps in (None, 500):
        _check_moments(x, MU, SD**2 * (1 + 0.03 * np.sign(var - SD**2)))
        assert abs(var / SD**2 - 1) < 0.03


def test_ddim_eta0_is_the_exact_affine_map():
    d = make(betas=BETAS_1000)
    x_T = jax.random.normal(jax.random.key(3), (256, 4))
    x = jax.jit(
        lambda x_T: dl.ddim_sample_loop(
            d, gaussian_eps_model(d), x_T.shape, jax.random.key(0), 20, x_T=x_T, clip_denoised=False
        )
    )(x_T)
    abar = np.cumprod(1 - BETAS_1000)[dl.space_timesteps(1000, 20)]
    expected, var = chain_moments(abar, "ddim", np.asarray(x_T, np.float64), v0=0.0)
    assert var == 0.0
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-5)


def test_ddim_eta1_all_steps_is_ancestral_fixedsmall():
    """sigma(eta = 1) = sqrt(beta~_t) and sqrt(abar_s) x0_hat + sqrt(1 - abar_s - beta~_t) eps_hat
    = mu~_t(x0_hat, x_t): with one key both chains draw the same noise."""
    key = jax.random.key(5)
    anc = jax.jit(lambda k: dl.p_sample_loop(D50_SMALL, MODEL_50, (64, 8), k))(key)
    ddim = jax.jit(lambda k: dl.ddim_sample_loop(D50_SMALL, MODEL_50, (64, 8), k, 50, eta=1.0))(key)
    np.testing.assert_allclose(ddim, anc, rtol=1e-4, atol=2e-5)
    ddim0 = dl.ddim_sample_loop(D50_SMALL, MODEL_50, (64, 8), key, 50, eta=0.0)
    assert np.abs(np.asarray(ddim0) - np.asarray(anc)).mean() > 0.05  # eta matters


def test_p_sample_adds_no_noise_at_t0():
    x = jax.random.normal(jax.random.key(0), (4, 8))
    p = dl.p_mean_variance(D50_SMALL, MODEL_50, x, jnp.zeros(4, jnp.int32))
    for t, same in ((0, True), (7, False)):
        t = jnp.full(4, t, jnp.int32)
        a, b = (dl.p_sample(D50_SMALL, MODEL_50, x, t, jax.random.key(k)) for k in (1, 2))
        assert np.array_equal(a["sample"], b["sample"]) == same
    np.testing.assert_array_equal(a["pred_x0"], b["pred_x0"])
    t0 = dl.p_sample(D50_SMALL, MODEL_50, x, jnp.zeros(4, jnp.int32), jax.random.key(1))
    np.testing.assert_array_equal(t0["sample"], p["mean"])


def test_pred_x0_snapshots():
    key, shape = jax.random.key(2), (4, 3)
    x, every1 = dl.p_sample_loop(D50_SMALL, MODEL_50, shape, key, pred_x0_every=1)
    x7, every7 = dl.p_sample_loop(D50_SMALL, MODEL_50, shape, key, pred_x0_every=7)
    plain = dl.p_sample_loop(D50_SMALL, MODEL_50, shape, key)
    assert every1.shape == (50, 4, 3) and every7.shape == (8, 4, 3)
    np.testing.assert_allclose(x, plain, rtol=1e-6)
    np.testing.assert_allclose(x7, plain, rtol=1e-6)
    # every1[j] is x0_hat at t = 49 - j; every7[j] at t = 7 (7 - j), i.e. 49, 42, ..., 0. Two
    # programs: x0_hat = (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) cancels at large t and so
    # magnifies their different rounding (5.5e-5 at t = 49 under LLVM -O0), hence atol.
    np.testing.assert_allclose(every7, every1[49 - np.arange(49, -1, -7)], rtol=1e-6, atol=2e-4)
    np.testing.assert_allclose(every1[-1], x, atol=0.05)  # x0_hat at t = 0 ~ the sample


def test_respace_tables_and_original_timesteps():
    d = make()
    steps = dl.space_timesteps(50, 7)
    np.testing.assert_array_equal(steps, [0, 8, 16, 24, 33, 41, 49])
    np.testing.assert_array_equal(dl.space_timesteps(50, 1), [49])
    r = dl.respace(d, steps)
    abar = np.cumprod(1 - BETAS_50)[steps]
    betas = 1 - abar / np.append(1.0, abar[:-1])
    np.testing.assert_allclose(r.alphas_cumprod, abar, rtol=1e-6)
    np.testing.assert_allclose(r.betas, betas, rtol=2e-5)
    np.testing.assert_allclose(
        r.posterior_variance[1:], (betas * (1 - abar / (1 - betas)) / (1 - abar))[1:], rtol=1e-4
    )
    np.testing.assert_array_equal(r.timestep_map, steps)
    np.testing.assert_array_equal(dl.respace(r, np.array([1, 5])).timestep_map, steps[[1, 5]])
    # The model is called with the original indices.
    x = jnp.zeros((7, 1))
    model = lambda x, t: jnp.broadcast_to(t[:, None].astype(x.dtype), x.shape)
    out = dl.p_mean_variance(r, model, x, jnp.arange(7, dtype=jnp.int32))
    np.testing.assert_array_equal(out["model_output"][:, 0], steps)
    # Respacing works on a traced schedule, inside jit.
    traced = jax.jit(lambda d: dl.respace(d, steps).betas)(d)
    np.testing.assert_allclose(traced, r.betas, rtol=1e-6)


def test_score_from_eps_is_the_gaussian_score():
    """For Gaussian data q(x_t) = N(sqrt(a) MU, a SD^2 + 1 - a): score = -(x_t - sqrt(a) MU) / v."""
    d = make()
    t = T_MIX
    x_t = jax.random.normal(jax.random.key(4), (6, 5)) * 2
    a = np.cumprod(1 - BETAS_50)[np.asarray(t)][:, None]
    true_score = -(np.asarray(x_t) - np.sqrt(a) * MU) / (a * SD**2 + 1 - a)
    score = dl.score_from_eps(d, gaussian_eps_model(d)(x_t, t), t)
    np.testing.assert_allclose(score, true_score, rtol=1e-4, atol=1e-5)
    eps = jax.random.normal(jax.random.key(5), (6, 5))
    np.testing.assert_allclose(
        dl.eps_from_score(d, dl.score_from_eps(d, eps, t), t), eps, rtol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Compilation: one scan, jit, vmap, float32 versus float64


def _top_level_scans(fn, *args):
    eqns = jax.make_jaxpr(fn)(*args).jaxpr.eqns
    return [e.params["length"] for e in eqns if e.primitive.name == "scan"]


def test_loops_are_single_scans():
    x0, key = jnp.zeros((2, 3)), jax.random.key(0)
    d, model = D50_SMALL, gaussian_eps_model(D50_SMALL)
    assert _top_level_scans(lambda x: dl.calc_bpd_loop(d, model, x, key), x0) == [50]
    assert _top_level_scans(lambda k: dl.p_sample_loop(d, model, (2, 3), k), key) == [50]
    assert _top_level_scans(
        lambda k: dl.p_sample_loop(d, model, (2, 3), k, num_steps=10, pred_x0_every=3), key
    ) == [10]
    assert _top_level_scans(lambda k: dl.ddim_sample_loop(d, model, (2, 3), k, 10), key) == [10]


def test_jit_and_vmap_agree_with_eager():
    d = make(var_type="learned_range", mean_type="v")
    model = lambda x, t: jnp.concatenate([0.3 * x + 0.01 * t[:, None], jnp.tanh(x)], -1)
    rng = np.random.default_rng(12)
    x0 = _grid_data(rng, (3, 4, 6))  # 3 stacked batches of [4, 6]
    t = jnp.asarray(rng.integers(0, 50, (3, 4)), jnp.int32)
    noise = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)

    def everything(x0, t, noise, key):
        x_t = dl.q_sample(d, x0, t, noise)
        p = dl.p_mean_variance(d, model, x_t, t)
        return dict(
            x_t=x_t,
            post=dl.q_posterior_mean_variance(d, x0, x_t, t)[0],
            mean=p["mean"],
            vb=dl.vb_terms_bpd(d, model, x0, x_t, t),
            prior=dl.prior_bpd(d, x0),
            losses=dl.training_losses(d, model, x0, key, loss_type="hybrid"),
            sample=dl.p_sample(d, model, x_t, t, key)["sample"],
            bpd=dl.calc_bpd_loop(d, model, x0, key)["total_bpd"],
            anc=dl.p_sample_loop(d, model, x0.shape, key, num_steps=10),
            ddim=dl.ddim_sample_loop(d, model, x0.shape, key, 10, eta=0.5),
        )

    batched = jax.jit(jax.vmap(everything))(x0, t, noise, keys)
    single = jax.jit(everything)
    for i in range(3):
        jax.tree.map(
            lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=2e-6),
            batched,
            single(x0[i], t[i], noise[i], keys[i]),
        )
    # Eager (op by op) agrees with jit; the loops are checked under jit only (one scan each).
    x_t = dl.q_sample(d, x0[0], t[0], noise[0])
    eager = dict(
        x_t=x_t,
        post=dl.q_posterior_mean_variance(d, x0[0], x_t, t[0])[0],
        mean=dl.p_mean_variance(d, model, x_t, t[0])["mean"],
        vb=dl.vb_terms_bpd(d, model, x0[0], x_t, t[0]),
        prior=dl.prior_bpd(d, x0[0]),
        losses=dl.training_losses(d, model, x0[0], keys[0], loss_type="hybrid"),
        sample=dl.p_sample(d, model, x_t, t[0], keys[0])["sample"],
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6),
        eager,
        {k: v for k, v in single(x0[0], t[0], noise[0], keys[0]).items() if k in eager},
    )


def _x64_cases(dtype):
    """Samplers, the bound and every loss on one schedule, in ``dtype``."""
    betas = schedules.get_beta_schedule("linear", 200, beta_end=0.1)
    d = make(betas=betas, dtype=dtype)
    dv = make("v", "learned_range", betas=betas, dtype=dtype)
    model = gaussian_eps_model(d)
    model_v = lambda x, t: jnp.concatenate([0.3 * x, jnp.tanh(x)], -1)
    x0 = jnp.asarray(_grid_data(np.random.default_rng(0), (8, 16)), dtype)

    @jax.jit
    def compute(x0, key):
        return dict(
            bpd=dl.calc_bpd_loop(d, model, x0, key),
            bpd_v=dl.calc_bpd_loop(dv, model_v, x0, key)["total_bpd"],
            losses={k: dl.training_losses(dv, model_v, x0, key, k) for k in dl.LOSS_TYPES},
            anc=dl.p_sample_loop(d, model, x0.shape, key, clip_denoised=False),
            anc_respaced=dl.p_sample_loop(d, model, x0.shape, key, num_steps=20),
            ddim=dl.ddim_sample_loop(d, model, x0.shape, key, 20, clip_denoised=False),
            ddim_eta=dl.ddim_sample_loop(d, model, x0.shape, key, 50, eta=0.7),
        )

    out = compute(x0, jax.random.key(0))
    assert all(a.dtype == dtype for a in jax.tree.leaves(out))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def test_float32_agrees_with_float64():
    """The same computations in float32 and under jax_enable_x64 with float64 tables (noise is
    drawn in float32 either way, so one key gives the same draws): 1e-5 relative."""
    res32 = _x64_cases(jnp.float32)
    with jax.enable_x64(True):
        res64 = _x64_cases(jnp.float64)
    for (path, a), b in zip(
        jax.tree_util.tree_flatten_with_path(res32)[0], jax.tree.leaves(res64), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("learned", [False, True])
def test_classifier_free_guidance_acts_on_the_implied_eps(mean_type, learned):
    """Guiding the outputs of an x0 or v model gives the output whose implied eps is
    (1 + w) eps(x, c) - w eps(x, none); a learned variance is the conditional output's."""
    d = dl.GaussianDiffusion.create(
        schedules.get_beta_schedule("linear", 50),
        mean_type=mean_type,
        var_type="learned_range" if learned else "fixedlarge",
    )
    keys = jax.random.split(jax.random.key(0), 3)
    x_t = jax.random.normal(keys[0], (6, 4, 4, 2))
    c = 2 if learned else 1
    out_c = jax.random.normal(keys[1], (6, 4, 4, 2 * c))
    out_u = jax.random.normal(keys[2], (6, 4, 4, 2 * c))
    t = jnp.array([0, 3, 10, 25, 40, 49])
    w = 1.7
    guided = dl.classifier_free_guidance(out_c, out_u, w, learned)

    def implied_eps(out):  # the model output's eps, by the mean type's formula
        mean = out[..., :2]
        if mean_type == "eps":
            return mean
        if mean_type == "x0":
            return dl.predict_eps_from_x0(d, x_t, t, mean)
        return dl.predict_eps_from_v(d, x_t, t, mean)

    want = (1 + w) * implied_eps(out_c) - w * implied_eps(out_u)
    np.testing.assert_allclose(implied_eps(guided), want, rtol=1e-4, atol=1e-4)
    if learned:
        np.testing.assert_array_equal(guided[..., 2:], out_c[..., 2:])
    # w = 0: the conditional model itself.
    np.testing.assert_array_equal(dl.classifier_free_guidance(out_c, out_u, 0.0, learned), out_c)


# ----------------------------------------------------------------------------------------------
# The Monte-Carlo bound (eval.bound_num_t)


def _mc_mean_and_se(t, w, values):
    """Mean and standard error over rows of sum_k w_k values[t_k] (values: L_t per t)."""
    est = np.sum(np.asarray(w, np.float64) * values[np.asarray(t)], axis=1)  # [N]
    return est.mean(), est.std(ddof=1) / math.sqrt(len(est))


def test_stratified_bound_timesteps_draw_one_t_per_stratum_and_are_unbiased():
    """T = 50, K = 7: the columns' values are K contiguous, disjoint strata covering {1..49},
    each reached whole, smaller at small t; each weight is its stratum's size; and the weighted
    sum of a fixed L_t is unbiased for sum_{t>=1} L_t (20,000 draws: within 4 SE)."""
    t, w = timesteps.stratified_bound_timesteps(jax.random.key(0), 20_000, 50, 7)
    t, w = np.asarray(t), np.asarray(w)
    strata = [np.unique(t[:, k]) for k in range(7)]
    np.testing.assert_array_equal(np.concatenate(strata), np.arange(1, 50))  # cover, in order
    sizes = [len(s) for s in strata]
    assert all(np.all(np.diff(s) == 1) for s in strata)  # contiguous
    assert sizes[0] < sizes[-1], sizes  # finer at small t
    for k in range(7):
        np.testing.assert_array_equal(w[:, k], sizes[k])
    values = np.random.default_rng(3).gamma(2.0, 1.0, 50) * np.linspace(3, 0.1, 50)  # L_t
    mean, se = _mc_mean_and_se(t, w, values)
    assert abs(mean - values[1:].sum()) < 4 * se, (mean, values[1:].sum(), se)
    t1, w1 = timesteps.stratified_bound_timesteps(
        jax.random.key(1), 4, 50, 49
    )  # K = T - 1: every t
    np.testing.assert_array_equal(np.asarray(t1), np.tile(np.arange(1, 50), (4, 1)))
    np.testing.assert_array_equal(np.asarray(w1), 1.0)
    for num_t in (1, 2, 20, 48):  # always K non-empty strata of 1..T-1
        edges = timesteps.stratum_edges(50, num_t)
        assert len(edges) == num_t + 1 and edges[0] == 1 and edges[-1] == 50
        assert np.all(np.diff(edges) >= 1)
    for bad in (0, 50):
        with pytest.raises(ValueError, match=r"num_t=.* must be in \[1, T - 1 = 49\]"):
            timesteps.stratified_bound_timesteps(jax.random.key(0), 2, 50, bad)


def test_importance_bound_timesteps_are_unbiased_and_never_draw_t0():
    """t ~ q = p[1:] / sum p[1:] with weights 1 / (K q_t): never t = 0, the draws' frequencies
    follow q, and the weighted sum of a fixed L_t is unbiased (the exact sum within 4 SE)."""
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(50))
    t, w = timesteps.importance_bound_timesteps(jax.random.key(2), jnp.asarray(probs), 20_000, 5)
    t, w = np.asarray(t), np.asarray(w)
    q = probs[1:] / probs[1:].sum()
    assert t.min() >= 1 and t.max() <= 49
    np.testing.assert_allclose(w, 1.0 / (5 * q[t - 1]), rtol=1e-5)
    freq = np.bincount(t.reshape(-1), minlength=50)[1:] / t.size
    assert np.all(np.abs(freq - q) < 5 * np.sqrt(q * (1 - q) / t.size) + 1e-4)
    values = rng.gamma(2.0, 1.0, 50)
    mean, se = _mc_mean_and_se(t, w, values)
    assert abs(mean - values[1:].sum()) < 4 * se, (mean, values[1:].sum(), se)


@pytest.mark.parametrize("sampler", ["stratified", "importance"])
def test_sampled_bound_agrees_with_the_full_bound_on_the_gaussian_oracle(sampler):
    """The exact denoiser of Gaussian data (rounded to 256 levels), T = 1000: per example, the
    estimate from
    K = 20 t (stratified, or importance-sampled from sqrt(E[L_t^2]) of the full pass) minus
    the full bound has mean 0 within 4 standard errors, L_0 is the full pass's L_0 exactly (same
    noise), and the estimate's standard error is small beside the bound."""
    rng = np.random.default_rng(15)
    x0 = jnp.asarray(np.round((MU + SD * rng.standard_normal((256, 64)) + 1) * 127.5) / 127.5 - 1)
    key = jax.random.key(6)
    full = BPD_1000(x0, key)
    full_total = np.asarray(full["total_bpd"], np.float64)
    if sampler == "stratified":
        t, w = timesteps.stratified_bound_timesteps(jax.random.key(7), 256, 1000, 20)
    else:
        probs = jnp.sqrt(jnp.mean(jnp.square(full["terms_bpd"]), axis=0))  # [T]
        t, w = timesteps.importance_bound_timesteps(jax.random.key(7), probs / probs.sum(), 256, 20)
    out = jax.jit(lambda x0, t, w: dl.sampled_bound_terms(D1000, MODEL_1000, x0, key, t, w))(
        x0, t, w
    )
    np.testing.assert_allclose(out["decoder_bpd"], full["terms_bpd"][:, 0], rtol=1e-6)
    est = np.asarray(out["decoder_bpd"] + out["kl_bpd"] + full["prior_bpd"], np.float64)
    diff = est - full_total
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se, (diff.mean(), se)
    # Stratified in log t, the t add little to the images' own spread.
    assert est.std(ddof=1) < 2 * full_total.std(ddof=1), (est.std(), full_total.std())
    # The weights matter: without them the estimate is the sum of 20 terms, far below.
    unweighted = np.asarray(out["kl_bpd"]) / np.asarray(w).mean()
    assert np.mean(unweighted) < 0.2 * np.mean(full_total)


def test_the_estimated_bound_runs_in_float64():
    """``sampled_bound_terms`` under jax_enable_x64 with float64 data and tables (its scan's carry
    once started as float32 and the scan refused it), agreeing with the float32 run on the same
    keys (the noise is drawn in float32 either way)."""
    betas = schedules.get_beta_schedule("linear", 50)
    x0 = np.random.default_rng(0).uniform(-1, 1, (3, 4, 4, 1))
    t, w = timesteps.stratified_bound_timesteps(jax.random.key(1), 3, 50, 5)
    out = {}
    for dtype in (jnp.float32, jnp.float64):
        with jax.enable_x64(dtype == jnp.float64):
            d = dl.GaussianDiffusion.create(betas, dtype=dtype)
            terms = dl.sampled_bound_terms(
                d, lambda x, t: 0.1 * x, jnp.asarray(x0, dtype), jax.random.key(0), t, w
            )
            assert terms["kl_bpd"].dtype == dtype and terms["decoder_bpd"].dtype == dtype
            out[dtype] = np.asarray(terms["kl_bpd"], np.float64)
    np.testing.assert_allclose(out[jnp.float64], out[jnp.float32], rtol=1e-5)
