"""Micro-benchmark of the math core: the full bound and the samplers with an analytic model.

The model is the exact eps-predictor for Gaussian data x0 ~ N(mu, s^2 I),
E[eps | x_t] = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t), so the
timings measure the library's own cost (no network). Prints one JSON line.

    python experiments/perf/bench_math.py --num_timesteps 1000 --batch 64 --dims 3072
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, schedules  # noqa: E402

MU, SD = 0.1, 0.3


def gaussian_eps_model(d: diffusion.GaussianDiffusion) -> diffusion.ModelFn:
    def model_fn(x_t: jax.Array, t: jax.Array) -> jax.Array:
        a = d.alphas_cumprod[t][:, None]
        one_minus_a = jnp.square(d.sqrt_one_minus_alphas_cumprod[t])[:, None]
        return jnp.sqrt(one_minus_a) * (x_t - jnp.sqrt(a) * MU) / (a * SD**2 + one_minus_a)

    return model_fn


def timed(fn, *args, repeats: int) -> dict:
    """Compile-and-run time of the first call, then the best of ``repeats`` further calls."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return {"first_call_s": round(first, 4), "run_s": round(best, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_timesteps", type=int, default=1000)
    parser.add_argument("--schedule", default="linear")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dims", type=int, default=3072, help="dimensions per example")
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--respaced_steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    d = diffusion.GaussianDiffusion.create(
        schedules.get_beta_schedule(args.schedule, args.num_timesteps)
    )
    model = gaussian_eps_model(d)
    shape = (args.batch, args.dims)
    key = jax.random.key(0)
    x0 = jnp.clip(MU + SD * jax.random.normal(jax.random.key(1), shape), -1.0, 1.0)
    T, B = args.num_timesteps, args.batch

    runs = {
        "calc_bpd_loop": (
            jax.jit(lambda x0, k: diffusion.calc_bpd_loop(d, model, x0, k)),
            (x0, key),
            T,
        ),
        "p_sample_loop": (
            jax.jit(lambda k: diffusion.p_sample_loop(d, model, shape, k)),
            (key,),
            T,
        ),
        "p_sample_loop_respaced": (
            jax.jit(
                lambda k: diffusion.p_sample_loop(d, model, shape, k, num_steps=args.respaced_steps)
            ),
            (key,),
            args.respaced_steps,
        ),
        "ddim_sample_loop": (
            jax.jit(lambda k: diffusion.ddim_sample_loop(d, model, shape, k, args.ddim_steps)),
            (key,),
            args.ddim_steps,
        ),
    }
    result = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "num_timesteps": T,
        "batch": B,
        "dims": args.dims,
    }
    for name, (fn, fn_args, steps) in runs.items():
        r = timed(fn, *fn_args, repeats=args.repeats)
        r["steps"] = steps
        r["examples_per_s"] = round(B / r["run_s"], 2)
        r["example_steps_per_s"] = round(B * steps / r["run_s"], 1)
        result[name] = r
    print(json.dumps(result))


if __name__ == "__main__":
    main()
