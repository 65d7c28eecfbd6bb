"""Old runs keep working: each workdir under ``tests/data/old_runs/``, written by an earlier
commit (its ``manifest.json`` names the commit, the command and the versions), resumes for 2 more
steps, evaluates on 8 examples and samples 4 with today's code, in this process.

A change to the config, the checkpoint or the workdir layout adds the workdir of the commit
before it (``python tests/data/old_runs/make.py``) and, where it changes what such a run must
do, an assertion here: one mechanism for every issue, no subprocess of its own.
"""

import importlib
import json
import logging
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from helpers import ROOT

from configs import base
from configs import workdir as workdir_config
from diffusion_jax import checkpoints, evaluation, train

OLD_RUNS = os.path.join(ROOT, "tests", "data", "old_runs")
pytestmark = pytest.mark.smoke

NAMES = sorted(
    n for n in os.listdir(OLD_RUNS) if os.path.exists(os.path.join(OLD_RUNS, n, "manifest.json"))
)
# Runs whose config file has changed its recipe since they were written (configs/digits.py's
# first-run recipe of issue 40: network, learning rate, EMA warm-up, bound estimate, sampler):
# their own command is refused, nothing written, and their config.json
# (--config configs/workdir.py:DIR) resumes and samples them.
RECIPE_CHANGED = {"4720a6e", "34a522e"}


def _manifest(name: str) -> dict:
    with open(os.path.join(OLD_RUNS, name, "manifest.json")) as f:
        return json.load(f)


def _copy(name: str, tmp_path) -> str:
    workdir = str(tmp_path / name)
    shutil.copytree(os.path.join(OLD_RUNS, name), workdir)
    return workdir


def _command_config(name: str) -> ml_collections.ConfigDict:
    """The config of the run's own command, read with today's config file and code."""
    manifest = _manifest(name)
    module = os.path.splitext(os.path.basename(manifest["config"]))[0]
    config = importlib.import_module(f"configs.{module}").get_config()
    for key, value in manifest["overrides"].items():
        *sections, field = (base.RENAMED.get(key) or key).split(".")  # an earlier version's name
        node = config
        for section in sections:
            node = node[section]
        node[field] = tuple(value) if isinstance(value, list) else value
    return config


def _written_step(name: str) -> int:
    return _manifest(name)["overrides"]["training.num_train_steps"]


def test_the_old_runs_are_there():
    assert NAMES, f"no old run under {OLD_RUNS}"
    for name in NAMES:
        manifest = _manifest(name)
        assert manifest["commit"].startswith(name.split("_")[0]), (name, manifest["commit"])
        assert os.path.isdir(os.path.join(OLD_RUNS, name, "checkpoints", str(_written_step(name))))


@pytest.mark.parametrize("name", NAMES)
def test_an_old_run_resumes_with_its_own_command(name, tmp_path, caplog):
    workdir = _copy(name, tmp_path)
    old = _written_step(name)
    config = _command_config(name)
    config.training.num_train_steps = old + 2
    config.training.eval_at_end = False
    if name in RECIPE_CHANGED:  # (its tiny T = 20 meets the new bound_num_t = 20 first)
        with pytest.raises(ValueError, match=r"bound_num_t=20 must be|a different config"):
            train.train_and_evaluate(config, workdir)
        assert checkpoints.make_manager(workdir).latest_step() == old  # nothing written
        config = workdir_config.get_config(workdir)  # what the refusal advises
        config.training.num_train_steps = old + 2
        config.training.eval_at_end = False
    with caplog.at_level(logging.INFO):
        state = train.train_and_evaluate(config, workdir)
    assert f"Resuming from the checkpoint of step {old} in {workdir}" in caplog.text
    assert int(state.step) == old + 2
    assert checkpoints.make_manager(workdir).latest_step() == old + 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["training"]["num_train_steps"] == old + 2  # rewritten by today's code


@pytest.mark.parametrize("name", NAMES)
def test_an_old_run_evaluates_with_its_config_json(name, tmp_path):
    workdir = _copy(name, tmp_path)
    config = workdir_config.get_config(workdir)  # the old config.json, read by today's code
    config.eval.num_examples, config.eval.batch_size, config.eval.figures = 8, 8, ()
    metrics = evaluation.evaluate(config, workdir)
    assert metrics["checkpoint_step"] == _written_step(name)
    assert metrics["num_examples"] == 8 and np.isfinite(metrics["bpd"]), metrics
    with open(os.path.join(workdir, "eval", "metrics.json")) as f:
        assert json.load(f)["bpd"] == metrics["bpd"]


@pytest.mark.parametrize("name", NAMES)
def test_an_old_run_samples_with_its_own_command_and_its_config_json(name, tmp_path):
    """Today's config file, and the config.json the run wrote (its keys and sampler names of
    then: a digits_vdm run of 97899f6 names ``vdm_ancestral``, an alias now)."""
    workdir = _copy(name, tmp_path)
    if name in RECIPE_CHANGED:
        config = _command_config(name)
        config.sampling.num_samples, config.sampling.batch_size = 4, 4
        npz = os.path.join(workdir, "samples", "samples.npz")
        with open(npz, "rb") as f:
            before = f.read()
        with pytest.raises(ValueError, match=r"bound_num_t=20 must be|a different config"):
            evaluation.sample(config, workdir)
        with open(npz, "rb") as f:
            assert f.read() == before  # nothing written
    configs = [workdir_config.get_config(workdir)]
    if name not in RECIPE_CHANGED:
        configs.insert(0, _command_config(name))
    for config in configs:
        config.sampling.num_samples, config.sampling.batch_size = 4, 4
        samples = evaluation.sample(config, workdir)
        assert samples.shape == (4, 8, 8, 1) and np.isfinite(samples).all()
        with np.load(os.path.join(workdir, "samples", "samples.npz")) as f:
            np.testing.assert_array_equal(f["samples"], samples)
