"""optim: the EMA's warm-up, held to a direct computation of the average; the optim checks."""

import math

import jax
import numpy as np
import pytest

from diffusion_jax import config as config_lib
from diffusion_jax import input_pipeline, optim, sharding, train
from tests.helpers import tiny_config


def _decays(decay, power, n):
    """d_j for j < n in float64, straight from min(decay, 1 - (1 + j)^-p)."""
    if power == 0:
        return np.full(n, decay)
    return np.array([min(decay, 1.0 - (1.0 + j) ** -power) for j in range(n)])


@pytest.mark.parametrize("power", [0.0, 0.75, 2.0 / 3.0])
def test_ema_decay_at_is_the_warm_up_formula(power):
    got = np.array([float(optim.ema_decay_at(np.int32(j), 0.999, power)) for j in range(50)])
    np.testing.assert_allclose(got, _decays(0.999, power, 50), rtol=1e-6, atol=1e-7)
    if power:
        assert got[0] == 0.0  # the first average is the first trained parameters


def test_without_warm_up_the_decay_is_the_config_value_itself():
    assert optim.ema_decay_at(np.int32(7), 0.999, 0.0) == 0.999


@pytest.mark.parametrize("power", [0.0, 0.75])
def test_the_train_steps_ema_is_the_weighted_sum_of_the_iterates(power):
    """After n updates E_n = prod_j d_j theta_0 + sum_k (1 - d_{k-1}) prod_{j>=k} d_j theta_k,
    computed in float64 from the parameters the steps produced."""
    n, decay = 5, 0.5  # with p = 3/4 the cap bites from step 2: d = 0, 0.405, 0.5, 0.5, 0.5
    # The EMA does not depend on the recipe: the plainest one (one pass of the batch, no
    # attention) compiles fastest.
    lean = {
        "diffusion.loss_type": "simple",
        "diffusion.var_type": "fixedlarge",
        "diffusion.t_sampler": "uniform",
        "model.attn_resolutions": (),
        "model.fourier_features": (),
    }
    config = tiny_config(**lean, **{"optim.ema_decay": decay, "optim.ema_warmup_power": power})
    mesh = sharding.make_mesh()
    program = train.build(config, mesh)
    key = jax.random.key(0)
    state = program.init(key)
    source = input_pipeline.load_split(config, config.data.train_split)
    batches = input_pipeline.train_batches(config, source, 0, 0, 1)
    iterates = [jax.tree.map(np.asarray, state.params)]
    for _ in range(n):
        state, _ = program.step(state, next(batches), key)
        iterates.append(jax.tree.map(np.asarray, state.params))
    d = _decays(decay, power, n)
    weights = [np.prod(d)] + [(1 - d[k - 1]) * np.prod(d[k:]) for k in range(1, n + 1)]
    assert math.isclose(sum(weights), 1.0)
    want = jax.tree.map(
        lambda *leaves: sum(
            w * leaf.astype(np.float64) for w, leaf in zip(weights, leaves, strict=True)
        ),
        *iterates,
    )
    got = jax.tree.map(np.asarray, state.ema_params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    if power:  # nothing of the random initial weights is left
        assert weights[0] == 0.0


@pytest.mark.parametrize(
    "key, value",
    [
        ("learning_rate", float("nan")),
        ("learning_rate", 0.0),
        ("learning_rate", float("inf")),
        ("ema_decay", float("nan")),
        ("ema_decay", 1.0),
        ("ema_decay", 1.5),
        ("ema_decay", -0.1),
        ("ema_warmup_power", -0.5),
        ("ema_warmup_power", float("nan")),
        ("beta1", 1.0),
        ("beta2", float("nan")),
        ("eps", 0.0),
        ("weight_decay", -1.0),
        ("grad_clip", float("nan")),
        ("warmup_steps", -1),
    ],
)
def test_every_optim_value_is_checked_before_compiling(key, value):
    config = tiny_config(**{f"optim.{key}": value})
    with pytest.raises(ValueError, match=rf"config\.optim\.{key}={value!r} must be"):
        config_lib.validate(config)


def test_the_recipes_pass_the_optim_checks():
    optim.check_config(tiny_config(**{"optim.ema_warmup_power": 0.75}))


@pytest.mark.parametrize("warmup", [0, 10])
def test_the_learning_rate_schedules_are_their_formulas(warmup):
    """optim.lr_decay: "constant" is lr min(n / W, 1); "cosine" is the same warm-up, then
    lr (1 + cos(pi (n - W) / (N - W))) / 2, lr at n = W and 0 at n = N."""
    lr, n_steps = 1e-3, 50
    steps = np.arange(n_steps + 1)
    for decay in optim.LR_DECAYS:
        config = tiny_config(
            **{"optim.learning_rate": lr, "optim.warmup_steps": warmup, "optim.lr_decay": decay},
            **{"training.num_train_steps": n_steps},
        )
        optim.check_config(config)
        got = np.array([float(optim.learning_rate_schedule(config)(n)) for n in steps])
        ramp = lr * np.minimum(steps / warmup, 1.0) if warmup else np.full(steps.shape, lr)
        if decay == "cosine":
            after = (steps - warmup) / (n_steps - warmup)
            ramp = np.where(steps < warmup, ramp, lr * 0.5 * (1 + np.cos(np.pi * after)))
            assert got[-1] == pytest.approx(0.0, abs=1e-12)
            assert got[warmup + (n_steps - warmup) // 2] == pytest.approx(lr / 2, rel=1e-5)
        np.testing.assert_allclose(got, ramp, rtol=1e-5, atol=1e-10)
        assert optim.make_optimizer(config)[1](warmup) == pytest.approx(lr, rel=1e-6)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"optim.lr_decay": "linear"}, r"optim.lr_decay='linear' is not one of \('constant', "),
        (
            {"optim.lr_decay": "cosine", "optim.warmup_steps": 6},
            r"training.num_train_steps=6 <= optim.warmup_steps=6",
        ),
    ],
)
def test_the_decay_is_checked_before_compiling(overrides, match):
    with pytest.raises(ValueError, match=match):
        config_lib.validate(tiny_config(**overrides))
