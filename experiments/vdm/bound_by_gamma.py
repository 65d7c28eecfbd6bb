"""Where a vdm run's continuous bound comes from: the diffusion integrand
½ E_x,ε ‖ε − ε̂(z_γ)‖² per unit γ (bits/dim), on a grid of γ between the run's endpoints.

    python experiments/vdm/bound_by_gamma.py --workdir runs/digits_vdm [--out FILE.json]

The bound's diffusion term is the integral of this curve over [γ(0), γ(1)] (whatever the
schedule's shape), so the curve says which noise levels the bits are spent at.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--num_gamma", type=int, default=31)
    parser.add_argument("--num_noise", type=int, default=4, help="noise draws per image and γ")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from configs import workdir as workdir_config
    from diffusion_jax import checkpoints, evaluation, input_pipeline, models, objectives, vdm

    config = evaluation.prepare(workdir_config.get_config(args.workdir))
    model = models.get_model(config)
    params = checkpoints.load_params(args.workdir, ema=True)
    source = input_pipeline.load_split(config, "test")
    x = input_pipeline.to_model_space(jnp.asarray(source.images[:]), config.data.num_bins)
    g0, g1 = (float(v) for v in objectives.gamma_fn(model, params)(jnp.asarray([0.0, 1.0])))
    grid = np.linspace(g0, g1, args.num_gamma)
    scale = vdm.bits_per_dim_scale(x)

    @jax.jit
    def integrand(gamma, key):
        noise = jax.random.normal(key, x.shape)
        g = jnp.full((x.shape[0],), gamma)
        z = vdm.q_sample(x, g, noise)
        eps = model.apply({"params": params}, z, g, None, method="eps")
        return 0.5 * jnp.mean(jnp.sum(jnp.square(noise - eps).reshape(x.shape[0], -1), 1)) * scale

    values = []
    for i, gamma in enumerate(grid):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(0), i), args.num_noise)
        values.append(float(np.mean([integrand(gamma, k) for k in keys])))
    area = float(np.trapezoid(values, grid))
    out = {"gamma": grid.tolist(), "integrand_bpd_per_gamma": values, "integral": area}
    print(f"gamma endpoints {g0:.3f} {g1:.3f}; integral of the curve {area:.4f} bits/dim")
    for g, v in zip(grid, values, strict=True):
        print(f"  gamma {g:7.3f}  {v:.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
