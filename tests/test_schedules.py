"""Beta schedules against their closed forms; argument checking."""

import math

import numpy as np
import pytest

from diffusion_jax import schedules

NAMES = ("linear", "cosine", "quadratic", "const")


def test_linear_closed_form():
    betas = schedules.get_beta_schedule("linear", 1000)
    t = np.arange(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    np.testing.assert_allclose(betas, 1e-4 + (0.02 - 1e-4) * t / 999, rtol=1e-13)
    custom = schedules.get_beta_schedule("linear", 11, beta_start=0.1, beta_end=0.2)
    np.testing.assert_allclose(custom, 0.1 + 0.01 * np.arange(11), rtol=1e-13)


def test_quadratic_closed_form():
    betas = schedules.get_beta_schedule("quadratic", 100, beta_start=1e-4, beta_end=0.04)
    root = 0.01 + (0.2 - 0.01) * np.arange(100) / 99  # sqrt(beta) is linear in t
    np.testing.assert_allclose(betas, root**2, rtol=1e-13)


def test_const_closed_form():
    np.testing.assert_array_equal(
        schedules.get_beta_schedule("const", 7, beta=0.3), np.full(7, 0.3)
    )


def test_cosine_closed_form():
    T, s = 1000, 0.008
    betas = schedules.get_beta_schedule("cosine", T)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # abar(u) up to f(0)
    abar = np.cumprod(1.0 - betas)
    clipped = betas >= 0.999
    # Clipping only happens at the very end (abar -> 0); before it abar_t = f((t+1)/T) / f(0).
    assert clipped.sum() >= 1 and np.all(clipped[np.argmax(clipped) :])
    ref = np.array([f((t + 1) / T) / f(0.0) for t in range(T)])
    np.testing.assert_allclose(abar[~clipped], ref[~clipped], rtol=1e-10)
    assert betas.max() == 0.999


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("T", [1, 2, 50, 1000])
def test_alphas_cumprod_monotone_in_unit_interval(name, T):
    betas = schedules.get_beta_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    assert np.all((betas > 0) & (betas < 1))
    abar = np.cumprod(1.0 - betas)
    assert np.all(np.diff(abar) < 0) and 0 < abar[-1] <= abar[0] < 1


@pytest.mark.parametrize(
    "args, kw, needles",
    [
        (("sigmoid", 10), {}, ["'sigmoid'", "linear", "cosine", "quadratic", "const"]),
        (("linear", 0), {}, ["num_timesteps", "0"]),
        (("cosine", -3), {}, ["num_timesteps", "-3"]),
        (("linear", 10.0), {}, ["num_timesteps", "10.0"]),
        (("linear", 10), {"beta_start": 0.0}, ["(0, 1)", "0.0"]),
        (("linear", 10), {"beta_end": 1.5}, ["(0, 1)", "1.5"]),
        (("quadratic", 10), {"beta_start": -0.1}, ["(0, 1)"]),
        (("const", 10), {"beta": 1.0}, ["(0, 1)", "1.0"]),
        (("cosine", 10), {"max_beta": 1.0}, ["(0, 1)", "1.0"]),
        (("cosine", 10), {"beta_end": 0.02}, ["beta_end", "max_beta", "s"]),
    ],
)
def test_bad_arguments_raise_value_error(args, kw, needles):
    with pytest.raises(ValueError) as err:
        schedules.get_beta_schedule(*args, **kw)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


def test_check_betas():
    schedules.check_betas(np.array([0.5]))
    for bad in (np.array([]), np.zeros((2, 2)) + 0.1, np.array([0.1, np.nan])):
        with pytest.raises(ValueError):
            schedules.check_betas(bad)
