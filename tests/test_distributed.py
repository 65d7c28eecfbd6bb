"""Multi-host training on one machine: 2 processes x 1 CPU device against 1 process x 2 devices.

The processes are ``python -m diffusion_jax.main --distributed`` with a local coordinator
(``JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT``) and the CPU backend's cross-process collectives
(gloo), as a cluster job runs them; each process feeds its half of the global batch.

Only process 0 writes the persistent compilation cache, and on CPU the other processes' cache keys
differ from its keys, so process 1 compiles every program in every run: the model here is the tiny
digits U-Net cut to one resolution level, which halves that time.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import ROOT, cli_args, xla_flags

from diffusion_jax import checkpoints

# One worker for the module: the SIGTERM-stopped run is resumed and compared with the runs of
# ``runs`` (conftest: an explicit group replaces the one per fixture).
pytestmark = [pytest.mark.system, pytest.mark.xdist_group("test_distributed")]

NUM_STEPS = 12
RUN = {
    "model.ch_mult": (1,),  # one level at 8x8 (no attention): compiles in half the time
    "training.num_train_steps": NUM_STEPS,
    "training.log_every": 1,
    "training.checkpoint_every": 4,
}
INTERRUPTED = {**RUN, "training.num_train_steps": 10**6}  # stopped by SIGTERM


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, logdir, num_processes, devices, **overrides):
    """Start the ``num_processes`` processes of one run, ``devices`` CPU devices each."""
    cluster, args = {}, []
    if num_processes > 1:
        cluster = {
            "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}",
            "JAX_NUM_PROCESSES": str(num_processes),
        }
        args = ["--distributed"]
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        *cli_args(**overrides),
        *args,
    ]
    run = []
    for i in range(num_processes):
        env = dict(
            os.environ,
            **cluster,
            XLA_FLAGS=xla_flags(devices),
            PYTHONPATH=ROOT,
            TF_CPP_MIN_LOG_LEVEL="3",
        )
        if cluster:
            env["JAX_PROCESS_ID"] = str(i)
        path = os.path.join(logdir, f"{os.path.basename(workdir)}.{i}.log")
        log = open(path, "w")
        run.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), path))
        log.close()
    return run


def _read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _wait(*runs, timeout=600):
    """Wait for every process; outputs per run. A process failing (other than exit 0 or 130)
    stops the others, which would wait for it forever."""
    procs = [p for run in runs for p, _ in run]
    deadline = time.time() + timeout
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        if any(p.poll() not in (None, 0, 130) for p in procs):
            break
        time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for run in runs:
        for p, path in run:
            if p.returncode not in (0, 130):
                raise AssertionError(f"{p.args} failed ({p.returncode}):\n{_read(path)[-4000:]}")
    return [[(p.returncode, _read(path)) for p, path in run] for run in runs]


def _params(workdir, ema):
    return [np.asarray(x) for x in jax.tree.leaves(checkpoints.load_params(str(workdir), ema=ema))]


def _interrupted_at(output: str) -> int:
    return int(re.search(r"Interrupted \(SIGTERM\) at step (\d+): saving", output).group(1))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side: the run (12 steps, then samples and bits/dim) on 1 process x 2 devices and
    on 2 processes x 1 device."""
    logdir = tmp_path_factory.mktemp("logs")
    one = tmp_path_factory.mktemp("one_process_two_devices")
    two = tmp_path_factory.mktemp("two_processes")
    outputs = _wait(_start(one, logdir, 1, 2, **RUN), _start(two, logdir, 2, 1, **RUN))
    return {"one": one, "two": two, "outputs": outputs}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 2-process run that gets a SIGTERM (process 1 only) early on: (workdir, outputs)."""
    workdir = tmp_path_factory.mktemp("two_processes_sigterm")
    run = _start(workdir, tmp_path_factory.mktemp("logs"), 2, 1, **INTERRUPTED)
    (p0, log0), (p1, _) = run
    started = time.time()
    while "step 2:" not in _read(log0) and p0.poll() is None and time.time() < started + 600:
        time.sleep(0.1)
    p1.send_signal(signal.SIGTERM)  # as a scheduler would, to one of the processes
    [outputs] = _wait(run)
    return workdir, outputs


def test_two_processes_give_the_parameters_of_one_process_with_two_devices(runs):
    one, two = runs["one"], runs["two"]
    (rc0, out0), (rc1, _) = runs["outputs"][1]
    assert rc0 == rc1 == 0
    assert "Process 0 of 2: 1 local of 2 devices" in out0
    assert "2 device(s) in 2 process(es); global batch 8" in out0
    for ema in (False, True):
        for a, b in zip(_params(one, ema), _params(two, ema), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)
    # Sampling and the full ELBO, sharded over both processes, agree too.
    with open(os.path.join(one, "eval", "metrics.json")) as f:
        m1 = json.load(f)
    with open(os.path.join(two, "eval", "metrics.json")) as f:
        m2 = json.load(f)
    assert m2["num_examples"] == m1["num_examples"] == 16
    assert m2["bpd"] == pytest.approx(m1["bpd"], rel=1e-5)
    np.testing.assert_allclose(m2["terms_bpd_per_t"], m1["terms_bpd_per_t"], rtol=1e-4)
    s1 = np.load(os.path.join(one, "samples", "samples.npz"))["samples"]
    s2 = np.load(os.path.join(two, "samples", "samples.npz"))["samples"]
    assert s2.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(s2, s1, atol=1e-4)


def test_only_process_0_writes_logs_and_reports(runs):
    two = runs["two"]
    (_, out0), (_, out1) = runs["outputs"][1]
    logs = [n for n in os.listdir(two) if n.startswith("log.") and n != "log.INFO"]
    assert len(logs) == 1, logs  # process 0's; process 1 logs warnings to its stderr only
    assert "Training done" in out0 and "Training done" not in out1
    assert len([n for n in os.listdir(two) if n.startswith("events.out.tfevents")]) == 1


def test_sigterm_to_one_process_stops_all_at_one_step_with_a_checkpoint(stopped):
    workdir, [(rc0, out0), (rc1, out1)] = stopped
    assert rc0 == rc1 == 130, (out0[-3000:], out1[-3000:])
    step = _interrupted_at(out0)
    assert _interrupted_at(out1) == step  # JAX's preemption sync point: the same step for all
    assert 2 <= step < NUM_STEPS
    assert checkpoints.make_manager(str(workdir)).latest_step() == step


def test_two_process_run_resumes_from_its_checkpoint(runs, stopped, tmp_path):
    """The SIGTERM-stopped run, continued to step 12 by a new 2-process run, ends bit-identical
    to the uninterrupted 2-process run."""
    resumed = tmp_path / "resumed"
    shutil.copytree(stopped[0], resumed)
    step = _interrupted_at(stopped[1][0][1])
    [[(_, out0), _]] = _wait(
        _start(resumed, tmp_path, 2, 1, **RUN, **{"training.eval_at_end": False})
    )
    assert f"Resuming from the checkpoint of step {step}" in out0
    assert checkpoints.make_manager(str(resumed)).latest_step() == NUM_STEPS
    for ema in (False, True):
        for a, b in zip(_params(runs["two"], ema), _params(resumed, ema), strict=True):
            np.testing.assert_array_equal(b, a)
