"""The run's config: defaults for keys an older config lacks, validation from the registries,
and the comparison with a saved config.json."""

import ml_collections
import pytest
from helpers import tiny_config

from diffusion_jax import config as config_lib


def test_with_defaults_fills_only_missing_keys():
    config = tiny_config()
    with config.unlocked():
        del config.eval["rd_num_examples"]
        del config["ncsn"]
    filled = config_lib.with_defaults(config)
    assert filled.eval.rd_num_examples == config_lib.defaults().eval.rd_num_examples
    assert filled.ncsn.num_levels == config_lib.defaults().ncsn.num_levels
    assert filled.model.ch == 32 and filled.diffusion.num_timesteps == 20  # kept as they were
    assert "rd_num_examples" not in config.eval  # the caller's config is left alone


def test_a_saved_config_without_a_new_key_matches_its_default():
    saved = tiny_config().to_dict()
    del saved["eval"]["rd_num_examples"]  # eval.* may change anyway; a model key must not
    del saved["model"]["conv_impl"]
    assert config_lib.config_differences(saved, tiny_config()) == []
    changed = tiny_config(**{"model.conv_impl": "fast"})
    assert config_lib.config_differences(saved, changed) == ["model.conv_impl: 'xla' -> 'fast'"]


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("diffusion.beta_schedule", "sigmoid", "('linear', 'quadratic', 'const', 'cosine')"),
        ("diffusion.var_type", "learned", "('fixedlarge', 'fixedsmall', 'learned_range')"),
        ("optim.optimizer", "sgd", "('adam', 'adamw')"),
        ("training.objective", "sde", "('ddpm', 'ncsn')"),
    ],
)
def test_validate_names_the_key_the_value_and_the_allowed_ones(key, value, allowed):
    with pytest.raises(ValueError) as e:
        config_lib.validate(tiny_config(**{key: value}))
    assert f"config.{key}={value!r}" in str(e.value) and allowed in str(e.value)


def test_defaults_are_the_default_config():
    assert isinstance(config_lib.defaults(), ml_collections.ConfigDict)
    config_lib.validate(config_lib.with_defaults(tiny_config()))
