"""Tests of diffusion_jax.cpu.fast_conv: exact agreement with lax.conv_general_dilated (values
and both gradients), interchangeability with flax.linen.Conv, and jit / vmap / remat / bfloat16."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from diffusion_jax.cpu import fast_conv
from diffusion_jax.cpu.fast_conv import Conv, conv2d

DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def random_case(seed, n, h, w, c, kh, kw, o, dtype=jnp.float32):
    kx, kk = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, h, w, c), jnp.float32).astype(dtype)
    k = (jax.random.normal(kk, (kh, kw, c, o), jnp.float32) / np.sqrt(kh * kw * c)).astype(dtype)
    return x, k


def value_and_vjp(f, x, k, seed=7):
    y, vjp = jax.vjp(f, x, k)
    g = jax.random.normal(jax.random.key(seed), y.shape, jnp.float32).astype(y.dtype)
    return (y, *vjp(g))


def assert_close(got, want, rtol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    scale = np.max(np.abs(want)) + 1e-30
    np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=rtol)


# (H, W, kernel, strides, padding): the U-Net's cases first (3x3 stride 1 and 2 'SAME', 1x1), then
# odd sizes, rectangular kernels and strides, 'VALID', explicit and negative padding.
CASES = [
    (8, 8, (3, 3), (1, 1), "SAME"),
    (8, 8, (3, 3), (2, 2), "SAME"),
    (8, 8, (1, 1), (1, 1), "SAME"),
    (8, 8, (1, 1), (1, 1), "VALID"),
    (7, 9, (3, 3), (2, 2), "SAME"),
    (7, 6, (3, 3), (2, 2), "VALID"),
    (9, 7, (2, 3), (1, 2), "SAME"),
    (6, 6, (4, 4), (3, 2), ((1, 2), (0, 3))),
    (6, 6, (1, 1), (2, 2), "SAME"),
    (8, 8, (3, 3), (1, 1), ((2, 0), (0, 2))),
    (8, 8, (3, 3), (2, 1), ((-1, 1), (1, 0))),
]


@pytest.mark.parametrize("h,w,kernel,strides,padding", CASES)
def test_conv2d_values_and_gradients_equal_lax(h, w, kernel, strides, padding):
    x, k = random_case(0, 2, h, w, 5, *kernel, 6)
    want = value_and_vjp(lambda a, b: lax_conv(a, b, strides, padding), x, k)
    got = value_and_vjp(jax.jit(lambda a, b: conv2d(a, b, strides, padding)), x, k)
    for g, wnt in zip(got, want, strict=True):
        assert g.dtype == wnt.dtype
        assert_close(g, wnt, rtol=2e-6)


def test_conv2d_unet_shapes_equal_lax():
    """The CIFAR-10 U-Net's widths (128 channels), where float32 sums are long."""
    for strides in [(1, 1), (2, 2)]:
        x, k = random_case(1, 2, 16, 16, 128, 3, 3, 128)
        want = value_and_vjp(lambda a, b, s=strides: lax_conv(a, b, s, "SAME"), x, k)
        got = value_and_vjp(jax.jit(lambda a, b, s=strides: conv2d(a, b, s, "SAME")), x, k)
        for g, wnt in zip(got, want, strict=True):
            assert_close(g, wnt, rtol=1e-5)


@pytest.mark.parametrize("kernel,strides", [((3, 3), (1, 1)), ((3, 3), (2, 2)), ((1, 1), (1, 1))])
def test_conv2d_check_grads(kernel, strides):
    """Finite differences (reverse mode, first and second order), in float64."""
    with jax.enable_x64(True):
        x, k = random_case(2, 1, 5, 5, 2, *kernel, 3, dtype=jnp.float64)
        check_grads(lambda a, b: conv2d(a, b, strides, "SAME"), (x, k), order=2, modes=["rev"])


def test_conv2d_under_vmap_and_remat():
    x, k = random_case(3, 2, 8, 8, 4, 3, 3, 5)
    xs = jnp.stack([x, 2.0 * x, -x])  # an extra leading axis for vmap

    def loss(conv, xs, k):
        ys = jax.vmap(lambda a: conv(a, k, (2, 2), "SAME"))(xs)
        return jnp.sum(jnp.sin(ys))

    want = jax.grad(lambda xs, k: loss(lax_conv, xs, k), (0, 1))(xs, k)
    got = jax.jit(jax.grad(lambda xs, k: loss(conv2d, xs, k), (0, 1)))(xs, k)
    remat = jax.jit(jax.grad(jax.checkpoint(lambda xs, k: loss(conv2d, xs, k)), (0, 1)))(xs, k)
    for g, r, wnt in zip(got, remat, want, strict=True):
        assert_close(g, wnt, rtol=2e-6)
        assert_close(r, wnt, rtol=2e-6)
    # vmap over the kernel too (per-example kernels)
    ks = jnp.stack([k, -k, 0.5 * k])
    want = jax.vmap(lambda a, b: lax_conv(a, b, (1, 1), "SAME"))(xs, ks)
    got = jax.vmap(lambda a, b: conv2d(a, b, (1, 1), "SAME"))(xs, ks)
    assert_close(got, want, rtol=2e-6)


def test_conv2d_bfloat16():
    x, k = random_case(4, 2, 8, 8, 16, 3, 3, 8, dtype=jnp.bfloat16)
    for strides in [(1, 1), (2, 2)]:
        want = value_and_vjp(lambda a, b, s=strides: lax_conv(a, b, s, "SAME"), x, k)
        got = value_and_vjp(jax.jit(lambda a, b, s=strides: conv2d(a, b, s, "SAME")), x, k)
        for g, wnt in zip(got, want, strict=True):
            assert g.dtype == jnp.bfloat16
            assert_close(g, wnt, rtol=2e-2)


def test_conv2d_rejects_bad_input():
    x, k = random_case(5, 1, 4, 4, 3, 3, 3, 2)
    with pytest.raises(ValueError, match="channels"):
        conv2d(x, jnp.zeros((3, 3, 4, 2)))
    with pytest.raises(ValueError, match="NHWC|N,H,W,C"):
        conv2d(x[0], k)
    with pytest.raises(ValueError, match="SAME"):
        conv2d(x, k, padding="CIRCULAR")


MODULE_CASES = [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=6, kernel_size=(3, 3), strides=(2, 2)),
    dict(features=6, kernel_size=(3, 3), strides=2, padding="VALID"),
    dict(features=6, kernel_size=(1, 1), use_bias=False),
    dict(features=6, kernel_size=(3, 3), padding=1, kernel_init=nn.initializers.ones_init()),
    dict(
        features=6,
        kernel_size=(3, 3),
        bias_init=nn.initializers.normal(1.0),
        kernel_init=nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
    ),
]


@pytest.mark.parametrize("kwargs", MODULE_CASES)
def test_module_interchangeable_with_nn_conv(kwargs):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ref, fast = nn.Conv(**kwargs), Conv(**kwargs)
    p_ref = ref.init(jax.random.key(1), x)
    p_fast = fast.init(jax.random.key(1), x)
    # same tree, shapes, dtypes and (same key, same initialisers) values
    assert jax.tree.structure(p_ref) == jax.tree.structure(p_fast)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_fast), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)

    # same outputs and parameter gradients with the same parameters
    def loss(module, params):
        return jnp.sum(jnp.sin(module.apply(params, x)))

    assert_close(fast.apply(p_ref, x), ref.apply(p_ref, x), rtol=2e-6)
    g_ref = jax.grad(lambda p: loss(ref, p))(p_ref)
    g_fast = jax.jit(jax.grad(lambda p: loss(fast, p)))(p_ref)
    for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref), strict=True):
        assert_close(a, b, rtol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_dtypes_like_nn_conv(dtype):
    kwargs = dict(features=4, kernel_size=(3, 3), dtype=dtype, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    params = nn.Conv(**kwargs).init(jax.random.key(1), x)
    want = nn.Conv(**kwargs).apply(params, x)
    got = Conv(**kwargs).apply(params, x)
    assert got.dtype == want.dtype == dtype
    assert_close(got, want, rtol=2e-2 if dtype == jnp.bfloat16 else 2e-6)
    assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_module_batch_axes_like_nn_conv():
    kwargs = dict(features=4, kernel_size=(3, 3), strides=2)
    x = jax.random.normal(jax.random.key(0), (2, 3, 6, 6, 3))  # two leading batch axes
    params = nn.Conv(**kwargs).init(jax.random.key(1), x)
    for inp in (x, x[0, 0]):  # several batch axes; none
        want = nn.Conv(**kwargs).apply(params, inp)
        got = Conv(**kwargs).apply(params, inp)
        assert got.shape == want.shape
        assert_close(got, want, rtol=2e-6)


def test_module_rejects_non_2d_kernels():
    with pytest.raises(ValueError, match="2-D"):
        Conv(4, (3,)).init(jax.random.key(0), jnp.zeros((1, 5, 5, 2)))


def test_resolve_padding_matches_lax():
    for padding in ["SAME", "VALID"]:
        for n, k, s in [(32, 3, 1), (32, 3, 2), (7, 3, 2), (8, 1, 1), (9, 4, 3)]:
            want = tuple(tuple(p) for p in lax.padtype_to_pads((n, n), (k, k), (s, s), padding))
            assert fast_conv.resolve_padding(padding, (n, n), (k, k), (s, s)) == want
    assert fast_conv.resolve_padding(2, (8, 8), (3, 3), (1, 1)) == ((2, 2), (2, 2))
    assert fast_conv.resolve_padding([1, (0, 2)], (8, 8), (3, 3), (1, 1)) == ((1, 1), (0, 2))
