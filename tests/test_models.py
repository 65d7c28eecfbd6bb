"""Tests of diffusion_jax.models: parameter counts, shapes, conditioning, dropout, dtypes, errors.

Behavioural tests use tiny U-Nets (32 channels, one to three levels); the paper-sized models are
traced with jax.eval_shape, which allocates and compiles nothing, plus one forward pass of the
CIFAR-10 model on a single image.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cifar10_ddpm, cifar10_improved, lsun256_ddpm
from diffusion_jax import models
from diffusion_jax.models import layers, mlp, unet

CIFAR10_PARAMS = 35_746_307  # Ho et al.'s CIFAR-10 model (their TF code)
LSUN256_PARAMS = 113_673_219  # the paper's "114M" 256x256 model


def tiny_config(image_size=8, channels=1, ch_mult=(1, 2), **model):
    config = cifar10_ddpm.get_config()
    config.data.image_size = image_size
    config.data.num_channels = channels
    config.model.ch = 32
    config.model.ch_mult = ch_mult
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (image_size // 2,)
    config.model.dropout = 0.0
    for key, value in model.items():
        config.model[key] = value
    return config


def mlp_config(dim=2, **model):
    config = cifar10_ddpm.get_config()
    config.data.image_size = 0
    config.data.num_channels = dim
    config.model.name = "mlp"
    config.model.hidden_dim = 64
    config.model.num_layers = 2
    config.model.dropout = 0.0
    for key, value in model.items():
        config.model[key] = value
    return config


def abstract_params(model, shape):
    """Parameter shapes of `model` on inputs of `shape`, without allocating or compiling."""
    x = jnp.zeros(shape, jnp.float32)
    t = jnp.zeros(shape[:1], jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, train=False))["params"]


def num_params(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def init(model, shape, seed=0):
    x = jnp.zeros(shape, jnp.float32)
    t = jnp.zeros(shape[:1], jnp.int32)
    return jax.jit(lambda k: model.init(k, x, t, train=False))(jax.random.key(seed))["params"]


def perturb(params, seed=1, scale=0.05):
    """Params plus small noise (NumPy: nothing to compile), so the zero-initialised output layers
    no longer hide the network."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape, np.float32), params)


def random_params(abstract, seed=1):
    """Random parameters of the given shapes: norm scales 1, everything else small noise."""
    zeros = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), abstract)
    ones = {"scale"}
    with_ones = jax.tree_util.tree_map_with_path(
        lambda path, p: p + (1.0 if path[-1].key in ones else 0.0), zeros
    )
    return perturb(with_ones, seed, scale=0.1)


def batch(shape, seed=0):
    x = jax.random.normal(jax.random.key(seed), shape)  # [B, ...]
    t = jnp.arange(shape[0], dtype=jnp.int32) * 37  # [B]
    return x, t


def abstract_apply(model, params, shape):
    x, t = jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:1], jnp.int32)
    return jax.eval_shape(lambda p: model.apply({"params": p}, x, t), params)


@pytest.fixture(scope="module")
def tiny():
    """A 2-level 8x8 U-Net with dropout 0.5: (model, initial params, perturbed params)."""
    model = models.get_model(tiny_config(dropout=0.5))
    params = init(model, (2, 8, 8, 1))
    return model, params, perturb(params)


# Parameter counts.


def test_cifar10_parameter_count_is_the_papers():
    params = abstract_params(models.get_model(cifar10_ddpm.get_config()), (1, 32, 32, 3))
    assert num_params(params) == CIFAR10_PARAMS
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_cifar10_parameter_tree():
    params = abstract_params(models.get_model(cifar10_ddpm.get_config()), (1, 32, 32, 3))
    assert set(params) >= {"temb", "conv_in", "mid_block_1", "mid_attn_1", "norm_out", "conv_out"}
    assert params["temb"]["dense0"]["kernel"].shape == (128, 512)
    assert params["down_0_block_0"]["conv1"]["kernel"].shape == (3, 3, 128, 128)
    assert "nin_shortcut" in params["down_1_block_0"]  # 128 -> 256 channels
    assert "nin_shortcut" not in params["down_2_block_0"]
    # Attention at 16x16 only: level 1, two blocks down and three up.
    attn = sorted(k for k in params if "attn" in k)
    assert attn == [f"down_1_attn_{j}" for j in range(2)] + ["mid_attn_1"] + [
        f"up_1_attn_{j}" for j in range(3)
    ]
    assert sum(k.startswith("up_0_block") for k in params) == 3  # num_res_blocks + 1
    assert params["up_0_block_2"]["conv1"]["kernel"].shape == (3, 3, 256, 128)  # 128 + 128 skip
    assert params["up_3_block_0"]["conv1"]["kernel"].shape == (3, 3, 512, 256)  # 256 + 256 skip
    assert params["conv_out"]["kernel"].shape == (3, 3, 128, 3)


def test_cifar10_improved_is_the_paper_unet_with_doubled_output():
    config = cifar10_improved.get_config()
    paper = cifar10_ddpm.get_config()
    differing = {
        f"{s}.{k}"
        for s in paper
        if isinstance(paper[s], type(paper.model))
        for k in paper[s]
        if paper[s][k] != config[s][k]
    }
    assert differing == {"diffusion.beta_schedule", "diffusion.var_type", "diffusion.loss_type"}
    assert config.diffusion.num_timesteps == 1000 and config.model.fourier_features == ()
    params = abstract_params(models.get_model(config), (1, 32, 32, 3))
    assert params["conv_out"]["kernel"].shape == (3, 3, 128, 6)
    assert num_params(params) == CIFAR10_PARAMS + 3 * 3 * 128 * 3 + 3  # the doubled conv_out


def test_lsun256_parameter_count():
    params = abstract_params(models.get_model(lsun256_ddpm.get_config()), (1, 256, 256, 3))
    assert num_params(params) == LSUN256_PARAMS


def test_learned_range_doubles_output_channels():
    config = cifar10_ddpm.get_config()
    config.diffusion.var_type = "learned_range"
    model = models.get_model(config)
    params = abstract_params(model, (1, 32, 32, 3))
    # Only the output conv grows: 3 more output channels of a 3x3x128 kernel, plus their biases.
    assert num_params(params) == CIFAR10_PARAMS + 3 * (9 * 128 + 1)
    assert abstract_apply(model, params, (2, 32, 32, 3)).shape == (2, 32, 32, 6)


# Shapes.


@pytest.mark.parametrize(
    "size, channels, ch_mult",
    [
        (8, 1, (1, 2)),
        (28, 1, (1, 2, 2)),
        (32, 3, (1, 2, 2, 2)),
        (64, 3, (1, 2, 2, 2)),
        (256, 3, (1, 1, 2, 2, 4, 4)),
    ],
)
def test_unet_output_shape(size, channels, ch_mult):
    model = models.get_model(tiny_config(size, channels, ch_mult))
    params = abstract_params(model, (1, size, size, channels))
    out = abstract_apply(model, params, (2, size, size, channels))
    assert out.shape == (2, size, size, channels) and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "config_fn, size",
    [(cifar10_ddpm.get_config, 32), (cifar10_ddpm.get_config, 64), (lsun256_ddpm.get_config, 256)],
)
def test_paper_unet_shapes(config_fn, size):
    model = models.get_model(config_fn())
    params = abstract_params(model, (1, size, size, 3))
    out = abstract_apply(model, params, (2, size, size, 3))
    assert out.shape == (2, size, size, 3) and out.dtype == jnp.float32


def test_unet_forward_28x28():
    """A real forward pass of an MNIST-shaped (3-level) U-Net with random parameters."""
    model = models.get_model(tiny_config(28, 1, (1, 2, 2)))
    params = random_params(abstract_params(model, (1, 28, 28, 1)))
    x, t = batch((2, 28, 28, 1))
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert out.shape == x.shape and bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out).mean()) > 1e-3


def test_cifar10_unet_forward():
    """One real forward pass of the paper's 35.7M model on a single 32x32 image."""
    model = models.get_model(cifar10_ddpm.get_config())
    params = random_params(abstract_params(model, (1, 32, 32, 3)))
    x, t = batch((1, 32, 32, 3))
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert out.shape == (1, 32, 32, 3) and bool(jnp.isfinite(out).all())


def test_unet_without_resampling_convs():
    model = models.get_model(tiny_config(resamp_with_conv=False))
    params = abstract_params(model, (1, 8, 8, 1))
    assert "down_0_downsample" not in params and "up_1_upsample" not in params
    assert abstract_apply(model, params, (2, 8, 8, 1)).shape == (2, 8, 8, 1)


# Conditioning, dropout, jit and grad.


def test_zero_output_at_init(tiny):
    model, params, _ = tiny
    x, t = batch((2, 8, 8, 1))
    np.testing.assert_array_equal(jax.jit(model.apply)({"params": params}, x, t), 0.0)


def test_time_conditioning_changes_the_output(tiny):
    model, _, params = tiny
    x, _ = batch((2, 8, 8, 1))
    x = jnp.concatenate([x, x, x])  # the same images at three times
    t = jnp.array([0, 0, 500, 500, 0.5, 0.5], jnp.float32)  # float times (noise levels) work too
    out = jax.jit(model.apply)({"params": params}, x, t).reshape(3, 2, 8, 8, 1)
    assert float(jnp.abs(out[0] - out[1]).mean()) > 1e-3
    assert float(jnp.abs(out[0] - out[2]).mean()) > 1e-4
    # Integer and float times embed identically; a scalar time broadcasts over the batch.
    np.testing.assert_array_equal(
        layers.timestep_embedding(jnp.array([3, 999]), 32),
        layers.timestep_embedding(jnp.array([3.0, 999.0]), 32),
    )
    assert abstract_apply(model, params, (2, 8, 8, 1)).shape == (2, 8, 8, 1)
    scalar_t = jax.eval_shape(lambda: model.apply({"params": params}, x, jnp.float32(0.5)))
    assert scalar_t.shape == x.shape


def test_dropout_only_in_training_and_reproducible(tiny):
    model, _, params = tiny
    x, t = batch((2, 8, 8, 1))

    @jax.jit
    def outputs(key):  # (evaluation, training) outputs with the dropout key `key`
        return tuple(
            model.apply({"params": params}, x, t, train=train, rngs={"dropout": key})
            for train in (False, True)
        )

    eval1, train1 = outputs(jax.random.key(1))
    eval1b, train1b = outputs(jax.random.key(1))
    eval2, train2 = outputs(jax.random.key(2))
    np.testing.assert_array_equal(eval1, eval2)  # no dropout in evaluation
    np.testing.assert_array_equal(train1, train1b)  # reproducible from the key
    assert float(jnp.abs(train1 - train2).mean()) > 1e-4
    assert float(jnp.abs(train1 - eval1).mean()) > 1e-4
    with pytest.raises(Exception, match="dropout"):  # training without a dropout key
        jax.eval_shape(lambda: model.apply({"params": params}, x, t, train=True))


def loss_fn(model, x, t):
    eps = jax.random.normal(jax.random.key(3), x.shape)

    def loss(p):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": jax.random.key(0)})
        return jnp.mean((out - eps) ** 2)

    return loss


def test_jit_and_grad(tiny):
    model, params, perturbed = tiny
    grad_fn = jax.jit(jax.value_and_grad(loss_fn(model, *batch((2, 8, 8, 1)))))
    # At init only the (zero) output layer gets a gradient; afterwards the whole network does.
    value, grads = grad_fn(params)
    assert np.isfinite(value) and float(jnp.abs(grads["conv_out"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["conv_in"]["kernel"]).max()) == 0
    value, grads = grad_fn(perturbed)
    assert np.isfinite(value)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["conv_in"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["temb"]["dense0"]["kernel"]).max()) > 0


def test_remat_same_parameters_and_gradients():
    plain = models.get_model(tiny_config(ch_mult=(1,), dropout=0.5))
    remat = models.get_model(tiny_config(ch_mult=(1,), dropout=0.5, remat=True))
    abstract = abstract_params(plain, (1, 8, 8, 1))
    assert jax.tree.map(lambda p: p.shape, abstract_params(remat, (1, 8, 8, 1))) == jax.tree.map(
        lambda p: p.shape, abstract
    )
    params = random_params(abstract)
    x, t = batch((2, 8, 8, 1))
    plain_grads = jax.jit(jax.grad(loss_fn(plain, x, t)))(params)
    remat_grads = jax.jit(jax.grad(loss_fn(remat, x, t)))(params)
    for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("impl", ["fast", "winograd", "auto"])
def test_conv_impls_are_the_same_network(impl):
    """conv_impl "fast" / "winograd" / "auto" (winograd on CPU) is the same network as "xla":
    parameters, outputs and gradients. At 16x16 with 64 channels Winograd takes the first
    level's 3x3 convolutions (winograd.applies), so its formulation is exercised."""
    shape = (2, 16, 16, 1)
    xla = models.get_model(tiny_config(16, ch_mult=(2, 2), conv_impl="xla"))
    other = models.get_model(tiny_config(16, ch_mult=(2, 2), conv_impl=impl))
    abstract = abstract_params(xla, (1, *shape[1:]))
    assert jax.tree.map(lambda p: p.shape, abstract_params(other, (1, *shape[1:]))) == jax.tree.map(
        lambda p: p.shape, abstract
    )
    params = random_params(abstract)
    x, t = batch(shape)
    if impl != "fast":  # Winograd's 36 batched products are in the program
        jaxpr = str(jax.make_jaxpr(lambda p: other.apply({"params": p}, x, t))(params))
        assert ("f32[36," in jaxpr) is (jax.default_backend() == "cpu" or impl == "winograd")
    out_xla = jax.jit(lambda p: xla.apply({"params": p}, x, t))(params)
    out = jax.jit(lambda p: other.apply({"params": p}, x, t))(params)
    np.testing.assert_allclose(out, out_xla, rtol=1e-5, atol=1e-5)
    grads_xla = jax.jit(jax.grad(loss_fn(xla, x, t)))(params)
    grads = jax.jit(jax.grad(loss_fn(other, x, t)))(params)
    for a, b in zip(jax.tree.leaves(grads_xla), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float32(tiny):
    model, _, params = tiny
    bf16 = models.get_model(tiny_config(dropout=0.5, dtype="bfloat16"))
    dtypes = jax.tree.map(lambda p: p.dtype, abstract_params(bf16, (2, 8, 8, 1)))
    assert dtypes == jax.tree.map(lambda p: p.dtype, params)  # parameters stay float32
    x, t = batch((2, 8, 8, 1))
    ref = jax.jit(lambda: model.apply({"params": params}, x, t))()
    out = jax.jit(lambda: bf16.apply({"params": params}, x, t))()
    assert out.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


# Layers.


def test_timestep_embedding():
    emb = layers.timestep_embedding(jnp.array([0, 1, 999]), 8)
    assert emb.shape == (3, 8)
    np.testing.assert_allclose(emb[0], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(emb[1, 0], np.sin(1.0), rtol=1e-6)  # frequency 1
    np.testing.assert_allclose(emb[1, 3], np.sin(1e-4), rtol=1e-4)  # frequency 1 / 10000
    assert layers.timestep_embedding(jnp.array([0.5]), 7).shape == (1, 7)


def _group_norm_reference(x, groups, scale, bias, eps=1e-6):
    """Group normalisation by its definition, in float64 numpy, one group at a time."""
    x = np.asarray(x, np.float64)
    out = np.empty_like(x)
    per = x.shape[-1] // groups
    for b in range(x.shape[0]):
        for g in range(groups):
            part = x[b, ..., g * per : (g + 1) * per]
            out[b, ..., g * per : (g + 1) * per] = (part - part.mean()) / np.sqrt(part.var() + eps)
    return out * np.asarray(scale) + np.asarray(bias)


@pytest.mark.parametrize("channels, groups", [(64, 32), (48, 32), (6, 3)])
def test_group_norm_is_the_definition_and_has_flax_parameters(channels, groups):
    key_x, key_s, key_b = jax.random.split(jax.random.key(0), 3)
    x = 3.0 * jax.random.normal(key_x, (2, 5, 4, channels)) + 1.5  # [B, H, W, C], mean far from 0
    norm = layers.group_norm(channels, groups=groups)
    ours = norm.init(jax.random.key(1), x)
    flax_norm = nn.GroupNorm(num_groups=norm.num_groups, epsilon=1e-6)
    theirs = flax_norm.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)  # checkpoints restore
    params = {
        "params": {
            "scale": 1.0 + 0.3 * jax.random.normal(key_s, (channels,)),
            "bias": 0.5 * jax.random.normal(key_b, (channels,)),
        }
    }
    y = norm.apply(params, x)
    reference = _group_norm_reference(x, norm.num_groups, **params["params"])
    np.testing.assert_allclose(y, reference, atol=2e-5)
    np.testing.assert_allclose(y, flax_norm.apply(params, x), atol=2e-5)

    def loss(p, module):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    ours_grad = jax.grad(loss)(params, norm)
    flax_grad = jax.grad(loss)(params, flax_norm)
    for a, b in zip(jax.tree.leaves(ours_grad), jax.tree.leaves(flax_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    x_grad = jax.grad(lambda x: jnp.sum(jnp.sin(norm.apply(params, x))))(x)
    x_grad_flax = jax.grad(lambda x: jnp.sum(jnp.sin(flax_norm.apply(params, x))))(x)
    np.testing.assert_allclose(x_grad, x_grad_flax, rtol=1e-4, atol=1e-4)


def test_group_norm_dtypes_and_errors():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8), jnp.bfloat16)
    params = layers.group_norm(8, groups=4).init(jax.random.key(1), x)
    assert params["params"]["scale"].dtype == jnp.float32
    assert layers.group_norm(8, groups=4, dtype=jnp.bfloat16).apply(params, x).dtype == jnp.bfloat16
    assert layers.GroupNorm(num_groups=4).apply(params, x).dtype == jnp.float32
    with pytest.raises(ValueError, match="num_groups=3"):
        layers.GroupNorm(num_groups=3).init(jax.random.key(1), x)


# The MLP.


@pytest.mark.parametrize("var_type, out_dim", [("fixedlarge", 2), ("learned_range", 4)])
def test_mlp_shapes(var_type, out_dim):
    config = mlp_config(2)
    config.diffusion.var_type = var_type
    model = models.get_model(config)
    assert isinstance(model, mlp.MLP)
    params = init(model, (5, 2))
    x, t = batch((5, 2))
    out = jax.jit(model.apply)({"params": params}, x, t)
    assert out.shape == (5, out_dim) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out, 0.0)


def test_mlp_conditioning_dropout_and_grad():
    model = models.get_model(mlp_config(3, dropout=0.5))
    params = random_params(abstract_params(model, (1, 3)))
    x, _ = batch((4, 3))
    t0, t1 = jnp.zeros((4,)), jnp.full((4,), 0.7)  # sigma-like float conditioning
    k1, k2 = jax.random.key(1), jax.random.key(2)

    @jax.jit
    def outputs(p, key):  # (eval at t0, eval at t1, train at t0, its squared-norm gradient)
        def train_fn(p):
            return model.apply({"params": p}, x, t0, train=True, rngs={"dropout": key})

        out, vjp = jax.vjp(train_fn, p)
        evals = [model.apply({"params": p}, x, t, train=False) for t in (t0, t1)]
        return *evals, out, vjp(2 * out)[0]

    eval0, eval1, train1, grads = outputs(params, k1)
    _, _, train1b, _ = outputs(params, k1)
    _, _, train2, _ = outputs(params, k2)
    assert eval0.shape == (4, 3)
    assert float(jnp.abs(eval0 - eval1).mean()) > 1e-3
    np.testing.assert_array_equal(train1, train1b)
    assert float(jnp.abs(train1 - train2).mean()) > 1e-4
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["dense_in"]["kernel"]).max()) > 0


def test_mlp_on_images_flattens():
    config = mlp_config(1)
    config.data.image_size = 8
    config.diffusion.var_type = "learned_range"
    models.check_config(config)
    model = models.get_model(config)
    params = abstract_params(model, (1, 8, 8, 1))
    assert params["dense_out"]["kernel"].shape == (64, 128)
    assert abstract_apply(model, params, (2, 8, 8, 1)).shape == (2, 8, 8, 2)


# Errors.


def test_bad_model_name():
    config = tiny_config()
    config.model.name = "transformer"
    for fn in (models.get_model, models.check_config):
        with pytest.raises(ValueError, match="'transformer'.*'unet', 'mlp'"):
            fn(config)


@pytest.mark.parametrize("size, ch_mult", [(30, (1, 2, 2, 2)), (28, (1, 2, 2, 2)), (7, (1, 2))])
def test_bad_image_size(size, ch_mult):
    with pytest.raises(ValueError, match=f"divisible by {2 ** (len(ch_mult) - 1)}; got {size}"):
        models.check_image_size(size, ch_mult)
    config = tiny_config(size, 1, ch_mult)
    with pytest.raises(ValueError, match=f"got {size}"):
        models.check_config(config)
    model = models.get_model(config)
    with pytest.raises(ValueError, match=f"got {size}"):
        abstract_params(model, (1, size, size, 1))


def test_good_configs_pass_checks():
    for config in (cifar10_ddpm.get_config(), lsun256_ddpm.get_config(), mlp_config()):
        models.check_config(config)
    models.check_config(tiny_config(28, 1, (1, 2, 2)))


def test_bad_dtype_conv_impl_and_data_kind():
    config = tiny_config(dtype="float16")
    with pytest.raises(ValueError, match="model.dtype='float16'.*'float32', 'bfloat16'"):
        models.get_model(config)
    config = tiny_config(conv_impl="cudnn")
    with pytest.raises(ValueError, match="conv_impl='cudnn'.*'xla', 'fast'"):
        models.check_config(config)
    config = tiny_config()
    config.data.image_size = 0
    with pytest.raises(ValueError, match="needs image data"):
        models.check_config(config)


def test_models_are_linen_modules():
    assert isinstance(models.get_model(cifar10_ddpm.get_config()), nn.Module)
    assert isinstance(models.get_model(cifar10_ddpm.get_config()), unet.UNet)


# Fourier features (VDM) of the input.


def test_fourier_features_against_a_loop():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 3, 2)).astype(np.float32)
    out = np.asarray(layers.fourier_features(jnp.asarray(x), (4, 6)))
    expected = [x]
    for n in (4, 6):
        expected += [np.sin(2.0**n * np.pi * x), np.cos(2.0**n * np.pi * x)]
    np.testing.assert_allclose(out, np.concatenate(expected, axis=-1), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(layers.fourier_features(jnp.asarray(x), ())), x)


def test_fourier_features_are_periodic_in_a_17_level_grid():
    # 2^4 = 17 - 1 (and 2^5, 2^6, its multiples): every level of the digits' grid gets the same
    # features; 2^3 = (17 - 1) / 2 does not (its sine changes sign from level to level).
    grid = jnp.linspace(-1.0, 1.0, 17)[:, None]  # [17, 1]
    feats = np.asarray(layers.fourier_features(grid, (4, 5, 6)))[:, 1:]
    np.testing.assert_allclose(feats, np.broadcast_to(feats[:1], feats.shape), atol=1e-4)
    half = np.asarray(layers.fourier_features(grid + 0.05, (3,)))[:, 1]  # sin, off the levels
    np.testing.assert_allclose(half[1:], -half[:-1], atol=1e-4)
    assert np.abs(half).min() > 0.1


def test_fourier_grid_frequencies_are_periodic_in_a_256_level_grid():
    """model.fourier_grid: s = 255 for 256 levels, so n = 0 takes one value on every level and
    n = -1 alternates from level to level; no power of two (VDM's 2^7, 2^8) does either. A config
    without the key (an old config.json) keeps s = 1, and the model gets s from the config."""
    grid = jnp.linspace(-1.0, 1.0, 256)[:, None]  # [256, 1]
    on = np.asarray(layers.fourier_features(grid, (0,), 255.0), np.float64)[:, 1:]
    np.testing.assert_allclose(on, np.broadcast_to(on[:1], on.shape), atol=2e-3)
    half = np.asarray(layers.fourier_features(grid + 0.002, (-1,), 255.0))[:, 1]
    np.testing.assert_allclose(half[1:], -half[:-1], atol=2e-3)
    for n in (7, 8):
        powers = np.asarray(layers.fourier_features(grid, (n,)))[:, 1:]
        assert np.ptp(powers[:, 0]) > 0.5  # the sine drifts across the grid
    config = tiny_config()
    config.data.num_bins = 256
    assert layers.fourier_scale(config) == 1.0
    config.model.fourier_grid = True
    assert layers.fourier_scale(config) == 255.0
    assert models.get_model(config).fourier_scale == 255.0
    with config.unlocked():
        del config.model["fourier_grid"]
    assert layers.fourier_scale(config) == 1.0


def test_fourier_features_widen_only_the_input_convolution():
    config = tiny_config(channels=3)
    plain = abstract_params(models.get_model(config), (1, 8, 8, 3))
    config.model.fourier_features = (4, 5, 6)
    models.check_config(config)
    rich = abstract_params(models.get_model(config), (1, 8, 8, 3))
    assert rich["conv_in"]["kernel"].shape[2] == 3 * (1 + 2 * 3)
    assert num_params(rich) - num_params(plain) == 3 * 3 * (3 * 6) * config.model.ch
    assert cifar10_ddpm.get_config().model.fourier_features == ()


@pytest.mark.parametrize("bad", [(4, 4), (4.5,), (20,)])
def test_bad_fourier_features(bad):
    config = tiny_config()
    config.model.fourier_features = bad
    with pytest.raises(ValueError, match="fourier_features.*distinct integers"):
        models.check_config(config)


# Class conditioning and classifier-free guidance.


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_class_embedding_adds_one_null_entry_and_nothing_else(name):
    base = tiny_config() if name == "unet" else mlp_config()
    cond = tiny_config(num_classes=10) if name == "unet" else mlp_config(num_classes=10)
    shape = (2, 8, 8, 1) if name == "unet" else (2, 2)
    plain = abstract_params(models.get_model(base), shape)
    params = abstract_params(models.get_model(cond), shape)
    width = 4 * 32 if name == "unet" else 64  # the time embedding's width
    assert params["class"]["embed"]["embedding"].shape == (11, width)  # 10 classes + "no class"
    assert num_params(params) == num_params(plain) + 11 * width
    assert "class" not in plain


def test_labels_condition_the_output_and_none_is_the_null_class():
    model = models.get_model(tiny_config(num_classes=10))
    params = random_params(abstract_params(model, (2, 8, 8, 1)))
    x, t = batch((4, 8, 8, 1))
    apply = jax.jit(lambda y: model.apply({"params": params}, x, t, y))
    out = [apply(jnp.full((4,), k, jnp.int32)) for k in (0, 7)]
    assert float(jnp.abs(out[0] - out[1]).mean()) > 1e-4
    no_class = jax.jit(lambda: model.apply({"params": params}, x, t))()
    np.testing.assert_array_equal(no_class, apply(jnp.full((4,), 10, jnp.int32)))
    with pytest.raises(ValueError, match=r"labels must be integer class indices of shape \(4,\)"):
        model.apply({"params": params}, x, t, jnp.zeros((3,), jnp.int32))


def test_labels_given_to_an_unconditional_net_are_refused(tiny):
    model, params, _ = tiny
    x, t = batch((2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"unconditional network \(config.model.num_classes=0\)"):
        model.apply({"params": params}, x, t, jnp.zeros((2,), jnp.int32))


@pytest.mark.parametrize("learned", [False, True])
def test_guided_model_fn_is_one_batched_call_of_both_models(learned, monkeypatch):
    config = tiny_config(num_classes=10)
    config.diffusion.var_type = "learned_range" if learned else "fixedlarge"
    model = models.get_model(config)
    params = random_params(abstract_params(model, (2, 8, 8, 1)))
    x, t = batch((4, 8, 8, 1))
    labels = jnp.array([3, 0, 9, 3], jnp.int32)
    w = 2.5
    # The reference: the conditional and the unconditional outputs from separate calls.
    cond = model.apply({"params": params}, x, t, labels)
    uncond = model.apply({"params": params}, x, t, jnp.full((4,), 10, jnp.int32))
    c = 1  # channels of the mean part
    want = (1 + w) * cond[..., :c] - w * uncond[..., :c]
    if learned:
        want = jnp.concatenate([want, cond[..., c:]], axis=-1)

    batches = []
    apply = type(model).apply

    def spy(self, variables, x, *args, **kwargs):
        batches.append(x.shape[0])
        return apply(self, variables, x, *args, **kwargs)

    monkeypatch.setattr(type(model), "apply", spy)
    guided = models.model_fn(model, params, labels=labels, guidance_scale=w)(x, t)
    assert batches == [8]  # one network call on the doubled batch
    np.testing.assert_allclose(guided, want, rtol=1e-4, atol=1e-4)  # batch 8 vs 4: rounding
    # w = 0: the conditional model, one call on the batch itself.
    batches.clear()
    plain = models.model_fn(model, params, labels=labels)(x, t)
    assert batches == [4]
    np.testing.assert_array_equal(plain, cond)


def test_group_norm_keeps_its_precision_where_the_mean_dwarfs_the_spread():
    """Against float64 NumPy, on float32 inputs whose |mean| / std is 1, 100 and 1000: the
    two-pass variance keeps the normalised output within 2e-4 (the one-pass E[x^2] - E[x]^2 was
    5.2e-3 off at 100 and 0.51 at 1000)."""
    norm = layers.GroupNorm(num_groups=8)
    rng = np.random.default_rng(0)
    for ratio, tol in ((1, 2e-6), (100, 5e-5), (1000, 5e-4)):
        x = (ratio + rng.standard_normal((4, 16, 16, 64))).astype(np.float32)
        y = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x), np.float64)
        groups = x.astype(np.float64).reshape(4, 256, 8, 8)
        mean = groups.mean(axis=(1, 3), keepdims=True)
        var = groups.var(axis=(1, 3), keepdims=True)
        want = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
        assert np.max(np.abs(y - want)) < tol, (ratio, np.max(np.abs(y - want)))
