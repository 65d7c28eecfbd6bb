"""The experiment scripts (``experiments/<study>/NAME.py``) in smoke-test mode (``--quick``: tiny
networks, a few steps, few points), and the two-sample distances of ``experiments/metrics.py``
against direct NumPy computations."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
# experiments/ for metrics.py; the study folders whose scripts are imported below.
for _path in [EXPERIMENTS] + [os.path.join(EXPERIMENTS, s) for s in ("likelihood", "recipes")]:
    if _path not in sys.path:
        sys.path.insert(0, _path)

import metrics  # noqa: E402

# ------------------------------------------------------------------------------ the scripts

SCRIPTS = {
    "score_matching/score_objectives.py": (
        ["score_objectives.md", "score_objectives.json", "score_fields.png"],
        "score_objectives.json",
    ),
    "score_matching/ddpm_score_link.py": (
        ["ddpm_score.md", "ncsn_vs_ddpm.md", "ddpm_curve.json", "ddpm_score_link.png"],
        "ncsn_vs_ddpm.json",
    ),
    "samplers/sampler_comparison.py": (
        ["sampler_comparison.md", "floor.json", "sampler_distances.png", "sampler_samples.png"],
        "sampler_comparison.json",
    ),
}


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


@pytest.mark.system
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_quick(script, tmp_path):
    outdir = tmp_path / "out"
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    cmd = [sys.executable, os.path.join(EXPERIMENTS, script), "--quick", "--steps", "10"]
    cmd += ["--outdir", str(outdir)]
    if not script.endswith("score_objectives.py"):
        cmd += ["--workdir", str(tmp_path / "runs")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files, table = SCRIPTS[script]
    for name in files:
        assert (outdir / name).is_file() and (outdir / name).stat().st_size > 0, name
    with open(outdir / table) as f:
        rows = json.load(f)
    assert rows
    values = list(_numbers(rows))
    assert values and all(math.isfinite(v) for v in values)


@pytest.mark.system
def test_digits_sampler_comparison_and_inversion_quick(tmp_path):
    """sampler_comparison.py --digits_workdir on a 2-step run of the tiny digits config (T =
    20, read from its config.json): every sampler at 10 calls, judged by the classifier metric,
    and the DDIM round trip of 8 test digits."""
    from helpers import run_main

    workdir = str(tmp_path / "digits")
    run_main(
        workdir,
        **{
            "training.num_train_steps": 2,
            "training.checkpoint_every": 2,
            "training.eval_at_end": False,
            "eval.classifier.train_steps": 20,
        },
    )
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    script = os.path.join(EXPERIMENTS, "samplers", "sampler_comparison.py")
    for extra in ([], ["--inversion"]):
        cmd = [sys.executable, script, "--quick", "--digits_workdir", workdir, *extra]
        cmd += ["--outdir", str(tmp_path / "out")]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.load(open(tmp_path / "out" / "digits.json"))
    assert [r["sampler"] for r in rows] == [
        "ancestral",
        "DDIM η=0",
        "DPM-Solver++(2M)",
        "Heun (Karras ρ=7)",
    ]
    assert all(r["network calls"] == 10 and r["classifier FD"] > 0 for r in rows)
    (inv,) = json.load(open(tmp_path / "out" / "digits_inversion.json"))
    assert inv["steps K"] == 10 and math.isfinite(inv["RMSE"])


@pytest.mark.system
def test_profile_step_accounts_for_the_step():
    """experiments/perf/profile_step.py on the digits model: the traced kinds and what the trace
    leaves out (Eigen's convolutions) add up to the step's wall time, each kind non-negative, the
    kinds summed the same as the threads; the program is today's CPU default."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    cmd = [sys.executable, os.path.join(EXPERIMENTS, "perf", "profile_step.py")]
    cmd += ["--config", "configs/digits.py", "--batch_size", "16", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    traced = out["traced_ms"]
    assert traced and all(v >= 0 for v in traced.values())
    assert {"dot", "elementwise/reduce forward/optimizer"} <= set(traced)
    total = sum(traced.values())
    assert out["untraced_ms"] == pytest.approx(out["step_wall_ms"] - total, abs=0.1 * len(traced))
    assert sum(out["traced_by_thread_ms"].values()) == pytest.approx(total, abs=0.1 * len(traced))
    assert out["conv_impl"] == "winograd" and out["malloc_tuned"] is True
    assert 0 < out["step_wall_ms"] and 0 < out["step_cpu_ms"]


# ------------------------------------------------------------------------------ the metrics


def _sw_numpy(x, y, theta):
    """SW₂ by explicit loops: per direction, the mean squared gap of the sorted projections."""
    total = 0.0
    for th in theta:
        a, b = np.sort(x @ th), np.sort(y @ th)
        total += np.mean((a - b) ** 2)
    return math.sqrt(total / len(theta))


def _mmd2_numpy(x, y, bandwidths):
    """The unbiased MMD² from its definition, as double loops over the pairs."""

    def k(u, v):
        return sum(math.exp(-np.sum((u - v) ** 2) / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_metrics_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3)).astype(np.float32)
    y = (rng.normal(size=(30, 3)) * 1.5 + 0.3).astype(np.float32)
    key = jax.random.key(0)
    theta = np.asarray(metrics.random_directions(key, 64, 3), np.float64)
    np.testing.assert_allclose(np.linalg.norm(theta, axis=1), 1.0, rtol=1e-6)
    got = float(metrics.sliced_wasserstein(x, y, key, num_projections=64))
    np.testing.assert_allclose(got, _sw_numpy(x.astype(np.float64), y, theta), rtol=1e-4)
    bw = (0.5, 2.0)
    want = _mmd2_numpy(x, y[:20], bw)
    for block in (1024, 7):  # one block, and blocks that do not divide n (padded rows)
        got = float(metrics.mmd2(x, y[:20], bw, block=block))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_metrics_same_vs_shifted():
    key = jax.random.key(1)
    kx, ky = jax.random.split(key)
    n = 1000
    x = jax.random.normal(kx, (n, 2))
    y = jax.random.normal(ky, (n, 2))
    shifted = y + np.array([1.0, 0.0], np.float32)
    sw_same = float(metrics.sliced_wasserstein(x, y, key))
    sw_shift = float(metrics.sliced_wasserstein(x, shifted, key))
    # Same law: of the order of the sampling noise; a shift by 1 along e1: SW₂ ≈ 1/√2 (the mean
    # of (θ·e1)² over the circle is 1/2).
    assert sw_same < 0.1
    assert abs(sw_shift - math.sqrt(0.5)) < 0.1
    mmd_same = float(metrics.mmd2(x, y))
    mmd_shift = float(metrics.mmd2(x, shifted))
    assert abs(mmd_same) < 0.01
    assert mmd_shift > 20 * max(abs(mmd_same), 1e-3)
    assert float(metrics.sliced_wasserstein(x, x, key)) == 0.0


def test_metrics_bad_arguments():
    x = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="as many"):
        metrics.sliced_wasserstein(x, x[:3], jax.random.key(0))
    with pytest.raises(ValueError, match=r"\[n, D\]"):
        metrics.mmd2(x, np.zeros((5, 3), np.float32))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.mmd2(x[:1], x)
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd2(x, x, bandwidths=(0.0,))


def test_independent_pixel_baseline_against_a_loop(tmp_path):
    import likelihood_baselines

    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 5, (30, 2, 3)), rng.integers(0, 5, (7, 2, 3))
    bpd, stderr = likelihood_baselines.independent_pixel_bpd(train, test, 5)
    flat_train, flat_test = train.reshape(30, -1), test.reshape(7, -1)
    per_example = []
    for x in flat_test:
        bits = 0.0
        for d, level in enumerate(x):
            n = sum(1 for row in flat_train if row[d] == level)
            bits -= math.log2((n + 0.5) / (30 + 0.5 * 5))
        per_example.append(bits / len(x))
    assert bpd == pytest.approx(np.mean(per_example), rel=1e-12)
    assert stderr == pytest.approx(np.std(per_example, ddof=1) / math.sqrt(7), rel=1e-9)
    out = likelihood_baselines.main(["--out", str(tmp_path / "b.json")])
    assert out["train_examples"] == 1500 and out["test_examples"] == 297
    assert 0 < out["independent_pixels_bpd"] < out["uniform_bpd"] == pytest.approx(math.log2(17))


def test_likelihood_compare_table_and_curves(tmp_path):
    import likelihood_compare

    runs = []
    for i, label in enumerate(("before", "after")):
        metrics = {
            "bpd": 3.0 - i,
            "bpd_stderr": 0.01,
            "bpd_terms": {"decoder_L0": 1e-6, "sum_Lt": 3.0 - i, "prior_LT": 2e-5},
            "terms_bpd_per_t": list(np.linspace(1, 0.001, 20) / (i + 1)),
            "mse_per_t": list(np.linspace(0.9, 0.01, 20)),
        }
        if i:
            metrics |= {"fd_classifier": 8.5, "fd_classifier_stderr": 3.25}
        (tmp_path / label / "eval").mkdir(parents=True)
        (tmp_path / label / "eval" / "metrics.json").write_text(json.dumps(metrics))
        runs.append(f"{label}={tmp_path / label}")
    text = likelihood_compare.main(["--runs", *runs, "--outdir", str(tmp_path / "out")])
    lines = text.splitlines()
    assert lines[2].startswith("| before | 3.0000 ± 0.0100 | 1e-06 | 3 | 2e-05 | – | – |")
    assert lines[3] == "| after | 2.0000 ± 0.0100 | 1e-06 | 2 | 2e-05 | 8.500 ± 3.250 | – |"
    assert (tmp_path / "out" / "likelihood_curves.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        likelihood_compare.main(["--runs", f"x={tmp_path / 'none'}"])


def test_recipe_compare_table_plots_and_caches(tmp_path):
    """recipe_compare.py on a 2-step digits run: two samplers (one with a sampling key), both
    references, every metric with its error; the samples are cached per run and sampler, so a
    second call draws nothing and gives the same numbers."""
    import recipe_compare
    from helpers import run_main

    workdir = str(tmp_path / "digits")
    run_main(
        workdir,
        **{
            "training.num_train_steps": 2,
            "training.checkpoint_every": 2,
            "eval.num_examples": 8,
            "eval.batch_size": 8,
            "eval.figures": (),
            "eval.classifier.train_steps": 20,
        },
    )
    argv = ["--runs", f"a={workdir}", "--num_samples", "8", "--judge_dir", str(tmp_path / "j")]
    argv += ["--samplers", "dpmpp_2m_sde:5", "ancestral:4:clip_denoised=false"]
    rows = recipe_compare.main([*argv, "--outdir", str(tmp_path / "out")])
    assert [(r["sampler"], r["calls"], r["step"]) for r in rows] == [
        ("dpmpp_2m_sde:5", 5, 2),
        ("ancestral:4:clip_denoised=false", 4, 2),
    ]
    for r in rows:
        assert set(r["quality"]) == {"train", "test"} and r["num_samples"] == 8
        for q in r["quality"].values():
            for m in recipe_compare.METRICS:
                assert all(math.isfinite(q[m + s]) for s in ("", "_stderr", "_real"))
    bpd = json.load(open(os.path.join(workdir, "eval", "metrics.json")))["bpd"]
    assert rows[0]["bpd"] == bpd
    out = tmp_path / "out"
    assert (out / "bound_vs_quality.png").stat().st_size > 0
    assert "| a | " in (out / "recipe_compare.md").read_text()
    again = recipe_compare.main([*argv, "--outdir", str(out), "--plot", "calls"])
    assert again == rows and (out / "quality_vs_calls.png").stat().st_size > 0
    with pytest.raises(ValueError, match="METHOD:CALLS"):
        recipe_compare.parse_sampler("ddim")


def test_codecs_mosaic_and_the_lossless_png_size(tmp_path):
    """fashion_mnist/lossless_codecs.py: image i sits at block (i // 100, i % 100) of the
    mosaic, and the PNG anchor is read from a lossless file of an IDX set it was given (200
    random 4x3 images)."""
    sys.path.insert(0, os.path.join(EXPERIMENTS, "fashion_mnist"))
    import lossless_codecs as fm_codecs

    images = np.random.default_rng(0).integers(0, 256, (200, 4, 3), dtype=np.uint8)
    tiled = fm_codecs.mosaic(images)
    assert tiled.shape == (8, 300)
    for i in (0, 1, 99, 100, 157, 199):
        r, c = divmod(i, 100)
        np.testing.assert_array_equal(tiled[4 * r : 4 * r + 4, 3 * c : 3 * c + 3], images[i])
    header = bytes([0, 0, 8, 3]) + np.array([200, 4, 3], ">u4").tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(header + images.tobytes())
    out = fm_codecs.main(["--idx_dir", str(tmp_path), "--out", str(tmp_path / "c.json")])
    png = out["png (Pillow, compress_level 9, optimize)"]
    assert out["pixels"] == 2400 and png["bits_per_dim"] == 8 * png["bytes"] / 2400
    assert png["bits_per_dim"] > 7.5  # random bytes do not compress
