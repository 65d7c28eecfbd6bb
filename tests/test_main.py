"""The entry point as users run it, in subprocesses: kill -9, Ctrl-C, bad flags, 1 vs 2 devices."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ROOT, corrupt_checkpoint, main_command, run_main

from diffusion_jax import checkpoints

pytestmark = pytest.mark.system

STEPS = {  # a save every step (about 1 s each): kill -9 lands between two of them
    "training.num_train_steps": 12,
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
    assert killed_at is not None and killed_at < 12
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
    run_main(tmp_path, devices=2, **{**STEPS, "training.checkpoint_every": 12})
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
        (  # a name of an earlier version: configs/base.py RENAMED
            "--config.eval.rd_num_examples=16",
            "error: config key eval.rd_num_examples is now eval.rate_distortion.num_examples",
        ),
        ("--config.cpu_conv_library=eigen", "error: config key cpu_conv_library was removed"),
    ],
)
def test_unknown_config_key_is_a_clear_error(tmp_path, override, line):
    proc = run_main(tmp_path / "run", override, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(line), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


@pytest.mark.parametrize(
    "source, line",
    [
        (None, "error: --config {f}: no such file '{f}'."),
        (
            "raise RuntimeError('boom')\n",
            "error: the config file {f} raised RuntimeError: boom (line 1).",
        ),
        (
            "def get_config(:\n",
            "error: the config file {f} does not compile: invalid syntax (line 1).",
        ),
    ],
    ids=["missing", "raises", "syntax"],
)
def test_a_config_file_that_cannot_load_is_one_line(tmp_path, source, line):
    """Issue 28 #11: no traceback for a missing, raising or broken config file."""
    f = str(tmp_path / "c.py")
    if source is not None:
        open(f, "w").write(source)
    proc = run_main(tmp_path / "run", check=False, config=f)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [line.format(f=f)]


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("")
    proc = run_main(tmp_path / "afile", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1]
        == f"error: --workdir {tmp_path / 'afile'} is a file, not a folder."
    )


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
    # Issue 41 row 13: the error once, no config dump; the workdir this run made is removed.
    assert proc.stderr.count("error:") == 1 and "Config:" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")


def test_a_refused_run_in_a_new_workdir_leaves_no_workdir_and_one_line(tmp_path):
    """Issue 41 rows 4 and 13: an optim value refused before compiling, in one line, with no
    config dump before it; sample mode in a new folder (no checkpoint): one line, no folder."""
    proc = run_main(tmp_path / "run", check=False, **{"optim.ema_decay": "nan"})
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: config.optim.ema_decay=nan") and "must be" in proc.stderr
    assert not os.path.exists(tmp_path / "run")
    proc = run_main(tmp_path / "run", "--mode=sample", check=False)
    assert _error_line(proc).startswith("error: ") and not os.path.exists(tmp_path / "run")


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


@pytest.mark.smoke
def test_eval_and_sample_modes_of_a_trained_run(tiny_run, tmp_path):
    """The three modes from the command line: ``tiny_run`` trained; eval writes metrics.json of
    the newest checkpoint, sample writes samples.npz and samples.png."""
    import json
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    run_main(workdir, "--mode=eval", **{"eval.num_examples": 8})
    metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint_step"] == 6 and metrics["num_examples"] == 8
    assert np.isfinite(metrics["bpd"]) and "failed" not in metrics
    run_main(workdir, "--mode=sample")
    with np.load(workdir / "samples" / "samples.npz") as f:
        assert f["samples"].shape == (4, 8, 8, 1) and np.isfinite(f["samples"]).all()
    assert (workdir / "samples" / "samples.png").stat().st_size > 0


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
    """SIGINT or SIGTERM at random moments of start-up, compilation and the first steps (6
    tries, one in each sixth of 0.1-8 s): exit 130 every time, never a crash, and a checkpoint
    only of a step that trained."""
    import random
    import re

    rng = random.Random(0)
    tries = 6
    for i in range(tries):
        workdir = tmp_path / f"try{i}"
        proc = _start(workdir, ENDLESS)
        time.sleep(0.1 + 7.9 * (i + rng.random()) / tries)
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


@pytest.mark.parametrize("mode", ["sample", "eval"])
def test_an_interrupt_of_sample_or_eval_exits_130_never_a_crash(tiny_run, tmp_path, mode):
    """Issue 28 #4: Ctrl-C / SIGTERM at random moments of --mode sample or eval (start-up,
    compilation, between the chain's compiled calls): recorded and acted on at a safe point."""
    import random
    import shutil

    rng = random.Random(1 if mode == "sample" else 2)
    long = {  # long enough that the signal always comes first
        "sampling.num_samples": 20_000,
        "sampling.batch_size": 4,
        "eval.num_examples": 0,
        "eval.batch_size": 2,
        "eval.metrics": ("bpd",),
    }
    for i in range(3):
        workdir = tmp_path / f"try{i}"
        shutil.copytree(tiny_run, workdir)
        cmd, env = main_command(workdir, f"--mode={mode}", **long)
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        time.sleep(rng.uniform(0.2, 10.0))
        signum = rng.choice([signal.SIGINT, signal.SIGTERM])
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 130, (i, signum, proc.returncode, err[-3000:])
        assert "Segmentation" not in err and "Traceback" not in err, (i, err[-3000:])


# Issue 17's rows through the CLI: what a user meets, one clear line, never a traceback.


def test_a_damaged_newest_checkpoint_is_named_moved_aside_and_the_run_walks_back(
    tiny_run, tmp_path
):
    """What the user sees of one damage (its data overwritten); each of DAMAGES is walked back
    in-process by test_train.py's twin of this test."""
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    ckpt = workdir / "checkpoints"
    corrupt_checkpoint(ckpt / "6", "data overwritten")
    proc = run_main(workdir, **{"training.eval_at_end": False})
    assert "Traceback" not in proc.stderr, proc.stderr[-6000:]
    warnings = [line for line in proc.stderr.splitlines() if "cannot be restored" in line]
    assert len(warnings) == 1 and "6" in warnings[0] and str(ckpt / "corrupt-6") in warnings[0]
    assert (ckpt / "corrupt-6").is_dir()  # kept, never deleted
    assert "Resuming from the checkpoint of step 4" in proc.stderr
    for ema in (False, True):  # steps 5 and 6 trained again: the same parameters as before
        for a, b in zip(_params(tiny_run, ema), _params(workdir, ema), strict=True):
            np.testing.assert_array_equal(a, b)


def test_no_restorable_checkpoint_left_is_one_line(tiny_run, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(tiny_run, workdir)
    for step in (2, 4, 6):
        corrupt_checkpoint(workdir / "checkpoints" / str(step), "garbage metadata")
    line = _error_line(run_main(workdir, check=False, **{"training.eval_at_end": False}))
    assert line.startswith("error: None of the checkpoints [6, 4, 2]"), line


def test_a_second_train_process_on_one_workdir_is_one_line_naming_the_holder(tmp_path):
    import json
    import socket

    from diffusion_jax import workdir_lock

    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = {"host": socket.gethostname(), "pid": os.getpid()}  # a live process: this one
    (workdir / workdir_lock.LOCK_NAME).write_text(json.dumps(holder))
    line = _error_line(run_main(workdir, check=False))
    assert "in use by another train process" in line and f"pid {os.getpid()}" in line, line
    assert not (workdir / "checkpoints").exists()


INJECT_ENOSPC = """
import errno, os, runpy
import orbax.checkpoint as ocp

real_save = ocp.CheckpointManager.save

def failing_save(self, step, *args, **kwargs):  # the disk fills up at the save of step 4
    if step == 4:
        os.makedirs(os.path.join(os.fspath(self.directory), "4.orbax-checkpoint-tmp-1"))
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(self, step, *args, **kwargs)

ocp.CheckpointManager.save = failing_save
runpy.run_module("diffusion_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    """Fault injection: ``python -m diffusion_jax.main`` run through a wrapper whose orbax save
    of step 4 leaves a temporary folder and raises ENOSPC."""
    script = tmp_path / "inject.py"
    script.write_text(INJECT_ENOSPC)
    cmd, env = main_command(tmp_path / "run", **{"training.eval_at_end": False})
    assert cmd[1:3] == ["-m", "diffusion_jax.main"]
    cmd = [cmd[0], str(script), *cmd[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = _error_line(proc)
    assert "step 4" in line and "No space left on device" in line, line
    assert "The newest checkpoint is step 2" in line, line
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]  # tmp folder removed


def test_a_truncated_image_in_a_folder_is_one_line_naming_the_file(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.full((8, 8), 16 * i, np.uint8)).save(folder / f"{i}.png")
    bad = folder / "3.png"
    bad.write_bytes(bad.read_bytes()[:40])
    proc = run_main(
        tmp_path / "run", check=False, **{"data.dataset": str(folder), "data.num_bins": 256}
    )
    line = _error_line(proc)
    assert str(bad) in line and "Repair or remove it" in line, line


def test_a_nan_stop_names_the_last_good_checkpoint_and_resumes_with_another_lr(tmp_path):
    nan = {
        # Warmup from 0: step 0 changes nothing, step 1's lr of 1e35 makes the loss NaN.
        "optim.learning_rate": 1e38,
        "optim.grad_clip": 0.0,
        "optim.warmup_steps": 1000,
        "training.num_train_steps": 4,
        "training.checkpoint_every": 1,
        "training.log_every": 1,
        "training.eval_at_end": False,
    }
    workdir = tmp_path / "run"
    line = _error_line(run_main(workdir, check=False, **nan))
    import re

    # Step 2's update overflows the parameters: caught before its save, checkpoint 1 named.
    bad = int(re.search(r"The parameter norm is inf at step (\d+)", line).group(1))
    last = checkpoints.make_manager(str(workdir)).latest_step()
    assert last == bad - 1 and f"(loss, gradient and parameters) is step {last} in" in line, line
    assert "--allow_config_change=optim.learning_rate" in line
    lower = {**nan, "optim.learning_rate": 1e-3}
    refused = run_main(workdir, check=False, **lower)
    _error_line(refused)  # exit 1, no traceback; the message lists the differing keys
    assert "optim.learning_rate: 1e+38 -> 0.001" in refused.stderr, refused.stderr[-3000:]
    run_main(workdir, "--allow_config_change=optim.learning_rate", **lower)
    assert checkpoints.make_manager(str(workdir)).latest_step() == 4
    assert all(np.all(np.isfinite(p)) for p in _params(workdir, False))
