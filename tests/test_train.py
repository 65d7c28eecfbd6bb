import functools
import json
import os
import shutil
from unittest import mock

import jax
import numpy as np
import pytest
from helpers import DAMAGES, corrupt_checkpoint, tiny_config

from diffusion_jax import (
    checkpoints,
    evaluation,
    input_pipeline,
    interrupts,
    objectives,
    sharding,
    train,
)
from diffusion_jax import config as config_lib


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def _assert_trees_equal(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 6-step run on 2 devices, with the final samples and evaluation."""
    workdir = str(tmp_path_factory.mktemp("full"))
    state = train.train_and_evaluate(tiny_config(), workdir)
    return workdir, state


def test_run_writes_checkpoints_metrics_samples_and_eval(full_run):
    workdir, state = full_run
    assert int(state.step) == 6
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))) == [2, 4, 6]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["dataset"] == "digits"
    samples = np.load(os.path.join(workdir, "samples", "samples.npz"))["samples"]
    assert samples.shape == (4, 8, 8, 1) and np.all(np.abs(samples) <= 1)
    assert os.path.exists(os.path.join(workdir, "samples", "samples.png"))
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["num_examples"] == 16 and len(metrics["terms_bpd_per_t"]) == 20
    terms = metrics["bpd_terms"]
    parts = terms["decoder_L0"] + terms["sum_Lt"] + terms["prior_LT"]
    assert metrics["bpd"] == pytest.approx(parts, rel=1e-5)
    assert 0 < metrics["bpd"] < 50
    # EMA moved away from its warm start but less than the raw parameters.
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(_leaves(state.params), _leaves(state.ema_params), strict=True)
    )


def test_load_params_returns_ema_or_raw(full_run):
    workdir, state = full_run
    _assert_trees_equal(checkpoints.load_params(workdir), state.ema_params)
    _assert_trees_equal(checkpoints.load_params(workdir, ema=False), state.params)
    with pytest.raises(FileNotFoundError, match="step 5"):
        checkpoints.load_params(workdir, step=5)


def test_sample_and_eval_modes_use_the_newest_checkpoint(full_run):
    workdir, _ = full_run
    config = tiny_config(
        **{"sampling.method": "ddim", "sampling.num_steps": 5, "sampling.num_samples": 6}
    )
    samples = evaluation.sample(config, workdir)
    assert samples.shape == (6, 8, 8, 1) and np.all(np.isfinite(samples))
    saved = np.load(os.path.join(workdir, "samples", "samples.npz"))["samples"]
    np.testing.assert_array_equal(saved, samples)
    metrics = evaluation.evaluate(tiny_config(**{"eval.num_examples": 8}), workdir)
    assert metrics["num_examples"] == 8 and np.isfinite(metrics["bpd"])
    # metrics.json names the step it evaluated (issue 28 #9).
    saved = json.load(open(os.path.join(workdir, "eval", "metrics.json")))
    assert saved["checkpoint_step"] == 6


def test_resume_is_bit_identical(full_run, tmp_path):
    _, reference = full_run
    workdir = str(tmp_path)
    train.train_and_evaluate(
        tiny_config(**{"training.num_train_steps": 3, "training.eval_at_end": False}), workdir
    )
    # As if killed after the save of step 2: the final save of step 3 never happened.
    import shutil

    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    resumed = train.train_and_evaluate(tiny_config(**{"training.eval_at_end": False}), workdir)
    assert int(resumed.step) == 6
    _assert_trees_equal(resumed.params, reference.params)
    _assert_trees_equal(resumed.ema_params, reference.ema_params)
    _assert_trees_equal(resumed.opt_state, reference.opt_state)


def test_half_written_checkpoint_is_ignored(full_run, tmp_path):
    workdir = str(tmp_path)
    config = tiny_config(**{"training.num_train_steps": 2, "training.eval_at_end": False})
    train.train_and_evaluate(config, workdir)
    # A save killed midway leaves orbax's temporary folder, never a folder named by the step.
    partial = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp-123")
    os.makedirs(os.path.join(partial, "state"))
    manager = checkpoints.make_manager(workdir)
    assert manager.latest_step() == 2


def test_the_first_state_that_cannot_resume():
    nan, inf = float("nan"), float("inf")
    window = {  # steps 3, 4, 5
        "loss": np.array([1.0, 1.2e7, nan]),
        "grad_norm": np.array([1.0, nan, nan]),
        "param_norm": np.array([1.0, 2.0, nan]),
    }
    # Step 4's gradient (at state 3's parameters) is NaN with a finite loss: state 3 is bad.
    *where, value = train._first_bad_state(window, 3)
    assert where == [3, 4, "gradient norm"] and np.isnan(value)
    finite_grads = dict(window, grad_norm=np.ones(3), loss=np.ones(3))
    finite_grads["param_norm"] = np.array([1.0, inf, inf])  # state 4's parameters overflowed
    assert train._first_bad_state(finite_grads, 3) == (4, 4, "parameter norm", inf)
    assert train._first_bad_state({k: np.ones(3) for k in window}, 3) is None


@pytest.mark.parametrize("lr", [1e6, 1e3])
def test_the_advised_recovery_from_a_divergence_trains_to_the_end(tmp_path, lr):
    """Issue 28 #3: learning rate 1e6, checkpoints every 2 steps. A step with a finite loss but
    a non-finite gradient condemns the state it was computed at, so the checkpoint the message
    names is one that resumes: the advised lower learning rate then trains to the end."""
    workdir = str(tmp_path)
    config = tiny_config(**{"optim.learning_rate": lr, "training.eval_at_end": False})
    with pytest.raises(train.NonFiniteLossError) as info:
        train.train_and_evaluate(config, workdir)
    message = str(info.value)
    assert "--allow_config_change=optim.learning_rate" in message
    for leaf in (
        _leaves(checkpoints.load_params(workdir, ema=False))
        if checkpoints.make_manager(workdir).latest_step() is not None
        else []
    ):
        assert np.all(np.isfinite(leaf))
    config.optim.learning_rate = 1e-4
    allow = ("optim.learning_rate",)
    try:
        state = train.train_and_evaluate(config, workdir, allow_config_change=allow)
    except train.NonFiniteLossError as e:
        # The finite checkpoint it resumed from diverged again (1e3's step 2): the message says
        # so and walks back; the same advice then works.
        assert "again after resuming from step" in str(e)
        state = train.train_and_evaluate(config, workdir, allow_config_change=allow)
    assert int(state.step) == config.training.num_train_steps
    assert all(np.all(np.isfinite(leaf)) for leaf in _leaves(state.params))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"diffusion.mean_type": "score"}, r"diffusion.mean_type='score'.*\('eps', 'x0', 'v'\)"),
        ({"sampling.method": "euler"}, r"sampling.method='euler'"),
        ({"training.batch_size": 3}, r"training.batch_size=3 .*multiple of the number of devices"),
        ({"data.dataset": "no_such_data"}, r"Unknown data set.*no_such_data"),
        ({"model.name": "transformer"}, r"transformer"),
        ({"diffusion.num_timesteps": 0}, r"0"),
        ({"eval.metrics": ("bpd", "lpips")}, r"lpips"),
        ({"training.objective": "ncsn", "ncsn.sigma_min": 10.0}, r"sigma_min"),
        ({"training.objective": "ncsn", "ncsn.step_lr": 0.0}, r"ncsn.step_lr=0.0"),
        # Class-conditional models and guidance.
        (
            {"data.dataset": "moons", "data.image_size": 0, "data.num_channels": 2}
            | {"model.name": "mlp", "model.num_classes": 2},
            r"^config.model.num_classes=2 needs labelled data, but data.dataset='moons' is a toy",
        ),
        ({"training.label_dropout": 0.1}, r"label_dropout=0.1 needs a class-conditional model"),
        ({"model.num_classes": 10, "training.label_dropout": 1.0}, r"must be in \[0, 1\)"),
        ({"model.num_classes": -1}, r"num_classes=-1 must be an integer >= 0"),
        ({"sampling.guidance_scale": 2.0}, r"guidance_scale=2.0 .*need a class-conditional"),
        (
            {"training.objective": "ncsn", "sampling.method": "langevin"}
            | {"model.num_classes": 10},
            r"ncsn objective trains unconditional score networks only",
        ),
    ],
)
def test_bad_config_fails_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_image_size_the_model_cannot_take(tmp_path):
    config = tiny_config(**{"model.ch_mult": (1, 2, 2, 2, 2)})  # 8x8 cannot be halved 4 times
    with pytest.raises(ValueError, match="divisible by 16; got 8"):
        config_lib.validate(config)


def test_workdir_of_a_different_config_is_refused(full_run):
    workdir, _ = full_run
    before = sorted(os.listdir(workdir))
    with pytest.raises(ValueError, match=r"(?s)different config.*model.ch: 32 -> 64"):
        train.train_and_evaluate(tiny_config(**{"model.ch": 64}), workdir)
    assert sorted(os.listdir(workdir)) == before
    # Run length and reporting may change on resumption.
    assert (
        config_lib.config_differences(
            tiny_config().to_dict(), tiny_config(**{"training.num_train_steps": 9})
        )
        == []
    )


def test_an_interrupt_is_labelled_by_what_sent_it():
    # KeyboardInterrupt() is truthy but prints empty: the log line said "Interrupted ()".
    assert train._label(KeyboardInterrupt()) == "Ctrl-C"
    assert train._label(interrupts.Interrupted("SIGTERM")) == "SIGTERM"


def _loss_aware(**overrides):
    # T = 4 and 16 examples a step: each t's 10 slots fill within a few steps, so the later steps
    # draw t from the history.
    keys = {"diffusion.t_sampler": "loss_aware", "diffusion.num_timesteps": 4}
    keys |= {"training.batch_size": 16, "training.eval_at_end": False}
    return tiny_config(**(keys | overrides))


def test_loss_aware_t_sampler_resumes_bit_identical(tmp_path):
    reference = train.train_and_evaluate(_loss_aware(), str(tmp_path / "full"))
    history = np.asarray(reference.loss_history)
    assert history.shape == (4, 10) and np.isfinite(history).all()  # warm: importance-sampled
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(_loss_aware(**{"training.num_train_steps": 4}), workdir)
    resumed = train.train_and_evaluate(_loss_aware(), workdir)
    assert int(resumed.step) == 6
    _assert_trees_equal(resumed, reference)


def _conditional(**overrides):
    return tiny_config(
        **{"model.num_classes": 10, "training.label_dropout": 0.5, "training.batch_size": 16},
        **{"training.eval_at_end": False, **overrides},
    )


def test_a_conditional_run_resumes_bit_identical(tmp_path):
    """The digits recipe (t_sampler loss_aware_vb: hybrid, learned variances) made conditional,
    with T = 4 so that the loss history, filled by the vb term's T L_vb, is warm by the resume
    at step 3 (the labels are doubled for the two halves of the batch): bit-identical."""
    config = functools.partial(_conditional, **{"diffusion.num_timesteps": 4})
    reference = train.train_and_evaluate(config(), str(tmp_path / "full"))
    history = np.asarray(reference.loss_history)
    assert history.shape == (4, 10) and np.isfinite(history).all()
    workdir = str(tmp_path / "resumed")
    train.train_and_evaluate(config(**{"training.num_train_steps": 3}), workdir)
    resumed = train.train_and_evaluate(config(), workdir)
    assert int(resumed.step) == 6
    _assert_trees_equal(resumed, reference)
    # The labels reached the network's class embedding: the rows trained are the null row
    # (label dropout) and rows of classes in the batches; Adam leaves a row never used as it was.
    config = evaluation.prepare(config())
    initial = train.build(config, sharding.make_mesh()).init(objectives.run_keys(0)["init"])
    before = np.asarray(initial.params["class"]["embed"]["embedding"])  # [11, 128]
    after = np.asarray(reference.params["class"]["embed"]["embedding"])
    trained = set(np.flatnonzero(np.any(after != before, axis=1)))
    source = input_pipeline.load_split(config, "train")
    seen = {
        int(y) for s in range(6) for y in input_pipeline.train_batch(config, source, s)["label"]
    }
    assert 10 in trained and trained - {10} and trained <= seen | {10}


def test_a_conditional_run_samples_each_class_and_states_its_bound(tmp_path):
    """samples.npz holds labels i mod 10, the grid one class per row, metrics.json the
    conditional bound and the share of samples of the requested class."""
    workdir = str(tmp_path)
    config = _conditional(
        **{"training.eval_at_end": True, "sampling.num_samples": 12, "sampling.batch_size": 4},
        **{"sampling.guidance_scale": 1.5, "eval.num_examples": 8},
        **{"eval.metrics": ("bpd", "class_match"), "eval.classifier.train_steps": 20},
        **{"eval.classifier.num_samples": 10, "eval.classifier.num_bootstrap": 2},
    )
    train.train_and_evaluate(config, workdir)
    with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
        np.testing.assert_array_equal(f["labels"], np.arange(12) % 10)
        assert f["samples"].shape == (12, 8, 8, 1)
    # 10 rows of (8 + 1) pixels plus the border, upscaled to about 512 pixels.
    from PIL import Image

    height = 10 * 9 + 1
    with Image.open(os.path.join(workdir, "samples", "samples.png")) as im:
        assert im.size[1] == height * max(1, 512 // height)
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["bound"] == "-log p(x | c), c the true labels"
    assert 0 <= metrics["class_match"] <= 1 and len(metrics["class_match_per_class"]) == 10
    assert metrics["classifier_num_samples"] == 10


def test_checkpoint_and_config_of_an_earlier_version_resume(tmp_path):
    """A workdir whose config.json lacks the newer keys and whose checkpoint lacks the newer
    TrainState fields (as the version before them wrote it) resumes bit-identical."""
    # The recipe of that version: the newer keys at their defaults.
    old_recipe = {
        "diffusion.t_sampler": "uniform",
        "model.fourier_features": (),
        "diffusion.var_type": "fixedlarge",
        "diffusion.loss_type": "simple",
        "training.eval_at_end": False,
    }
    reference = train.train_and_evaluate(tiny_config(**old_recipe), str(tmp_path / "reference"))
    first = str(tmp_path / "first")
    train.train_and_evaluate(tiny_config(**old_recipe, **{"training.num_train_steps": 2}), first)
    old = str(tmp_path / "old")
    manager = checkpoints.make_manager(first, enable_async=False)
    config = evaluation.prepare(tiny_config(**old_recipe))
    state, meta = checkpoints.restore(
        manager, train.build(config, sharding.make_mesh()).abstract_state
    )
    old_fields = ("step", "params", "ema_params", "opt_state")  # TrainState before loss_history
    old_manager = checkpoints.make_manager(old, enable_async=False)
    checkpoints.save(old_manager, 2, {k: getattr(state, k) for k in old_fields}, meta)
    old_manager.wait_until_finished()
    with open(os.path.join(first, "config.json")) as f:
        saved = json.load(f)
    del saved["diffusion"]["t_sampler"], saved["model"]["fourier_features"]
    del saved["eval"]["clip_denoised"]
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(saved, f)
    resumed = train.train_and_evaluate(tiny_config(**old_recipe), old)
    assert int(resumed.step) == 6 and resumed.loss_history is None
    _assert_trees_equal(resumed, reference)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A 6-step run with checkpoints 2, 4, 6 (no evaluation) and its final state."""
    workdir = str(tmp_path_factory.mktemp("six"))
    state = train.train_and_evaluate(tiny_config(**{"training.eval_at_end": False}), workdir)
    return workdir, state


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_walks_back(
    six_steps, tmp_path, how
):
    source, reference = six_steps
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    corrupt_checkpoint(os.path.join(ckpt, "6"), how)
    with mock.patch.object(checkpoints.logging, "warning") as warning:
        resumed = train.train_and_evaluate(tiny_config(**{"training.eval_at_end": False}), workdir)
    ours = [c.args for c in warning.call_args_list if "cannot be restored" in str(c.args[0])]
    assert len(ours) == 1, warning.call_args_list
    message = ours[0]
    assert message[1] == 6 and message[3] == os.path.join(ckpt, "corrupt-6")
    assert os.path.isdir(os.path.join(ckpt, "corrupt-6"))  # kept, never deleted
    assert int(resumed.step) == 6  # steps 5 and 6 trained again from checkpoint 4
    _assert_trees_equal(resumed, reference)
    assert checkpoints.make_manager(workdir).latest_step() == 6


def test_no_restorable_checkpoint_is_a_clear_error(six_steps, tmp_path):
    source, _ = six_steps
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    for step in (2, 4, 6):
        corrupt_checkpoint(os.path.join(workdir, "checkpoints", str(step)), "garbage metadata")
    config = tiny_config(**{"training.eval_at_end": False, "training.num_train_steps": 2})
    with pytest.raises(checkpoints.CheckpointError, match=r"None of the checkpoints \[6, 4, 2\]"):
        train.train_and_evaluate(config, workdir)
    # Issue 28 #12: the same command again does not start afresh beside the damaged ones.
    with pytest.raises(
        checkpoints.CheckpointError,
        match=r"holds only damaged checkpoints \(corrupt-2, corrupt-4, corrupt-6\).*--fresh_start",
    ):
        train.train_and_evaluate(config, workdir)
    state = train.train_and_evaluate(config, workdir, fresh_start=True)
    assert int(state.step) == 2


def test_a_file_named_like_a_step_is_refused(tmp_path):
    """Issue 28 #13: a regular file checkpoints/8 is named, not replaced by the step-8 save."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "2").write_text("mine")
    with pytest.raises(
        checkpoints.CheckpointError, match=r"checkpoints/2 is not a checkpoint folder"
    ):
        train.train_and_evaluate(tiny_config(**{"training.eval_at_end": False}), str(workdir))
    assert (workdir / "checkpoints" / "2").read_text() == "mine"


def test_load_params_skips_a_damaged_newest_checkpoint(six_steps, tmp_path):
    source, _ = six_steps
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    corrupt_checkpoint(os.path.join(workdir, "checkpoints", "6"), "garbage metadata")
    params = checkpoints.load_params(workdir)
    _assert_trees_equal(params, checkpoints.load_params(source, step=4))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "6"))  # read-only: nothing moved


def test_a_reader_retries_when_train_deletes_the_checkpoints_under_it(
    six_steps, tmp_path, monkeypatch
):
    """Issue 28 #9: eval lists [6, 4, 2]; while it reads 6, a train saves step 8 and its
    keep_checkpoints deletes 6, 4 and 2. The reader lists again, reads 8 and names it."""
    source, _ = six_steps
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    real = checkpoints._load_item
    seen = []

    def train_runs_on(manager, step, name):
        seen.append(step)
        if step == 6:
            shutil.copytree(os.path.join(ckpt, "2"), os.path.join(ckpt, "8"))
            for s in (6, 4, 2):
                shutil.rmtree(os.path.join(ckpt, str(s)))
        if not os.path.isdir(os.path.join(ckpt, str(step))):
            raise FileNotFoundError(f"step {step} vanished")
        return real(manager, step, name)

    monkeypatch.setattr(checkpoints, "_load_item", train_runs_on)
    params, step = checkpoints.load_state_item_and_step(workdir, "ema_params")
    assert step == 8 and seen == [6, 4, 2, 8]
    monkeypatch.setattr(checkpoints, "_load_item", real)
    _assert_trees_equal(params, checkpoints.load_params(source, step=2))


def test_a_failed_save_stops_the_run_naming_the_cause_and_keeps_the_previous(tmp_path):
    """Fault injection: the save of step 4 leaves a temporary folder and raises ENOSPC."""
    import errno

    real_save = checkpoints.ocp.CheckpointManager.save

    def failing_save(self, step, *args, **kwargs):
        if step == 4:
            os.makedirs(os.path.join(os.fspath(self.directory), "4.orbax-checkpoint-tmp-1"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    workdir = str(tmp_path)
    with mock.patch.object(checkpoints.ocp.CheckpointManager, "save", failing_save):
        with pytest.raises(checkpoints.CheckpointError) as e:
            train.train_and_evaluate(tiny_config(), workdir)
    message = str(e.value)
    assert "step 4" in message and "No space left on device" in message
    assert "The newest checkpoint is step 2" in message and "\n" not in message
    ckpt = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(ckpt)) == ["2"]  # the tmp folder removed
    assert checkpoints.make_manager(workdir).latest_step() == 2


def test_a_save_failing_in_the_background_is_named_and_stops_the_run_then(tmp_path):
    """Issue 28 #6: the background save of step 2 fails (disk full); the run stops at the next
    check naming step 2, not at step 4's save naming 4."""
    import errno

    real_save = checkpoints.ocp.CheckpointManager.save
    issued = []

    def save(self, step, *args, **kwargs):
        issued.append(step)
        return real_save(self, step, *args, **kwargs)

    def check_for_errors(self):
        if 2 in issued:
            raise OSError(errno.ENOSPC, "No space left on device")

    workdir = str(tmp_path)
    with (
        mock.patch.object(checkpoints.ocp.CheckpointManager, "save", save),
        mock.patch.object(checkpoints.ocp.CheckpointManager, "check_for_errors", check_for_errors),
        pytest.raises(checkpoints.CheckpointError) as e,
    ):
        train.train_and_evaluate(tiny_config(), workdir)
    assert "Saving the checkpoint of step 2" in str(e.value)
    assert "No space left on device" in str(e.value)
    assert issued == [2]  # stopped at step 3, before the save of step 4


def test_a_checkpoint_folder_where_nothing_can_be_written_fails_at_once(tmp_path):
    """Issue 28 #5: a read-only checkpoints/ fails at its first save in one line (no waiting on
    orbax's background threads)."""
    import errno
    import time

    def read_only(directory):
        raise OSError(errno.EROFS, "Read-only file system", directory)

    start = time.perf_counter()
    with (
        mock.patch.object(checkpoints, "_check_writable", read_only),
        pytest.raises(checkpoints.CheckpointError, match=r"step 2 .*Read-only file system"),
    ):
        train.train_and_evaluate(tiny_config(), str(tmp_path))
    assert time.perf_counter() - start < 240
