"""The run's config: defaults for keys an older config lacks, validation from the registries,
and the comparison with a saved config.json."""

import json
import re

import ml_collections
import pytest
from helpers import tiny_config

from diffusion_jax import config as config_lib


def test_with_defaults_fills_only_missing_keys():
    config = tiny_config()
    with config.unlocked():
        del config.eval.rate_distortion["num_examples"]
        del config["ncsn"]
    filled = config_lib.with_defaults(config)
    assert (
        filled.eval.rate_distortion.num_examples
        == config_lib.defaults().eval.rate_distortion.num_examples
    )
    assert filled.ncsn.num_levels == config_lib.defaults().ncsn.num_levels
    assert filled.model.ch == 32 and filled.diffusion.num_timesteps == 20  # kept as they were
    assert "num_examples" not in config.eval.rate_distortion  # the caller's config is left alone


def test_a_saved_config_without_a_new_key_matches_its_default():
    saved = tiny_config().to_dict()
    del saved["eval"]["rate_distortion"]  # eval.* may change anyway; a model key must not
    del saved["model"]["num_classes"]
    assert config_lib.config_differences(saved, tiny_config()) == []
    changed = tiny_config(**{"model.num_classes": 10})
    assert config_lib.config_differences(saved, changed) == ["model.num_classes: 0 -> 10"]


def test_the_convolution_formulation_may_change_on_resume():
    """A run of an earlier version recorded conv_impl "xla"; today's default "auto" resumes it."""
    saved = tiny_config(**{"model.conv_impl": "xla"}).to_dict()
    assert config_lib.defaults().model.conv_impl == "auto"
    assert config_lib.config_differences(saved, tiny_config()) == []


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("diffusion.beta_schedule", "sigmoid", "('linear', 'quadratic', 'const', 'cosine')"),
        ("diffusion.var_type", "learned", "('fixedlarge', 'fixedsmall', 'learned_range')"),
        ("optim.optimizer", "sgd", "('adam', 'adamw')"),
        ("training.objective", "sde", "('ddpm', 'ncsn', 'vdm', 'distill')"),
        ("diffusion.mse_weighting", "snr", "('none', 'min_snr')"),
        ("diffusion.min_snr_gamma", 0.0, "must be > 0"),
        ("diffusion.hybrid_lambda", -1.0, "must be >= 0"),
        ("sampling.sde_eta", -0.5, "must be >= 0"),
    ],
)
def test_validate_names_the_key_the_value_and_the_allowed_ones(key, value, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(tiny_config(**{key: value}))
    assert f"config.{key}={value!r}" in str(e.value) and allowed in str(e.value)


def test_the_vb_terms_own_t_needs_the_hybrid_loss():
    config = tiny_config(**{"diffusion.t_sampler": "loss_aware_vb", "diffusion.loss_type": "vlb"})
    with pytest.raises(ValueError, match="t_sampler='loss_aware_vb'.*got loss_type='vlb'"):
        config_lib.validate(config)


def test_defaults_are_the_default_config():
    assert isinstance(config_lib.defaults(), ml_collections.ConfigDict)
    config_lib.validate(config_lib.with_defaults(tiny_config()))


def _saved_run(tmp_path, **overrides):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(**overrides).to_dict()))
    return str(tmp_path)


def test_check_workdir_names_each_differing_key_on_its_own_line(tmp_path):
    workdir = _saved_run(tmp_path, **{"optim.learning_rate": 1e-3})
    config = tiny_config(**{"model.ch": 16, "optim.learning_rate": 0.5})
    with pytest.raises(ValueError) as e:
        config_lib.check_workdir(config, workdir)
    lines = str(e.value).splitlines()
    assert "  model.ch: 32 -> 16" in lines and "  optim.learning_rate: 0.001 -> 0.5" in lines
    assert f"--config configs/workdir.py:{workdir}" in lines[-1]


def test_allow_config_change_lets_only_the_optimisers_keys_differ(tmp_path):
    """After a NaN stop the advised --allow_config_change=optim.learning_rate resumes with a
    lower learning rate; a key that shapes the network can never be allowed."""
    workdir = _saved_run(tmp_path, **{"optim.learning_rate": 1e-3})
    lower = tiny_config(**{"optim.learning_rate": 1e-4})
    with pytest.raises(ValueError, match=r"optim.learning_rate: 0.001 -> 0.0001"):
        config_lib.check_workdir(lower, workdir)
    config_lib.check_workdir(lower, workdir, allow=("optim.learning_rate",))
    with pytest.raises(ValueError, match=r"'model.ch': only the optimiser's keys may change"):
        config_lib.check_workdir(lower, workdir, allow=("model.ch",))
    with pytest.raises(ValueError, match=r"(?s)different config.*model.ch: 32 -> 16"):
        config_lib.check_workdir(
            tiny_config(**{"model.ch": 16, "optim.learning_rate": 1e-4}),
            workdir,
            allow=("optim.learning_rate",),
        )


def test_workdir_config_is_the_runs_own_and_passes_the_check(tmp_path):
    from configs import workdir as workdir_config

    config = tiny_config(**{"model.ch": 16, "model.fourier_features": (4, 5)})
    saved = config.to_dict()
    del saved["diffusion"]["t_sampler"]  # a run of the version before this key existed
    for key in ("mse_weighting", "min_snr_gamma", "hybrid_lambda", "hybrid_train_mean"):
        del saved["diffusion"][key]  # ... and before these
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = config_lib.with_defaults(workdir_config.get_config(str(tmp_path)))
    config_lib.check_workdir(loaded, str(tmp_path))
    assert loaded.model.ch == 16 and loaded.model.fourier_features == (4, 5)
    assert loaded.model.ch_mult == config.model.ch_mult  # a tuple again, as configs write it
    assert loaded.diffusion.t_sampler == "uniform"
    with pytest.raises(ValueError, match="holds no run"):
        workdir_config.get_config(str(tmp_path / "none"))


@pytest.mark.parametrize("mode", ["eval", "sample"])
def test_check_workdir_for_eval_and_sample_compares_only_the_network_and_data(tmp_path, mode):
    workdir = _saved_run(tmp_path)
    # Optimiser, seed, batch size, sampling and eval keys shape no parameter: accepted.
    free = {
        "optim.learning_rate": 0.5,
        "training.batch_size": 16,
        "training.num_train_steps": 99,
        "sampling.method": "ddim",
        "eval.batch_size": 16,
    }
    config = tiny_config(**free)
    config.seed = 3
    config_lib.check_workdir(config, workdir, mode=mode)
    for key, value in {
        "model.ch": 16,
        "diffusion.num_timesteps": 10,
        "data.image_size": 16,
        "training.objective": "ncsn",
    }.items():
        with pytest.raises(ValueError, match=rf"(?s)different config.*\n  {re.escape(key)}: "):
            config_lib.check_workdir(tiny_config(**{key: value}), workdir, mode=mode)
    with pytest.raises(ValueError, match=f"--mode {mode}"):
        config_lib.check_workdir(tiny_config(**{"model.ch": 16}), workdir, mode=mode)


def test_check_workdir_accepts_a_workdir_without_config_json(tmp_path):
    config_lib.check_workdir(tiny_config(**{"model.ch": 16}), str(tmp_path), mode="sample")
    config_lib.check_workdir(tiny_config(**{"model.ch": 16}), str(tmp_path))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("training.keep_checkpoints", 0, "keep_checkpoints=0 must be an integer >= 1"),
        ("training.checkpoint_every", 0, "checkpoint_every=0 must be an integer >= 1"),
        ("training.log_every", 0, "log_every=0 must be an integer >= 1"),
        ("sampling.eta", float("nan"), "sampling.eta=nan must be finite and >= 0"),
        ("sampling.sde_eta", float("inf"), "sampling.sde_eta=inf must be >= 0"),
    ],
)
def test_counts_and_noise_scales_that_cannot_work_are_refused(key, value, match):
    """Faults round three (issue 28) #1, #7, #8: a run keeping no checkpoint, saving or logging
    every 0 steps, or sampling with a NaN / infinite noise scale is one line before compiling."""
    config = tiny_config(**{key: value})
    with pytest.raises(ValueError, match=match):
        config_lib.validate(config)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("eval.bpd_ode.num_examples", -1, "bpd_ode.num_examples=-1 must be an integer >= 0"),
        ("eval.num_examples", -3, "eval.num_examples=-3 must be an integer >= 0"),
        (
            "eval.rate_distortion.num_examples",
            -1,
            "rate_distortion.num_examples=-1 must be an integer >= 0",
        ),
        ("eval.bpd_splits_num_examples", -2, "bpd_splits_num_examples=-2 must be an integer"),
        ("eval.bpd_ode.rtol", 0.0, "bpd_ode.rtol=0.0 must be > 0"),
        ("eval.bpd_ode.atol", float("nan"), "bpd_ode.atol=nan must be > 0"),
        ("sampling.num_samples", 0, "num_samples=0 must be an integer >= 1"),
        ("eval.bound_num_t", -1, "bound_num_t=-1 must be 0"),
        (
            "eval.bound_num_t",
            20,
            r"bound_num_t=20 must be 0 \(every t\) or an integer in \[1, T - 1 = 19\]",
        ),
    ],
)
def test_negative_counts_and_zero_tolerances_are_refused(key, value, match):
    """Issue 28 #11, #15: refused in one line before anything compiles (0 keeps meaning all)."""
    from diffusion_jax import evaluation

    with pytest.raises(ValueError, match=match):
        evaluation.prepare(tiny_config(**{key: value}))
    evaluation.prepare(tiny_config(**{"eval.bpd_ode.num_examples": 0, "eval.num_examples": 0}))


def test_heun_with_one_network_call_is_refused():
    config = tiny_config(**{"sampling.method": "heun", "sampling.num_steps": 1})
    with pytest.raises(ValueError, match="num_steps=1 is too few for sampling.method='heun'"):
        config_lib.validate(config)
    config_lib.validate(tiny_config(**{"sampling.method": "heun", "sampling.num_steps": 2}))


def test_a_nan_guidance_scale_is_refused():
    config = tiny_config(**{"model.num_classes": 10, "sampling.guidance_scale": float("nan")})
    with pytest.raises(ValueError, match="guidance_scale=nan must be finite and >= 0"):
        config_lib.validate(config)


def _leaves(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for name, value in tree.items():
        out |= _leaves(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name}
    return out


def test_an_old_config_json_is_migrated_to_todays_names():
    """Every key of ``base.RENAMED`` in a run's saved config moves to its new name (a removed one
    is dropped), and the result holds only today's keys (those added since are filled by their
    defaults when read): a config.json of commit 4720a6e (which holds eval.rd_num_examples, the
    flat eval.classifier_* keys and cpu_conv_library)."""
    import json
    import os

    from helpers import ROOT

    from configs import base

    with open(os.path.join(ROOT, "tests", "data", "old_runs", "4720a6e", "config.json")) as f:
        old = json.load(f)
    assert "rd_num_examples" in old["eval"] and "cpu_conv_library" in old
    new = base.migrate(old)
    assert new["eval"]["rate_distortion"]["num_examples"] == old["eval"]["rd_num_examples"]
    assert new["eval"]["classifier"]["train_steps"] == old["eval"]["classifier_train_steps"]
    assert new["eval"]["inception"]["is_num_splits"] == old["eval"]["is_num_splits"]
    assert "cpu_conv_library" not in new and "rd_num_examples" not in new["eval"]
    assert "rd_num_examples" in old["eval"]  # the argument is left alone
    today = _leaves(base.get_config().to_dict())
    assert _leaves(new) <= today
    assert "optim.ema_warmup_power" in today - _leaves(new)  # newer than 4720a6e


def test_no_recipe_is_the_base_config():
    """Every recipe under configs/ names its data and differs from ``configs/base.py``."""
    import importlib
    import os

    from helpers import ROOT

    from configs import base

    names = sorted(
        f[:-3]
        for f in os.listdir(os.path.join(ROOT, "configs"))
        if f.endswith(".py") and f not in ("__init__.py", "base.py", "workdir.py")
    )
    assert "cifar10_ddpm" in names and "digits" in names
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        assert config.data.dataset, name
        assert config_lib.config_differences(base.get_config().to_dict(), config), name


@pytest.mark.parametrize("text", ["{\n", "[1, 2]", "\xff\xfe"], ids=["not JSON", "a list", "bytes"])
def test_a_config_json_that_is_not_a_runs_config_is_one_line_naming_it(tmp_path, text):
    """Issue 41 row 12: train's check and configs/workdir.py name the file."""
    from configs import workdir as workdir_config

    path = tmp_path / "config.json"
    path.write_bytes(text.encode("latin-1"))
    for read in (
        lambda: config_lib.check_workdir(tiny_config(), str(tmp_path)),
        lambda: workdir_config.get_config(str(tmp_path)),
    ):
        with pytest.raises(ValueError) as e:
            read()
        assert str(e.value).startswith(f"{path} ") and "\n" not in str(e.value)
