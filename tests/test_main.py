"""The entry point as users run it, in subprocesses: kill -9, Ctrl-C, bad flags, 1 vs 2 devices."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ROOT, main_command, run_main

from diffusion_jax import checkpoints

pytestmark = pytest.mark.system

STEPS = {
    "training.num_train_steps": 30,
    "training.checkpoint_every": 1,
    "training.eval_at_end": False,
}
ENDLESS = {**STEPS, "training.num_train_steps": 10**6}


def _params(workdir, ema):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_params(workdir, ema=ema))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run on one device."""
    workdir = tmp_path_factory.mktemp("ref")
    run_main(workdir, **STEPS)
    return workdir


def _start(workdir, steps=STEPS):
    cmd, env = main_command(workdir, **steps)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_checkpoint(workdir, proc, timeout=300):
    ckpt = os.path.join(workdir, "checkpoints")
    start = time.time()
    while time.time() - start < timeout and proc.poll() is None:
        if os.path.isdir(ckpt) and any(n.isdigit() for n in os.listdir(ckpt)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared; {proc.poll()=}")


def test_kill_9_then_same_command_ends_bit_identical(reference, tmp_path):
    proc = _start(tmp_path)
    _wait_for_checkpoint(tmp_path, proc)
    time.sleep(0.3)  # land somewhere in the middle of training (and maybe of a save)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoints.make_manager(str(tmp_path)).latest_step()
    assert killed_at is not None and killed_at < 30
    run_main(tmp_path, **STEPS)
    for ema in (False, True):
        for a, b in zip(_params(reference, ema), _params(tmp_path, ema), strict=True):
            np.testing.assert_array_equal(a, b)


def test_ctrl_c_saves_a_checkpoint_before_exiting(tmp_path):
    proc = _start(tmp_path, ENDLESS)
    _wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Interrupted" in err and "saving a checkpoint" in err
    manager = checkpoints.make_manager(str(tmp_path))
    step = manager.latest_step()
    import re

    interrupted_at = int(re.search(r"Interrupted \(Ctrl-C\) at step (\d+)", err).group(1))
    assert step == interrupted_at


def test_one_and_two_devices_give_the_same_parameters(reference, tmp_path):
    run_main(tmp_path, devices=2, **STEPS)
    # Float reduction order differs (an all-reduce of two halves); Adam divides each gradient by
    # its own RMS, so where a gradient is ~0 that rounding moves the parameter by up to ~lr per
    # step: absolute differences of order 1e-6 on parameters near zero are expected.
    for a, b in zip(_params(reference, False), _params(tmp_path, False), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)


@pytest.mark.parametrize(
    "override, line",
    [
        (
            "--config.training.batch_sise=4",
            "error: unknown config key training.batch_sise; did you mean training.batch_size?",
        ),
        (
            "--config.optim.lr=1",
            "error: unknown config key optim.lr; did you mean optim.learning_rate?",
        ),
        ("--config.training.bogus=1", "error: unknown config key training.bogus; did you mean"),
        ("--config.trainin.seed=1", "error: unknown config key trainin; did you mean training?"),
    ],
)
def test_unknown_config_key_is_a_clear_error(tmp_path, override, line):
    proc = run_main(tmp_path / "run", override, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(line), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_bad_flag_value_is_one_line_too(tmp_path):
    proc = run_main(tmp_path / "run", "--config.training.batch_size=abc", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: flag --config.training.batch_size=abc: invalid literal for int() with base 10: "
        "'abc'"
    ]


def test_benchmark_names_an_unknown_config_key_the_same_way():
    cmd, env = main_command("unused", "--config.optim.lr=1")
    cmd = [
        cmd[0],
        "-m",
        "diffusion_jax.benchmark",
        "--config=configs/digits.py",
        "--config.optim.lr=1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key optim.lr; did you mean optim.learning_rate?"
    ]


def _error_line(proc) -> str:
    """The one-line error a run ends with (after its log lines), with no traceback."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_an_npz_without_images_is_refused_naming_its_arrays(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, pics=np.zeros((20, 8, 8, 1), np.uint8), labels=np.zeros(20, np.int32))
    proc = run_main(tmp_path / "run", check=False, **{"data.dataset": str(path)})
    line = _error_line(proc)
    assert str(path) in line and "'images'" in line and "'pics', 'labels'" in line, line


def test_an_object_npz_is_refused_naming_the_file_and_the_array(tmp_path):
    path = tmp_path / "mine.npz"
    images = np.empty(20, object)
    images[:] = [np.zeros((8, 8, 1), np.uint8)] * 20
    np.savez(path, images=images)
    proc = run_main(tmp_path / "run", check=False, **{"data.dataset": str(path)})
    line = _error_line(proc)
    assert str(path) in line and "'images'" in line and "object" in line, line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 6-step run of the tiny config (model.ch 32)."""
    workdir = tmp_path_factory.mktemp("tiny")
    run_main(workdir, **{"training.eval_at_end": False})
    return workdir


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_sample_and_eval_refuse_a_different_network_naming_the_keys(tiny_run, mode):
    proc = run_main(
        tiny_run, f"--mode={mode}", check=False, **{"model.ch": 16, "diffusion.num_timesteps": 10}
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ScopeParamShapeError" not in proc.stderr
    assert "holds a run of a different config" in proc.stderr
    assert (
        "model.ch: 32 -> 16" in proc.stderr and "diffusion.num_timesteps: 20 -> 10" in proc.stderr
    )


def test_sample_accepts_other_sampling_and_optimiser_keys(tiny_run):
    run_main(
        tiny_run,
        "--mode=sample",
        **{"sampling.num_samples": 2, "sampling.batch_size": 2, "optim.learning_rate": 0.5},
    )
    assert os.listdir(tiny_run / "samples")


def test_sample_accepts_a_run_without_config_json(tiny_run, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(tiny_run, old)
    os.remove(old / "config.json")  # a run of a version that wrote none
    run_main(old, "--mode=sample")


def test_an_interrupt_from_the_first_moment_exits_130_and_saves_nothing_untrained(tmp_path):
    """SIGINT or SIGTERM at random moments of start-up, compilation and the first steps (10
    tries): exit 130 every time, never a crash, and a checkpoint only of a step that trained."""
    import random
    import re

    rng = random.Random(0)
    for i in range(10):
        workdir = tmp_path / f"try{i}"
        proc = _start(workdir, ENDLESS)
        time.sleep(rng.uniform(0.1, 8.0))
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, (i, signum, err[-3000:])
        saved = re.search(r"Interrupted \(\w+(?:-\w+)?\) at step (\d+): saving", err)
        ckpt = os.path.join(workdir, "checkpoints")
        steps = (
            sorted(int(s) for s in os.listdir(ckpt) if s.isdigit()) if os.path.isdir(ckpt) else []
        )
        assert 0 not in steps, (i, steps)
        if saved:
            assert int(saved.group(1)) in steps
