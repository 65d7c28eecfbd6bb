"""GroupNorm's precision and cost: the largest error of ``models.layers.GroupNorm`` on float32
inputs whose |mean| / std is 1, 100 and 1000, against the same normalisation in float64 NumPy,
and the time of its forward and backward pass on a [64, 32, 32, 128] activation (best and median
of 20). Prints one JSON line.

    python experiments/perf/group_norm.py
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax.models import layers  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    norm = layers.GroupNorm(num_groups=8)
    out = {"max_abs_error": {}}
    for ratio in (1, 100, 1000):
        x = (ratio + rng.standard_normal((4, 16, 16, 64))).astype(np.float32)
        y = np.asarray(norm.apply(norm.init(jax.random.key(0), x), x), np.float64)
        groups = x.astype(np.float64).reshape(4, 256, 8, 8)
        mean, var = groups.mean(axis=(1, 3), keepdims=True), groups.var(axis=(1, 3), keepdims=True)
        want = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
        out["max_abs_error"][str(ratio)] = float(np.max(np.abs(y - want)))
    x = jnp.asarray(rng.standard_normal((64, 32, 32, 128)), jnp.float32)
    norm = layers.GroupNorm(num_groups=32)
    params = norm.init(jax.random.key(0), x)
    step = jax.jit(jax.grad(lambda p, x: jnp.sum(norm.apply(p, x) ** 2), argnums=(0, 1)))
    jax.block_until_ready(step(params, x))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
    out["fwd_bwd_ms"] = {"best": 1e3 * min(times), "median": 1e3 * sorted(times)[10]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
