"""The paper's figures: rate-distortion against the exact denoiser of Gaussian data, the progressive
strip and the plots (``evaluation.rate_distortion``, ``evaluation.progressive``,
``evaluation.plots``; end to end in test_evaluation.py).

Gaussian data x0 ~ N(MU, SD^2 I) has the exact denoiser (a = abar_t)

    E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) MU) / (a SD^2 + 1 - a),
    Var(x0 | x_t) = SD^2 (1 - a) / (a SD^2 + 1 - a),

so the distortion of x0_hat = E[x0 | x_t] is RMSE(t) = 127.5 sqrt(Var(x0 | x_t)) on [0, 255].
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as dl
from diffusion_jax import reporting, schedules
from diffusion_jax.evaluation import plots, progressive, rate_distortion

MU, SD = 0.05, 0.25
BETAS = schedules.get_beta_schedule("linear", 200)


def exact_eps_fn(d):
    abar = d.alphas_cumprod

    def model_fn(x_t, t):
        a = abar[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(1 - a) * (x_t - jnp.sqrt(a) * MU) / (a * SD**2 + 1 - a)

    return model_fn


def expected_rmse(betas):
    a = np.cumprod(1.0 - np.asarray(betas, np.float64))
    return 127.5 * np.sqrt(SD**2 * (1 - a) / (a * SD**2 + 1 - a))


@pytest.fixture(scope="module")
def rd_case():
    d = dl.GaussianDiffusion.create(BETAS)
    x0 = MU + SD * jax.random.normal(jax.random.key(0), (48, 6, 6, 1))
    key = jax.random.key(1)
    out = jax.jit(lambda x, k: dl.bound_terms(d, exact_eps_fn(d), x, k))(x0, key)
    out = dict(jax.device_get(out), prior_bpd=np.asarray(dl.prior_bpd(d, x0)))
    out["sq_err"] = out.pop("x0_sq_err")
    return d, x0, key, out


def test_rate_distortion_with_the_exact_denoiser(rd_case):
    d, x0, key, out = rd_case
    assert out["terms_bpd"].shape == (48, 200) and out["sq_err"].shape == (48, 200)
    # The one-pass terms are those of calc_bpd_loop with the same key.
    ref = dl.calc_bpd_loop(d, exact_eps_fn(d), x0, key)
    np.testing.assert_allclose(out["terms_bpd"], ref["terms_bpd"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["prior_bpd"], ref["prior_bpd"], rtol=1e-6)

    rmse = np.sqrt(out["sq_err"]).mean(0)  # [T]
    rd = rate_distortion.rate_distortion_curve(
        out["terms_bpd"].mean(0), out["prior_bpd"].mean(), rmse, out["sq_err"].mean(0)
    )
    rate = np.asarray(rd["rate_bpd"])
    assert np.all(np.diff(rate) <= 1e-9)  # more bits as t goes down: monotone
    assert rate[-1] == pytest.approx(float(out["prior_bpd"].mean()), rel=1e-6)  # x_{T-1}: only L_T
    assert rd["lossless_bpd"] == pytest.approx(float(ref["total_bpd"].mean()), rel=1e-5)
    want = expected_rmse(BETAS)
    got = np.asarray(rd["distortion_rmse_of_mean_mse"])
    assert want[0] < 2.0 and got[0] < 2.0  # ~1.3 of 255 from x_0-latent: small
    np.testing.assert_allclose(got, want, rtol=0.06)  # 1728 squared errors per t
    assert got[-1] > 20 * got[0]


def test_rate_curve_formula():
    rd = rate_distortion.rate_distortion_curve(
        np.array([0.5, 0.25, 0.125]), 0.01, np.array([1, 2, 3])
    )
    # rate[t] = L_T + sum_{s > t} L_s
    np.testing.assert_allclose(rd["rate_bpd"], [0.01 + 0.375, 0.01 + 0.125, 0.01])
    assert rd["lossless_bpd"] == pytest.approx(0.885)


def test_figure_files_are_written(rd_case, tmp_path):
    _, _, _, out = rd_case
    rd = rate_distortion.rate_distortion_curve(
        out["terms_bpd"].mean(0), out["prior_bpd"].mean(), np.sqrt(out["sq_err"]).mean(0)
    )
    rd["num_examples"] = 48
    paths = [str(tmp_path / "rd.png"), str(tmp_path / "lt.png"), str(tmp_path / "lt1.png")]
    plots.plot_rate_distortion(rd, paths[0])
    plots.plot_lt_curve(out["terms_bpd"].mean(0), paths[1], mse_per_t=np.ones(200))
    plots.plot_lt_curve(out["terms_bpd"].mean(0), paths[2])
    reporting.write_json(str(tmp_path / "rd.json"), rd)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert 0 < os.path.getsize(p) < 200_000
    loaded = json.load(open(tmp_path / "rd.json"))
    assert len(loaded["rate_bpd"]) == 200 and loaded["distortion_rmse"][0] < 2.0


@pytest.mark.parametrize("num_steps, expected_t", [(None, [16, 12, 8, 4, 0]), (10, None)])
def test_progressive_strip(num_steps, expected_t):
    d = dl.GaussianDiffusion.create(schedules.get_beta_schedule("linear", 20))
    x0, frames, steps = progressive.progressive_samples(
        d, exact_eps_fn(d), (3, 8, 8, 1), jax.random.key(2), num_frames=5, num_steps=num_steps
    )
    assert x0.shape == (3, 8, 8, 1) and frames.shape == (5, 3, 8, 8, 1)
    if expected_t is None:  # respaced chain of 10: every 2nd step, original t
        expected_t = dl.space_timesteps(20, 10)[[8, 6, 4, 2, 0]].tolist()
    assert steps.tolist() == expected_t
    np.testing.assert_allclose(frames[-1], np.clip(x0, -1, 1), atol=1e-6)  # t = 0: the sample
    strip = progressive.progressive_strip(frames, num_bins=17)
    assert strip.shape == (3 * 9 + 1, 5 * 9 + 1, 1) and strip.dtype == np.uint8
