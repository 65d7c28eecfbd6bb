"""ISM vs SSM (and SSM-VR) vs DSM: one small MLP score network s(x) trained with each objective.

Data: the ring of 8 Gaussians (``toy_distributions.get("gmm8")``: radius 3, std 0.3), whose score
∇ log p(x) = Σ_k r_k(x) (μ_k − x)/τ² is exact. Every objective trains the same network (the
library's residual MLP at a constant time input, hidden 128, 2 blocks) from the same
initialisation, with the same optimiser (Adam 1e-3, global-norm clip 1), batch (256 fresh
points per step) and number of steps:

    ISM     E[½‖s‖² + tr ∇ₓs]                     exact trace, D = 2 forward-mode JVPs
    SSM     E[vᵀ(∇ₓs)v + ½(vᵀs)²]                 one Rademacher v per point, one JVP
    SSM-VR  E[vᵀ(∇ₓs)v + ½‖s‖²]                   the same with the norm term in closed form
    DSM σ   E ½‖s(x + σz) + z/σ‖²                 no derivative of s at all

ISM, SSM and SSM-VR all equal ½E_p‖s − ∇log p‖² + const, so they are scored against the data's
score; DSM at σ is minimised by the score of q_σ = p ⊛ N(0, σ²I), so it is scored against ∇log
q_σ on points from q_σ, and also against the data score on points from p (its bias). Reported:

    err  = E_x‖s(x) − target(x)‖²   (x from the law whose score is the target, 20 000 fresh points)
    rel  = err / E_x‖target(x)‖²
    J(s) − J(∇log p): the ISM objective on fresh data points, minus its value at the true score;
         Hyvärinen's identity says it equals ½ E_p‖s − ∇log p‖² (a check of the estimates)

and the time per training step (the fastest ``lax.scan`` chunk of 200 steps after compilation).

    python experiments/score_matching/score_objectives.py [--steps 4000] [--outdir DIR]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from diffusion_jax import score
from diffusion_jax.models import mlp

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BATCH = 256


def objectives(quick: bool) -> dict:
    """name -> (loss(score_fn, x, key) per example, DSM σ or None)."""
    sigmas = (0.1, 0.5)
    out = {
        "ISM": (lambda s, x, k: score.ism_loss(s, x), None),
        "SSM": (lambda s, x, k: score.ssm_loss(s, x, k), None),
        "SSM-VR": (lambda s, x, k: score.ssm_loss(s, x, k, variance_reduced=True), None),
    }
    for sigma in sigmas[:1] if quick else sigmas:
        out[f"DSM σ={sigma}"] = (lambda s, x, k, sg=sigma: score.dsm_loss(s, x, sg, k), sigma)
    return out


def make_net(quick: bool):
    net = mlp.MLP(hidden_dim=16, num_layers=1) if quick else mlp.MLP(hidden_dim=128, num_layers=2)

    def score_fn(params):
        def s(x, *_):  # the DSM σ, if given, is ignored: one network per σ
            return net.apply({"params": params}, x, jnp.zeros((x.shape[0],), jnp.int32))

        return s

    params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))["params"]
    return params, score_fn


def train(loss, params, score_fn, dist, key, steps: int, chunk: int):
    """Adam on the mean loss over fresh batches; returns (params, seconds per step, last loss).

    Runs ``steps`` steps (at least two chunks) in jitted ``lax.scan`` chunks of ``chunk``; the
    time per step is that of the fastest chunk after the first (which compiles).
    """
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    data_key, loss_key = jax.random.split(key)

    def step(carry, i):
        params, opt_state = carry
        x = dist.sample(jax.random.fold_in(data_key, i), BATCH)
        value, grads = jax.value_and_grad(
            lambda p: jnp.mean(loss(score_fn(p), x, jax.random.fold_in(loss_key, i)))
        )(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    @jax.jit
    def run_chunk(carry, start):
        return jax.lax.scan(step, carry, start + jnp.arange(chunk))

    carry = (params, opt.init(params))
    carry, losses = run_chunk(carry, 0)  # compiles
    times = []
    for begin in range(chunk, max(steps, 2 * chunk), chunk):  # at least one timed chunk
        start = time.perf_counter()
        carry, losses = run_chunk(carry, begin)
        jax.block_until_ready(losses)
        times.append(time.perf_counter() - start)
    # The fastest chunk: on a shared CPU the others measure the neighbours' load as well.
    per_step = min(times) / chunk
    return carry[0], per_step, float(losses[-1])


def sq_err(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(a - b), axis=-1)


def main(argv=None) -> None:
    args = common.parse_args(
        os.path.join(RESULTS, "score_objectives"), __doc__, steps=4000, argv=argv
    )
    dist = common.toy_dist()
    key = jax.random.key(args.seed)
    n_eval = 500 if args.quick else 20_000
    chunk = 10 if args.quick else 200
    steps = max(chunk, args.steps // chunk * chunk)
    x_eval = dist.sample(jax.random.fold_in(key, 1), n_eval)
    true_eval = dist.score(x_eval)
    true_norm = float(jnp.mean(sq_err(true_eval, 0.0)))
    j_true = float(jnp.mean(score.ism_loss(dist.score, x_eval)))
    init_params, score_fn = make_net(args.quick)
    ism_jit = jax.jit(lambda p, x: jnp.mean(score.ism_loss(score_fn(p), x)))
    rows, fields = [], {}
    for i, (name, (loss, sigma)) in enumerate(objectives(args.quick).items()):
        print(f"training {name} for {steps} steps", flush=True)
        params, per_step, last = train(
            loss, init_params, score_fn, dist, jax.random.fold_in(key, 100), steps, chunk
        )
        s = jax.jit(score_fn(params))
        err_data = float(jnp.mean(sq_err(s(x_eval), true_eval)))
        if sigma is None:
            target_name, err, rel = "∇log p", err_data, err_data / true_norm
        else:
            q = dist.noised(1.0, sigma)
            xq = q.sample(jax.random.fold_in(key, 200 + i), n_eval)
            tq = q.score(xq)
            err = float(jnp.mean(sq_err(s(xq), tq)))
            rel = err / float(jnp.mean(sq_err(tq, 0.0)))
            target_name = f"∇log q_σ, σ={sigma}"
        rows.append(
            {
                "objective": name,
                "target": target_name,
                "err vs target": err,
                "rel err vs target": rel,
                "err vs ∇log p": err_data,
                "J(s) − J(∇log p)": float(ism_jit(params, x_eval)) - j_true,
                "ms/step (best chunk)": 1e3 * per_step,
                "final loss": last,
            }
        )
        fields[name] = (s, sigma)

    note = (
        f"Data {common.DATASET}; {steps} steps × batch {BATCH} per objective; errors on "
        f"{n_eval} fresh points; E_p‖∇log p‖² = {true_norm:.4g}; "
        f"J_ISM(∇log p) = {j_true:.4g}."
    )
    common.write_table(args.outdir, "score_objectives", rows, note)
    plot(args.outdir, dist, fields)


def plot(outdir: str, dist, fields: dict) -> None:
    """Top: the fields (true first); bottom: log10 ‖s − target‖ with the data's contours."""
    lim = 4.5
    xx, yy, logp = common.density_grid(dist, lim, 64)
    grid = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    ticks = np.linspace(-lim, lim, 15)
    qx, qy = np.meshgrid(ticks, ticks)
    qxy = np.stack([qx.ravel(), qy.ravel()], -1).astype(np.float32)

    cols = len(fields) + 1
    fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 4.9), squeeze=False)
    panels = [("true ∇log p", dist.score, dist.score)]
    for name, (s, sigma) in fields.items():
        target = dist.score if sigma is None else dist.noised(1.0, sigma).score
        panels.append((name, s, target))
    for c, (name, s, target) in enumerate(panels):
        ax = axes[0, c]
        ax.contour(xx, yy, np.exp(logp), levels=4, colors="0.75", linewidths=0.6)
        common.quiver_field(ax, qxy, np.asarray(s(jnp.asarray(qxy))), scale=6.0, width=0.008)
        ax.set_title(name, fontsize=9)
        ax = axes[1, c]
        if c == 0:
            im = ax.imshow(
                logp, origin="lower", extent=(-lim, lim, -lim, lim), vmin=-12, cmap="magma"
            )
            ax.set_title("log p", fontsize=9)
        else:
            e = np.sqrt(np.asarray(sq_err(s(grid), target(grid)))).reshape(xx.shape)
            im = ax.imshow(
                np.log10(e + 1e-6),
                origin="lower",
                extent=(-lim, lim, -lim, lim),
                vmin=-2,
                vmax=2,
                cmap="viridis",
            )
            ax.contour(xx, yy, np.exp(logp), levels=4, colors="w", linewidths=0.5)
            ax.set_title("log10 ‖s − target‖", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    common.save_figure(fig, f"{outdir}/score_fields.png")


if __name__ == "__main__":
    main()
