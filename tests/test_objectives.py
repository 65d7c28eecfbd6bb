"""The training objectives' recipes: classifier-free guidance's label dropout, the ncsn
objective's refusal of a conditional config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from diffusion_jax import objectives


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_labels_are_dropped_to_the_null_class_at_the_rate_asked(rate):
    n, k = 200_000, 10
    labels = jnp.asarray(np.arange(n) % k, jnp.int32)
    out = np.asarray(objectives.drop_labels(jax.random.key(0), labels, rate, k))
    dropped = out == k
    # Binomial(n, rate): within 5 standard deviations of n * rate.
    assert abs(dropped.sum() - n * rate) < 5 * np.sqrt(n * rate * (1 - rate))
    np.testing.assert_array_equal(out[~dropped], np.asarray(labels)[~dropped])  # others kept
    # Independent of the class: each class dropped at the same rate.
    per_class = [dropped[np.asarray(labels) == c].mean() for c in range(k)]
    assert max(abs(p - rate) for p in per_class) < 5 * np.sqrt(rate * (1 - rate) / (n / k))


def test_training_labels_follow_the_config():
    labels = jnp.arange(64, dtype=jnp.int32) % 10
    key = jax.random.key(3)
    config = tiny_config(**{"model.num_classes": 10, "training.label_dropout": 0.0})
    assert objectives.training_labels(config, key, labels) is labels  # no dropout asked
    assert objectives.training_labels(config, key, None) is None  # an unconditional batch
    config.training.label_dropout = 0.5
    out = np.asarray(objectives.training_labels(config, key, labels))
    # Its own key (fold_in of the step's): the same draw as drop_labels with that key.
    want = objectives.drop_labels(jax.random.fold_in(key, 0x1AB), labels, 0.5, 10)
    np.testing.assert_array_equal(out, want)
    assert 0 < (out == 10).sum() < 64


def test_the_ncsn_objective_refuses_a_conditional_config():
    config = tiny_config(**{"training.objective": "ncsn", "model.num_classes": 10})
    with pytest.raises(ValueError, match=r"num_classes=10: the ncsn objective trains"):
        objectives.get_objective(config).check_config(config)
