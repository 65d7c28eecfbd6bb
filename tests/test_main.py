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

    interrupted_at = int(re.search(r"Interrupted \(.*\) at step (\d+)", err).group(1))
    assert step == interrupted_at


def test_one_and_two_devices_give_the_same_parameters(reference, tmp_path):
    run_main(tmp_path, devices=2, **STEPS)
    # Float reduction order differs (an all-reduce of two halves); Adam divides each gradient by
    # its own RMS, so where a gradient is ~0 that rounding moves the parameter by up to ~lr per
    # step: absolute differences of order 1e-6 on parameters near zero are expected.
    for a, b in zip(_params(reference, False), _params(tmp_path, False), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    proc = run_main(tmp_path / "run", "--config.training.batch_sise=4", check=False)
    assert proc.returncode != 0
    assert "batch_sise" in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
