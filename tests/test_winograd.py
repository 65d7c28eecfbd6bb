"""Tests of diffusion_jax.cpu.winograd: the F(4x4, 3x3) transforms are Toom-Cook's (checked
in float64 against a direct correlation), the convolution and its gradients (both arguments, both
modes) equal lax.conv_general_dilated's to float32 rounding, and the per-shape rule."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from diffusion_jax.cpu import winograd

DN = ("NHWC", "HWIO", "NHWC")


def direct(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def test_transforms_compute_a_4x4_correlation_of_a_6x6_tile():
    """Y = A^T [(G g G^T) ⊙ (B^T d B)] A is the valid 3x3 correlation of the 6x6 tile d."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        d, g = rng.normal(size=(6, 6)), rng.normal(size=(3, 3))
        want = np.array([[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(4)] for i in range(4)])
        u = winograd.G @ g @ winograd.G.T
        v = winograd.B_T @ d @ winograd.B_T.T
        np.testing.assert_allclose(winograd.A_T @ (u * v) @ winograd.A_T.T, want, atol=1e-12)


@pytest.mark.parametrize(
    "n, h, w, c, o", [(2, 8, 8, 16, 24), (1, 4, 12, 8, 4), (3, 16, 16, 64, 32)]
)
def test_values_and_gradients_equal_the_direct_convolution(n, h, w, c, o):
    kx, kw, kg = jax.random.split(jax.random.key(h * w + c), 3)
    x = jax.random.normal(kx, (n, h, w, c))
    k = jax.random.normal(kw, (3, 3, c, o)) / (3 * c**0.5)
    g = jax.random.normal(kg, (n, h, w, o))
    y, vjp = jax.vjp(jax.jit(winograd.winograd_conv3x3), x, k)
    y_ref, vjp_ref = jax.vjp(direct, x, k)
    assert rel_err(y, y_ref) < 3e-5
    for got, want in zip(vjp(g), vjp_ref(g), strict=True):
        assert rel_err(got, want) < 3e-5
    # Forward mode too (sliced score matching differentiates the network with jax.jvp).
    dx, dk = jax.random.normal(kg, x.shape), jax.random.normal(kw, k.shape)
    _, tangent = jax.jvp(winograd.winograd_conv3x3, (x, k), (dx, dk))
    _, tangent_ref = jax.jvp(direct, (x, k), (dx, dk))
    assert rel_err(tangent, tangent_ref) < 3e-5


def test_shapes_it_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r"multiples of 4.*\(1, 6, 8, 2\)"):
        winograd.winograd_conv3x3(jnp.zeros((1, 6, 8, 2)), jnp.zeros((3, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"\[3, 3, 2, O\] kernel"):
        winograd.winograd_conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((5, 5, 2, 2)))


@pytest.mark.parametrize(
    "x_shape, kernel, strides, padding, dtype, want",
    [
        ((16, 32, 32, 128), (3, 3), (1, 1), "SAME", jnp.float32, True),
        ((16, 16, 16, 256), (3, 3), (1, 1), "SAME", jnp.float32, True),
        ((16, 8, 8, 256), (3, 3), (1, 1), "SAME", jnp.float32, False),  # below MIN_SIZE
        ((16, 32, 32, 3), (3, 3), (1, 1), "SAME", jnp.float32, False),  # conv_in
        ((16, 32, 32, 128), (3, 3), (2, 2), "SAME", jnp.float32, False),  # downsampling
        ((16, 32, 32, 128), (1, 1), (1, 1), "SAME", jnp.float32, False),
        ((16, 32, 32, 128), (3, 3), (1, 1), "VALID", jnp.float32, False),
        ((16, 32, 32, 128), (3, 3), (1, 1), "SAME", jnp.bfloat16, False),
        ((16, 36, 36, 128), (3, 3), (1, 1), "SAME", jnp.float32, True),
        ((16, 34, 34, 128), (3, 3), (1, 1), "SAME", jnp.float32, False),  # not tiles of 4
    ],
)
def test_which_convolutions_it_takes(x_shape, kernel, strides, padding, dtype, want):
    k_shape = (*kernel, x_shape[-1], 128)
    assert winograd.applies(x_shape, k_shape, strides, padding, dtype) is want


@pytest.mark.parametrize("h, c", [(16, 64), (8, 64)])  # taken / left to lax (MIN_SIZE)
def test_conv_module_is_nn_conv_with_another_formulation(h, c):
    """Same parameters as nn.Conv; Winograd where `applies` says so, else nn.Conv's program."""
    x = jax.random.normal(jax.random.key(0), (2, h, h, c))
    ref = nn.Conv(32, (3, 3), padding="SAME")
    mod = winograd.Conv(32, (3, 3), padding="SAME")
    params = ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, mod.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, params
    )
    y = jax.jit(mod.apply)(params, x)
    y_ref = jax.jit(ref.apply)(params, x)
    taken = winograd.applies(x.shape, (3, 3, c, 32), (1, 1), "SAME", x.dtype)
    assert taken is (h >= winograd.MIN_SIZE)
    jaxpr = str(jax.make_jaxpr(mod.apply)(params, x))
    assert ("conv_general_dilated" in jaxpr) is (not taken)
    if taken:
        assert rel_err(y, y_ref) < 3e-5
    else:
        np.testing.assert_array_equal(y, y_ref)
