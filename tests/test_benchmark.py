"""Tests of diffusion_jax.benchmark: the figures it prints are consistent with each other and with
the model, the whole-chain timing runs the product's sampler, and the peer's figures are read and
turned into ratios (with a stand-in peer script: torch is not installed here)."""

import json
import os
import statistics
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from helpers import ROOT, cli_args, tiny_config, xla_flags

from diffusion_jax import benchmark, models, objectives


@pytest.fixture(scope="module")
def result():
    config = tiny_config()
    return config, benchmark.benchmark(
        config, batch_size=8, steps=2, warmup=1, sample_batch=4, chain=True, cpu_peak_gflops=100.0
    )


def test_train_figures_are_consistent(result):
    config, out = result
    model = models.get_model(config)
    x = np.zeros((1, 8, 8, 1), np.float32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, np.zeros(1, np.int32)))
    assert out["num_params"] == sum(p.size for p in jax.tree.leaves(params))
    assert out["batch_size"] == 8 and len(out["train_step_all_s"]) == 2
    # Figures derived from the measured step times, unrounded: no assertion on the times themselves.
    assert out["train_step_s"] == statistics.median(out["train_step_all_s"])
    assert out["train_images_per_s"] == pytest.approx(8 / out["train_step_s"], rel=1e-12)
    assert out["train_images_per_s_best"] == pytest.approx(
        8 / min(out["train_step_all_s"]), rel=1e-12
    )
    assert isinstance(out["compile_s"], float) and out["device_count"] == jax.device_count()
    # A train step (forward, backward: about twice the forward, optimizer) costs 2-5 forwards
    # per pass of the batch; t_sampler loss_aware_vb passes each image twice (two t's).
    passes = 2 if objectives.loss_aware_vb(config) else 1
    ratio = out["train_gflops_per_image"] / out["fwd_gflops_per_image"]
    assert 2 * passes < ratio < 5 * passes, ratio
    assert out["train_gflops"] == pytest.approx(
        out["train_gflops_per_image"] * out["train_images_per_s"], rel=1e-9
    )
    assert out["frac_of_peak"] == pytest.approx(out["train_gflops"] / out["peak_gflops"], rel=1e-12)


def test_sampling_figures(result):
    config, out = result
    assert out["sample_batch_size"] == 4 and len(out["sample_step_all_s"]) == 2
    assert out["sample_step_s"] == statistics.median(out["sample_step_all_s"])
    assert out["sample_images_per_s"] == pytest.approx(4 / out["sample_step_s"], rel=1e-12)
    assert out["chain_method"] == "ancestral" and out["chain_batch_size"] == 4
    assert out["chain_steps"] == config.diffusion.num_timesteps == 20
    assert out["chain_images_per_s"] == pytest.approx(4 / out["chain_s"], rel=1e-12)
    assert isinstance(out["chain_first_call_s"], float)


def test_printed_figures_are_rounded_copies(result):
    _, out = result
    before = dict(out)
    printed = benchmark.rounded(out)
    assert out == before  # the returned figures stay unrounded
    assert set(printed) == set(out)
    assert printed["sample_step_s"] == round(out["sample_step_s"], 4)
    assert printed["train_step_all_s"] == [round(w, 4) for w in out["train_step_all_s"]]
    assert printed["train_gflops"] == round(out["train_gflops"], 1)
    assert printed["num_params"] == out["num_params"] and printed["model"] == out["model"]
    unknown = set(printed) - set(benchmark.PRINT_DIGITS)
    floats = [k for k in unknown if isinstance(out[k], float)]
    assert floats == ["peak_gflops"], floats  # a constant, printed as it is


FAKE_PEER = textwrap.dedent(
    """
    import argparse, json
    p = argparse.ArgumentParser()
    for a in ("--config", "--mode", "--batch", "--steps", "--threads"):
        p.add_argument(a)
    p.add_argument("--override", action="append", default=[])
    a = p.parse_args()
    step = {"train": 4.0, "sample": 0.5}[a.mode]
    r = dict(images_per_s_median=int(a.batch) / step, median_s=step, all_s=[step] * int(a.steps),
             contention={"other_cores": 0.0}, achieved_gflops_median=1.0)
    print("peer log line")
    params = 1000 + len(a.override)  # the stand-in's count tells how many overrides it got
    print(json.dumps({a.mode: r, "fwd_flops_per_image": 2e9, "params": params,
                      "versions": {"torch": "fake"}}))
    """
)


@pytest.mark.system
@pytest.mark.smoke
def test_cli_prints_one_json_line_with_peer_ratios(tmp_path):
    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.benchmark",
        "--config=configs/digits.py",
        *cli_args(),
        "--batch_size=8",
        "--sample_batch_size=4",
        "--steps=1",
        f"--peer_python={sys.executable}",
        f"--peer_script={peer}",
        "--peer_override=sample_size=8",
        "--peer_override=dropout=0.0",
    ]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONPATH=ROOT)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["peer"]["train"]["images_per_s"] == 2.0  # the stand-in: batch 8 in 4 s
    assert out["peer"]["sample"]["images_per_s"] == 8.0  # batch 4 in 0.5 s
    assert out["peer"]["train"]["num_params"] == 1002  # both overrides reached the peer
    assert out["peer"]["train"]["overrides"] == ["sample_size=8", "dropout=0.0"]
    # Ratios of the unrounded figures, printed to 3 decimals like the figures themselves.
    assert out["train_vs_peer"] == pytest.approx(out["train_images_per_s"] / 2.0, abs=1e-3)
    assert out["sample_vs_peer"] == pytest.approx(out["sample_images_per_s"] / 8.0, abs=1e-3)
    assert out["train_vs_peer"] == round(out["train_vs_peer"], 3)
    assert out["sample_step_s"] == round(out["sample_step_s"], 4)
    assert "chain_s" not in out  # --chain not given


def test_input_only_times_the_pipeline_on_the_configs_data():
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.benchmark",
        "--config=configs/digits.py",
        "--input_only",
        "--input_steps=20",
        "--batch_size=32",
    ]
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["input_kind"] == "digits" and out["input_num_examples"] == 1500
    assert out["input_batch_size"] == 32 and out["input_bytes_per_image"] == 64
    assert out["input_images_per_s"] > 0 and out["input_device_images_per_s"] > 0
    assert "train_images_per_s" not in out  # the train step is not timed
