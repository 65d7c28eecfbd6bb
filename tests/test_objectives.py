"""The training objectives' recipes: classifier-free guidance's label dropout, the ncsn
objective's refusal of a conditional config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_main, tiny_config

from diffusion_jax import objectives, timesteps


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


# ----------------------------------------------------------------------------- vdm


def vdm_config(**overrides):
    config = tiny_config(**{"training.objective": "vdm", "diffusion.var_type": "fixedlarge"})
    config.diffusion.loss_type = "simple"
    config.diffusion.t_sampler = "uniform"
    config.sampling.method = "vdm_ancestral"
    config.vdm.gamma_hidden = 8
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("vdm.gamma", "sqrt", "config.vdm.gamma='sqrt' is not one of"),
        ("vdm.weighting", "p2", "config.vdm.weighting='p2' is not one of"),
        ("vdm.t_sampler", "sobol", "config.vdm.t_sampler='sobol' is not one of"),
        ("vdm.schedule_grad", "none", "config.vdm.schedule_grad='none' is not one of"),
        ("vdm.gamma_min", 6.0, "gamma_min < gamma_max"),
        ("vdm.gamma_max", float("inf"), "must be finite"),
        ("vdm.eval_num_steps", -1, "vdm.eval_num_steps=-1 must be an integer >= 0"),
        ("vdm.t_per_example", 0, "vdm.t_per_example=0 must be an integer >= 1"),
        ("diffusion.var_type", "learned_range", "needs no learned variance"),
        ("diffusion.t_sampler", "loss_aware", "draws t by vdm.t_sampler"),
        ("sampling.method", "langevin", "does not sample a training.objective='vdm' model"),
        ("sampling.num_steps", -3, "sampling.num_steps=-3 must be an integer >= 0"),
    ],
)
def test_vdm_config_checks_name_the_bad_value(key, value, match):
    from diffusion_jax import config as config_lib

    with pytest.raises(ValueError, match=match):
        config_lib.validate(vdm_config(**{key: value}))


def test_vdm_loss_is_the_bound_and_the_variance_option_changes_only_the_schedule_gradient():
    """Per example, the vdm loss is L_0 + the diffusion term + L_1 in bits/dim; with
    vdm.schedule_grad="variance" the network's and the endpoints' gradients are those of the
    bound, the schedule shape's those of the batch variance of the diffusion term."""
    from diffusion_jax import input_pipeline, models

    grads, values = {}, {}
    for option in ("elbo", "variance"):
        config = vdm_config(**{"vdm.schedule_grad": option})
        model = models.get_model(config)
        x0 = jax.random.uniform(jax.random.key(0), (8, 8, 8, 1), minval=-1, maxval=1)
        levels = input_pipeline.to_uint8_levels(np.asarray(x0), 17)
        x0 = input_pipeline.to_model_space(jnp.asarray(levels), 17)
        # Compiled whole: op by op, the U-Net's init and gradient take several times longer.
        params = jax.jit(model.init)(jax.random.key(1), x0, jnp.zeros((8,)))["params"]
        assert set(params) == {"net", "gamma_shape", "gamma_ends"}
        loss_fn = objectives.get_objective(config).make_loss_fn(config, model)
        key = jax.random.key(2)

        def mean_loss(p, f=loss_fn, x=x0, k=key):
            terms = f(p, x, k)
            return terms["loss"].mean(), terms

        (_, terms), grads[option] = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
        np.testing.assert_allclose(
            terms["loss"],
            terms["decoder_bpd"] + terms["diffusion_bpd"] + terms["prior_bpd"],
            rtol=1e-6,
        )
        values[option] = terms["loss"]
        # At init the network outputs 0, so the diffusion term is ½ (γ_1 − γ_0) ‖ε‖²/(D ln 2).
        ref = 0.5 * 15.0 * 64 / (64 * np.log(2))
        assert abs(float(terms["diffusion_bpd"].mean()) - ref) < 0.35 * ref
    np.testing.assert_allclose(values["elbo"], values["variance"])
    for part in ("net", "gamma_ends"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
            grads["elbo"][part],
            grads["variance"][part],
        )
    assert not np.allclose(
        grads["elbo"]["gamma_shape"]["w2"], grads["variance"]["gamma_shape"]["w2"]
    )


def test_a_conditional_vdm_model_samples_with_guidance():
    from diffusion_jax import models, sampling, sharding

    config = vdm_config(**{"model.num_classes": 10, "sampling.guidance_scale": 1.0})
    config.sampling.num_steps = 3
    model = models.get_model(config)
    x = jnp.zeros((2, 8, 8, 1))
    params = model.init(jax.random.key(0), x, jnp.zeros((2,)), jnp.zeros((2,), jnp.int32))
    # Every sampler, and an alias of the names of earlier versions.
    for method in ("ancestral", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "heun", "vdm_dpmpp_2m"):
        config.sampling.method = method
        sample = sampling.make_sample_fn(config, model, sharding.make_mesh())
        out = sample(params["params"], jax.random.key(1))
        assert out.shape == (4, 8, 8, 1) and np.all(np.abs(out) <= 1.0)


@pytest.mark.system
def test_digits_vdm_trains_evaluates_samples_and_resumes(tmp_path):
    """configs/digits_vdm.py, shrunk: the continuous and the 10-step bound, the learned γ(t)
    figure, samples; then the run resumes to more steps and evaluates again."""
    import json

    kw = {
        "vdm.gamma_hidden": 8,
        "vdm.eval_num_steps": 10,
        "eval.bound_num_t": 2,
        "eval.figures": ("gamma_schedule",),
    }
    run = tmp_path / "run"
    run_main(run, config="configs/digits_vdm.py", **kw)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["bound_estimate"] == {"kind": "continuous", "num_t": 2}
    terms = metrics["bpd_terms"]
    total = terms["decoder_L0"] + terms["diffusion"] + terms["prior_L1"]
    assert metrics["bpd"] == pytest.approx(total, rel=1e-5)
    assert metrics["bpd_finite"]["num_steps"] == 10 and np.isfinite(metrics["bpd_finite"]["bpd"])
    gamma_0, gamma_1 = metrics["gamma_endpoints"]
    assert -10.5 < gamma_0 < -9.5 and 4.5 < gamma_1 < 5.5  # learned from -10 and 5
    assert (run / "eval" / "figures" / "gamma_schedule.png").stat().st_size > 0
    samples = np.load(run / "samples" / "samples.npz")["samples"]
    assert samples.shape == (4, 8, 8, 1) and np.all(np.abs(samples) <= 1)
    proc = run_main(run, config="configs/digits_vdm.py", **kw, **{"training.num_train_steps": 8})
    assert "Resuming from the checkpoint of step 6" in proc.stderr
    run_main(run, "--mode=eval", config="configs/digits_vdm.py", **kw)


def test_vdm_t_per_example_averages_the_diffusion_term_over_k_times():
    """With vdm.t_per_example = k each example's diffusion term is the mean over its k times
    of one network batch of k B, the t spread by the low-discrepancy sampler over all k B."""
    from diffusion_jax import models, vdm

    config = vdm_config(**{"vdm.t_per_example": 3, "model.dropout": 0.0})
    model = models.get_model(config)
    x0 = jnp.linspace(-1, 1, 4 * 64).reshape(4, 8, 8, 1)
    params = jax.jit(model.init)(jax.random.key(1), x0, jnp.zeros((4,)))["params"]
    key = jax.random.key(5)
    terms = jax.jit(objectives.get_objective(config).make_loss_fn(config, model))(params, x0, key)
    assert terms["loss"].shape == (4,)
    _, t_key, noise_key, _ = jax.random.split(key, 4)
    t = timesteps.sample_continuous_t(t_key, 12)
    x = jnp.concatenate([x0] * 3)
    noise = jax.random.normal(noise_key, x.shape)
    net = models.model_fn(model, params)
    gamma = objectives.gamma_fn(model, params)
    ref = jax.jit(vdm.diffusion_loss, static_argnums=(0, 1))(net, gamma, x, t, noise)
    ref = ref * vdm.bits_per_dim_scale(x)
    np.testing.assert_allclose(terms["diffusion_bpd"], ref.reshape(3, 4).mean(0), rtol=2e-4)
