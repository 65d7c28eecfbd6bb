"""The distillation command as users run it (``distill_train``, in subprocesses): a workdir of an
earlier version distils in rounds, a kill -9 mid-round resumes to the same students, and
``--mode eval|sample`` read the student of their steps; plus the student's initialisation and
the refusals, in this process."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, apply_overrides, xla_flags

from configs import digits_distill
from diffusion_jax import checkpoints, distill_train, evaluation, models

pytestmark = pytest.mark.system

# The teacher: a tiny digits run of an earlier commit (attention at 4x4, dropout, T = 20,
# learned variances), whose network the config reads from its config.json.
OLD_TEACHER = os.path.join(ROOT, "tests", "data", "old_runs", "34a522e")
ROUNDS = {  # 8 -> 4 -> 2 steps, 4 updates each, a checkpoint after every update
    "distill.start_steps": 8,
    "distill.target_steps": 2,
    "distill.steps_per_round": 4,
    "training.batch_size": 8,
    "training.checkpoint_every": 1,
    "training.log_every": 2,
    "training.eval_at_end": False,
    "sampling.num_steps": 2,
    "sampling.num_samples": 4,
    "sampling.batch_size": 4,
}


def _command(workdir, teacher, *args, **overrides):
    env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        f"--config=configs/digits_distill.py:{teacher}",
        f"--workdir={workdir}",
        *(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
          for k, v in {**ROUNDS, **overrides}.items()),
        *args,
    ]  # fmt: skip
    return cmd, env


def _run(workdir, teacher, *args, check=True, **overrides):
    cmd, env = _command(workdir, teacher, *args, **overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("old") / "teacher")
    shutil.copytree(OLD_TEACHER, path)
    return path


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """The old run distilled 8 -> 4 -> 2, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("distilled"))
    proc = _run(workdir, teacher)
    return workdir, proc.stderr


def _config(teacher=OLD_TEACHER, **overrides):
    """configs/digits_distill.py:TEACHER with ROUNDS and ``overrides`` (dotted keys)."""
    return apply_overrides(digits_distill.get_config(teacher), {**ROUNDS, **overrides})


def _student(workdir, n):
    params, meta = checkpoints.load_student(workdir, n)
    return [np.asarray(x) for x in jax.tree.leaves(params)], meta


def test_an_old_run_distils_in_rounds_each_student_saved_with_its_grid(reference):
    workdir, log = reference
    assert checkpoints.student_steps(workdir) == [2, 4]
    for n, r in ((4, 0), (2, 1)):
        _, meta = _student(workdir, n)
        assert meta["round"] == r and meta["num_steps"] == n and meta["teacher_steps"] == 2 * n
        assert meta["step"] == 4 * (r + 1)
        # Uniform in t on the teacher's T = 20 steps (t in [0, 19]), noisiest first.
        np.testing.assert_allclose(meta["grid_t"], 19 * np.arange(n, 0, -1) / n, rtol=1e-6)
        assert os.path.exists(os.path.join(workdir, "samples", "rounds", f"student_{n}.png"))
    assert "round 1/2: 8 -> 4 steps" in log and "Round 2/2 done in" in log
    # The student's network is the old teacher's (attention at 4x4), v-prediction, 1 channel out.
    config = _config()
    assert tuple(config.model.attn_resolutions) == (4,) and config.diffusion.mean_type == "v"


def test_kill_9_mid_round_then_the_same_command_gives_the_same_students(
    reference, teacher, tmp_path
):
    workdir = str(tmp_path)
    cmd, env = _command(workdir, teacher)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ckpt = checkpoints.checkpoint_dir(workdir)
    start = time.time()
    while time.time() - start < 300 and proc.poll() is None:  # into round 2 (step 5 or later)
        if os.path.isdir(ckpt) and any(n.isdigit() and int(n) >= 5 for n in os.listdir(ckpt)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = checkpoints.make_manager(workdir).latest_step()
    assert killed_at is not None and 5 <= killed_at < 8, killed_at
    assert checkpoints.student_steps(workdir) == [4]  # round 1 done, round 2 not
    log = _run(workdir, teacher).stderr
    assert f"Resuming from the checkpoint of step {killed_at} (round 2 of 2)" in log
    assert "round 1/2" not in log  # the round counter resumed too
    for n in (4, 2):
        for a, b in zip(_student(reference[0], n)[0], _student(workdir, n)[0], strict=True):
            np.testing.assert_array_equal(a, b)


def test_eval_of_a_student_refuses_the_bound_in_one_line_and_judges_its_samples(reference):
    workdir, _ = reference
    proc = _run(
        workdir,
        OLD_TEACHER,
        "--mode=eval",
        **{
            "eval.metrics": ("bpd", "fd_classifier", "is_classifier"),
            "eval.classifier.train_steps": 20,
            "eval.classifier.num_samples": 16,
            "eval.classifier.batch_size": 16,
            "eval.classifier.num_bootstrap": 2,
            "sampling.num_steps": 4,
            "sampling.batch_size": 8,
        },
    )
    lines = [line for line in proc.stderr.splitlines() if "eval bpd" in line]
    assert len(lines) == 1 and "no meaning for a distilled student" in lines[0], lines
    metrics = evaluation_metrics(workdir, 4)
    assert "bpd" not in metrics and metrics["student_steps"] == 4
    assert np.isfinite(metrics["fd_classifier"]) and metrics["is_classifier"] >= 1.0
    assert metrics["checkpoint_step"] == 4  # the 4-step student: round 1's


def evaluation_metrics(workdir, n):
    import json

    with open(os.path.join(workdir, "eval", f"student_{n}", "metrics.json")) as f:
        return json.load(f)


def test_sample_reads_the_student_of_its_steps_and_refuses_a_grid_it_has_not(reference):
    workdir, _ = reference
    _run(workdir, OLD_TEACHER, "--mode=sample", **{"sampling.num_steps": 4})
    with np.load(os.path.join(workdir, "samples", "student_4", "samples.npz")) as f:
        assert f["samples"].shape == (4, 8, 8, 1) and np.all(np.isfinite(f["samples"]))
    proc = _run(workdir, OLD_TEACHER, "--mode=sample", check=False, **{"sampling.num_steps": 8})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: config.sampling.num_steps=8: a distilled run samples only on the grids of its "
        "students, [4, 2] steps."
    )


# ------------------------------------------------------------------ in this process


def test_the_student_starts_from_the_teachers_weights_without_the_variance_channels():
    teacher = {"conv_out": {"kernel": jnp.arange(24.0).reshape(1, 3, 4, 2), "bias": jnp.ones(2)}}
    abstract = {
        "conv_out": {
            "kernel": jax.ShapeDtypeStruct((1, 3, 4, 1), jnp.float32),
            "bias": jax.ShapeDtypeStruct((1,), jnp.float32),
        }
    }
    student = distill_train.student_init(teacher, abstract)
    np.testing.assert_array_equal(
        student["conv_out"]["kernel"], teacher["conv_out"]["kernel"][..., :1]
    )
    assert student["conv_out"]["bias"].shape == (1,)
    with pytest.raises(ValueError, match=r"the teacher's network is not the student's"):
        distill_train.student_init({"other": teacher["conv_out"]}, abstract)
    small = {"conv_out": {"kernel": jnp.zeros((1, 3, 2, 2)), "bias": jnp.ones(2)}}
    with pytest.raises(
        ValueError, match=r"shape \(1, 3, 2, 2\) cannot start one of \(1, 3, 4, 1\)"
    ):
        distill_train.student_init(small, abstract)


def test_a_student_of_a_different_network_than_its_teacher_is_refused_naming_the_keys(teacher):
    config = _config(teacher, **{"model.ch": 32})
    with pytest.raises(ValueError, match=r"(?s)must be its teacher's.*model.ch: 16 -> 32"):
        distill_train.load_teacher(evaluation.prepare(config))


def test_a_missing_teacher_is_refused_with_the_command_that_trains_it(tmp_path):
    config = evaluation.prepare(_config(**{"distill.teacher": str(tmp_path / "none")}))
    with pytest.raises(ValueError, match=r"holds no trained run .*--config configs/digits.py"):
        distill_train.load_teacher(config)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("diffusion.mean_type", "eps", r"predicts v \(or x0\), never eps"),
        ("distill.start_steps", 12, r"start_steps=12 must be target_steps=2 times a power of 2"),
        ("distill.teacher", "", r"distill.teacher is empty"),
        ("distill.weight", "snr", r"distill.weight='snr' is not one of"),
        ("sampling.method", "ddim", r"sampling.method='ddim' does not sample a .*'distill'"),
    ],
)
def test_bad_distillation_configs_are_refused_in_one_line(key, value, match):
    config = _config(**{key: value})
    with pytest.raises(ValueError, match=match):
        evaluation.prepare(config)


def test_the_student_model_has_one_output_channel_per_image_channel():
    config = evaluation.prepare(_config())
    model = models.get_model(config)
    x = jnp.zeros((1, 8, 8, 1))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32)))
    assert params["params"]["conv_out"]["kernel"].shape[-1] == 1
