"""Score matching losses and annealed Langevin against closed forms on Gaussian data.

Data x ~ N(0, S² I) in D dimensions, whose score is −x/S²; its σ-noised version is N(0, (S² + σ²) I)
with score −x/(S² + σ²). Expectations are checked as sample means within Z standard errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import score
from diffusion_jax.data import toy_distributions

S, D, Z = 1.5, 3, 5.0  # data std, dimension, how many standard errors a mean may be off
_X, _KEY, _SIGMAS = jnp.zeros((5, 2)), jax.random.PRNGKey(0), jnp.array([1.0, 0.5])


def gaussian_data(key, n, dim=D):
    return S * jax.random.normal(key, (n, dim))


def noised_gaussian_score(sigma):
    """Score of N(0, (S² + σ²) I); sigma may be an array broadcastable to x."""
    return lambda x, *_: -x / (S**2 + sigma**2)


def assert_mean_close(samples, expected, axis=0, z=Z, atol=1e-5):
    """mean(samples) == expected within z standard errors of the mean (plus atol)."""
    samples = np.asarray(samples, np.float64)
    mean = samples.mean(axis)
    se = samples.std(axis, ddof=1) / np.sqrt(samples.shape[axis])
    np.testing.assert_array_less(np.abs(mean - expected), z * se + atol)


def perturbed_score(x):
    """The true score plus a nonlinear term with a non-symmetric Jacobian."""
    a = jnp.arange(D * D, dtype=x.dtype).reshape(D, D) / D**2 - 0.3
    return -x / S**2 + 0.5 * jnp.tanh(x @ a) * x[:, ::-1]


def test_ism_equals_closed_form_and_its_expectation():
    # True score: J(x) = ½‖x‖²/S⁴ − D/S² per example, expectation −D/(2S²).
    x = gaussian_data(jax.random.PRNGKey(0), 20_000)
    loss = score.ism_loss(noised_gaussian_score(0.0), x)
    np.testing.assert_allclose(loss, 0.5 * jnp.sum(x**2, 1) / S**4 - D / S**2, rtol=1e-5, atol=1e-5)
    assert_mean_close(loss, -D / (2 * S**2))


def test_ism_trace_is_exact_for_trailing_dims():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 3))
    w = jax.random.normal(jax.random.PRNGKey(2), (6, 6))
    score_fn = lambda y: jnp.tanh(y.reshape(-1, 6) @ w).reshape(y.shape) * y
    jac = jax.vmap(jax.jacrev(lambda v: score_fn(v[None])[0].reshape(6)))(x)  # [B, 6, 2, 3]
    expected = 0.5 * jnp.sum(score_fn(x) ** 2, (1, 2)) + jnp.trace(jac.reshape(4, 6, 6), 0, 1, 2)
    loss = jax.jit(score.ism_loss, static_argnums=0)(score_fn, x)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


@pytest.mark.parametrize("projection", score.PROJECTIONS)
@pytest.mark.parametrize("variance_reduced", [False, True])
@pytest.mark.parametrize(
    "score_fn", [noised_gaussian_score(0.0), perturbed_score], ids=["true_score", "perturbed"]
)
def test_ssm_is_unbiased_estimate_of_ism(projection, variance_reduced, score_fn):
    # Per example: the average of single-projection SSM over many keys equals ISM.
    x = gaussian_data(jax.random.PRNGKey(3), 8)
    ism = np.asarray(score.ism_loss(score_fn, x))
    kw = dict(projection=projection, variance_reduced=variance_reduced)
    one = jax.jit(jax.vmap(lambda k: score.ssm_loss(score_fn, x, k, **kw)))
    estimates = np.asarray(one(jax.random.split(jax.random.PRNGKey(4), 4000)))  # [M, B]
    assert_mean_close(estimates, ism, atol=1e-4 * (1 + np.abs(ism)))
    # num_projections averages M projections in one call: same bound.
    many = score.ssm_loss(score_fn, x, jax.random.PRNGKey(5), 4000, **kw)
    se = estimates.std(0) / np.sqrt(4000)
    np.testing.assert_array_less(np.abs(many - ism), Z * se + 1e-4 * (1 + np.abs(ism)))


def linear_dsm(x, sigma, key):
    """DSM of the linear score s(x) = a x as a function of a (exactly quadratic in a)."""
    return lambda a: jnp.mean(score.dsm_loss(lambda y, _: a * y, x, sigma, key))


def test_dsm_minimiser_is_noised_score_gaussian():
    # argmin_a DSM(a x) = −1/(S² + σ²), the noised data's score; closed form per batch:
    # â = −L'(0)/L''(0). Check the mean of â over independent batches.
    sigma = 0.8

    def fitted_slope(key):
        data_key, noise_key = jax.random.split(key)
        loss = linear_dsm(gaussian_data(data_key, 1000), sigma, noise_key)
        return -jax.grad(loss)(0.0) / jax.grad(jax.grad(loss))(0.0)

    slopes = jax.jit(jax.vmap(fitted_slope))(jax.random.split(jax.random.PRNGKey(6), 64))
    assert_mean_close(slopes, -1 / (S**2 + sigma**2))
    np.testing.assert_allclose(np.mean(slopes), -1 / (S**2 + sigma**2), rtol=0.01)


@pytest.mark.parametrize("per_example", [False, True])
def test_dsm_value_at_optimum(per_example):
    # At the noised score the DSM expectation is ½ D (1/σ² − 1/(S² + σ²)); σ reaches score_fn as
    # given (a float or a per-example (B, 1) array).
    n = 20_000
    x = gaussian_data(jax.random.PRNGKey(7), n)
    sigma = jnp.where(jnp.arange(n)[:, None] % 2 == 0, 0.3, 1.0) if per_example else 0.8
    seen = []

    def score_fn(y, sig):
        seen.append(sig)
        return noised_gaussian_score(sig)(y)

    loss = score.dsm_loss(score_fn, x, sigma, jax.random.PRNGKey(8))
    assert seen[0] is sigma
    for value in np.unique(sigma):
        group = np.asarray(loss)[np.broadcast_to(sigma == value, (n, 1))[:, 0]]
        assert_mean_close(group, 0.5 * D * (1 / value**2 - 1 / (S**2 + value**2)))


def test_dsm_minus_esm_is_constant_on_a_mixture():
    # Vincent (2011): DSM(s) = ½ E‖s − ∇log q_σ‖² + C. With the same noise, the DSM of a
    # perturbed score exceeds the DSM of the exact noised score by ½ E_q‖δ‖²: the exact score of
    # the noised mixture is the minimiser.
    sigma, n = 0.5, 20_000
    dist = toy_distributions.get("gmm8")
    noised = dist.noised(1.0, sigma)
    delta = lambda y: 0.5 * jnp.tanh(y[:, ::-1])
    x = dist.sample(jax.random.PRNGKey(9), n)
    key = jax.random.PRNGKey(10)
    exact = score.dsm_loss(lambda y, _: noised.score(y), x, sigma, key)
    perturbed = score.dsm_loss(lambda y, _: noised.score(y) + delta(y), x, sigma, key)
    diff = np.asarray(perturbed - exact)
    esm = 0.5 * np.sum(np.asarray(delta(noised.sample(jax.random.PRNGKey(11), n))) ** 2, 1)
    se = np.hypot(diff.std() / np.sqrt(n), esm.std() / np.sqrt(n))
    assert abs(diff.mean() - esm.mean()) < Z * se


def test_ncsn_loss_value_with_true_scores():
    # λ(σ) = σ² weighting, level i uniform: E = (1/L) Σ_i ½ D S²/(S² + σ_i²). The level index
    # reaches score_fn as int32 [B].
    sigmas = score.ncsn_sigmas(3.0, 0.1, 5)
    x = gaussian_data(jax.random.PRNGKey(12), 20_000)
    seen = []

    def score_fn(y, level):
        seen.append(level)
        return noised_gaussian_score(sigmas[level][:, None])(y)

    loss = score.ncsn_loss(score_fn, x, sigmas, jax.random.PRNGKey(13))
    assert seen[0].shape == (x.shape[0],) and seen[0].dtype == jnp.int32
    assert set(np.unique(seen[0])) == set(range(5))
    s2 = np.asarray(sigmas, np.float64) ** 2
    assert_mean_close(loss, np.mean(0.5 * D * S**2 / (S**2 + s2)))


def test_ncsn_sigmas_geometric():
    sigmas = score.ncsn_sigmas(50.0, 0.01, 10)
    assert sigmas.dtype == jnp.float32 and sigmas.shape == (10,)
    np.testing.assert_allclose(np.asarray(sigmas)[[0, -1]], [50.0, 0.01], rtol=1e-6)
    np.testing.assert_allclose(sigmas[1:] / sigmas[:-1], (0.01 / 50.0) ** (1 / 9), rtol=1e-5)


def langevin_variance(sigmas, step_lr, n_steps_each, v0=0.0):
    """Exact variance after annealed Langevin on N(0, S²) with its exact noised scores.

    Each step is linear: x ← c x + √α z with c = 1 − α/(2(S² + σ²)), so v ← c² v + α.
    """
    v = v0
    for sigma in np.asarray(sigmas, np.float64):
        alpha = step_lr * (sigma / sigmas[-1]) ** 2
        c = 1 - alpha / (2 * (S**2 + sigma**2))
        v = c ** (2 * n_steps_each) * v + alpha * (1 - c ** (2 * n_steps_each)) / (1 - c**2)
    return v


@pytest.mark.parametrize(
    "sigmas, step_lr, n_steps_each",
    [(np.array([0.01], np.float32), 0.05, 300), (score.ncsn_sigmas(10.0, 0.1, 10), 0.005, 100)],
    ids=["single_sigma", "annealed"],
)
def test_langevin_reaches_the_variance(sigmas, step_lr, n_steps_each):
    n = 2000
    score_fn = lambda y, level: noised_gaussian_score(jnp.asarray(sigmas)[level][:, None])(y)
    sample = jax.jit(
        lambda key: score.annealed_langevin(
            score_fn, jnp.zeros((n, D)), sigmas, key, n_steps_each, step_lr, return_all=True
        )
    )
    levels = sample(jax.random.PRNGKey(14))  # [L, n, D]
    assert levels.shape == (len(sigmas), n, D)
    # The chain is linear in Gaussian noise: x is exactly N(0, v I), Var(mean x²) = 2v²/N.
    v = langevin_variance(sigmas, step_lr, n_steps_each)
    values = np.asarray(levels[-1]) ** 2
    assert abs(values.mean() - v) < Z * v * np.sqrt(2 / values.size)
    assert abs(values.mean() / S**2 - 1) < 0.05  # the law's variance, up to discretisation bias


def test_annealed_langevin_follows_algorithm_1():
    # With a score that is constant in x, c_i = i + 1 at level i, the chain is a sum of independent
    # steps (α_i/2) c_i + √α_i z with α_i = ε σ_i²/σ_L²: x ~ N(T Σ α_i c_i / 2, T Σ α_i I).
    sigmas, step_lr, n_steps_each, n = score.ncsn_sigmas(1.0, 0.25, 3), 0.02, 7, 4000
    score_fn = lambda y, level: jnp.broadcast_to((level + 1.0)[:, None], y.shape)
    x = score.annealed_langevin(score_fn, jnp.zeros((n, 2)), sigmas, _KEY, n_steps_each, step_lr)
    alphas = step_lr * (np.asarray(sigmas, np.float64) / 0.25) ** 2
    mean = n_steps_each * np.sum(alphas * np.arange(1, 4)) / 2
    var = n_steps_each * np.sum(alphas)
    x = np.asarray(x, np.float64).reshape(-1)
    assert_mean_close(x, mean)
    assert abs(np.mean((x - mean) ** 2) - var) < Z * var * np.sqrt(2 / x.size)


def test_annealed_langevin_denoise_is_tweedie_step():
    sigmas = score.ncsn_sigmas(1.0, 0.2, 3)
    score_fn = lambda y, level: noised_gaussian_score(sigmas[level][:, None])(y)
    x0, key = jnp.ones((4, D)), jax.random.PRNGKey(15)
    plain = score.annealed_langevin(score_fn, x0, sigmas, key, 5, 0.01)
    denoised = score.annealed_langevin(score_fn, x0, sigmas, key, 5, 0.01, denoise=True)
    np.testing.assert_allclose(denoised, plain * S**2 / (S**2 + 0.2**2), rtol=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: score.ssm_loss(perturbed_score, _X, _KEY, projection="sphere"), "'sphere'"),
        (lambda: score.ssm_loss(perturbed_score, _X, _KEY, num_projections=0), "num_projections"),
        (lambda: score.dsm_loss(noised_gaussian_score(0), _X, 0.0, _KEY), "sigma must be > 0"),
        (lambda: score.dsm_loss(noised_gaussian_score(0), _X, jnp.ones(5), _KEY), "broadcast"),
        (lambda: score.ncsn_sigmas(0.1, 1.0, 10), "sigma_min=1.0, sigma_max=0.1"),
        (lambda: score.ncsn_sigmas(1.0, 0.0, 10), "0 < sigma_min"),
        (lambda: score.ncsn_sigmas(1.0, 0.1, 1), "num_levels must be an int >= 2, got 1"),
        (lambda: score.ncsn_sigmas(1.0, 0.1, 2.5), "num_levels"),
        (lambda: score.annealed_langevin(None, _X, _SIGMAS, _KEY, 10, 0.0), "step_lr must be > 0"),
        (lambda: score.annealed_langevin(None, _X, _SIGMAS, _KEY, 0, 0.1), "n_steps_each"),
        (lambda: score.annealed_langevin(None, _X, _SIGMAS[::-1], _KEY, 1, 0.1), "decreasing"),
        (lambda: score.annealed_langevin(None, _X, jnp.ones((2, 2)), _KEY, 1, 0.1), "1-D"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_projection_error_lists_the_choices():
    with pytest.raises(ValueError, match="rademacher.*gaussian"):
        score.ssm_loss(perturbed_score, _X, _KEY, projection="sphere")
