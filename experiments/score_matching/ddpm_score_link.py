"""DDPM ↔ score: a trained ε-model is a noise-conditional score model, compared with an NCSN.

Two models are trained through the library (``train.train_and_evaluate``) on the ring of 8
Gaussians with the same MLP, batch and steps (``configs/ncsn_toy.py``; see ``common.py``):

- a DDPM ε-model (T = 200, linear betas 1e-4 … 0.1), whose score is, by Tweedie's formula,

      ∇ log q(x_t) = −E[ε | x_t] / √(1 − ᾱ_t)  ≈  ŝ_t(x) = −ε̂(x, t) / √(1 − ᾱ_t)
      (``diffusion.score_from_eps``), with q(x_t) = ``toy.noised(√ᾱ_t, √(1 − ᾱ_t))``;

- an NCSN s(y, i) at 10 geometric levels σ_i from 6 to 0.05, for q_σ = ``toy.noised(1, σ)``.

Each model is compared with its own exact target on fresh points from that target's law:

    rel err = E‖ŝ − ∇log q‖² / E‖∇log q‖².

The two models describe the same family of laws: x_t = √ᾱ_t (x_0 + σ_t z) with
σ_t = √(1 − ᾱ_t)/√ᾱ_t, so q(x_t) is q_σt scaled by √ᾱ_t and

    ∇ log q_σt(y) = √ᾱ_t ∇ log q(x_t = √ᾱ_t y).

The second table evaluates the DDPM in this "NCSN frame" at the t whose σ_t is nearest each NCSN
level σ_i, on the same points y ~ q_σi, next to the NCSN: rel err of each against its exact
target, their difference from each other, and the difference between the two exact targets
(σ_t ≠ σ_i exactly: the floor of that difference).

    python experiments/score_matching/ddpm_score_link.py [--steps 6000] [--workdir /tmp/dj_runs]

``--workdir`` keeps the two runs (``WORKDIR/ddpm``, ``WORKDIR/ncsn``); a later script given the
same folder and steps (``sampler_comparison.py``) loads them instead of training again.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import objectives

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

TABLE_TS = (0, 5, 10, 20, 40, 60, 80, 100, 130, 199)


def add_args(parser) -> None:
    parser.add_argument("--workdir", default=None, help="keep/reuse the runs here")


def rel_err(est: jax.Array, exact: jax.Array, ref: jax.Array | None = None) -> jax.Array:
    """E‖est − exact‖² / E‖ref‖² (ref defaults to exact)."""
    ref = exact if ref is None else ref
    return jnp.mean(jnp.sum((est - exact) ** 2, -1)) / jnp.mean(jnp.sum(ref**2, -1))


def main(argv=None) -> None:
    args = common.parse_args(
        os.path.join(RESULTS, "ddpm_score_link"), __doc__, steps=6000, argv=argv, extra=add_args
    )
    dist = common.toy_dist()
    key = jax.random.key(args.seed)
    n = 500 if args.quick else 10_000
    runs = common.train_both(args)
    config, model, params, _ = runs["ddpm"]
    d = objectives.make_diffusion(config)
    eps_fn = common.ddpm_eps(model, params)
    ncfg, nmodel, nparams, _ = runs["ncsn"]
    sigmas = common.ncsn_sigmas(ncfg)
    ncsn_fn = common.ncsn_score(ncfg, nmodel, nparams)
    sigma_t = np.asarray(d.sqrt_one_minus_alphas_cumprod / d.sqrt_alphas_cumprod)  # [T]

    @jax.jit
    def ddpm_at(t, key):
        """rel err of ŝ_t on x_t ~ q(x_t), and E‖ŝ − s‖², E‖s‖²."""
        a, s = d.sqrt_alphas_cumprod[t], d.sqrt_one_minus_alphas_cumprod[t]
        x0_key, z_key = jax.random.split(key)
        x_t = a * dist.sample(x0_key, n) + s * jax.random.normal(z_key, (n, 2))
        tt = jnp.full((n,), t, jnp.int32)
        est = diffusion_lib.score_from_eps(d, eps_fn(x_t, tt), tt)
        exact = common.exact_noised_score(dist, jnp.full((n,), a), jnp.full((n,), s), x_t)
        return rel_err(est, exact), jnp.mean(jnp.sum((est - exact) ** 2, -1))

    @jax.jit
    def ncsn_level(i, key):
        """At y ~ q_σi: the NCSN, the DDPM at its nearest t in the NCSN frame, the exact scores."""
        sig = sigmas[i]
        t = jnp.argmin(jnp.abs(jnp.log(jnp.asarray(sigma_t)) - jnp.log(sig)))
        a, s = d.sqrt_alphas_cumprod[t], d.sqrt_one_minus_alphas_cumprod[t]
        x0_key, z_key = jax.random.split(key)
        y = dist.sample(x0_key, n) + sig * jax.random.normal(z_key, (n, 2))
        ones = jnp.ones((n,))
        s_ncsn = ncsn_fn(y, jnp.full((n,), i, jnp.int32))
        tt = jnp.full((n,), t, jnp.int32)
        s_ddpm = a * diffusion_lib.score_from_eps(d, eps_fn(a * y, tt), tt)
        exact_i = common.exact_noised_score(dist, ones, sig * ones, y)
        exact_t = common.exact_noised_score(dist, ones, (s / a) * ones, y)
        return dict(
            t=t,
            sigma_t=s / a,
            ncsn=rel_err(s_ncsn, exact_i),
            ddpm=rel_err(s_ddpm, exact_t),
            between=rel_err(s_ddpm, s_ncsn, exact_i),
            exact_gap=rel_err(exact_t, exact_i),
        )

    ts = (0, 20, 199) if args.quick else TABLE_TS
    rows = []
    for t in ts:
        rel, abs_err = ddpm_at(t, jax.random.fold_in(key, t))
        rows.append(
            {
                "t": t,
                "√ᾱ_t": float(d.sqrt_alphas_cumprod[t]),
                "√(1−ᾱ_t)": float(d.sqrt_one_minus_alphas_cumprod[t]),
                "σ_t = √(1−ᾱ)/√ᾱ": float(sigma_t[t]),
                "E‖ŝ−s‖²": float(abs_err),
                "rel err": float(rel),
            }
        )
    common.write_table(
        args.outdir,
        "ddpm_score",
        rows,
        f"DDPM ε-model → score_from_eps vs the exact ∇log q(x_t); {n} points per t.",
    )
    level_rows = []
    for i in range(len(sigmas)):
        r = jax.device_get(ncsn_level(i, jax.random.fold_in(key, 1000 + i)))
        level_rows.append(
            {
                "level i": i,
                "σ_i": float(sigmas[i]),
                "DDPM t": int(r["t"]),
                "σ_t": float(r["sigma_t"]),
                "NCSN rel err": float(r["ncsn"]),
                "DDPM rel err (NCSN frame)": float(r["ddpm"]),
                "‖DDPM − NCSN‖² rel": float(r["between"]),
                "‖exact σ_t − exact σ_i‖² rel": float(r["exact_gap"]),
            }
        )
    common.write_table(
        args.outdir,
        "ncsn_vs_ddpm",
        level_rows,
        f"At each NCSN level, on {n} points y ~ q_σi; the DDPM at the nearest σ_t. Relative "
        "errors are divided by E‖exact score‖² at σ_i (σ_t for the DDPM's own error).",
    )

    # Curves of rel err over σ: the DDPM at every 5th t, the NCSN at its levels.
    curve_ts = list(range(0, d.num_timesteps, 10 if args.quick else 5))
    ddpm_curve = [float(ddpm_at(t, jax.random.fold_in(key, 5000 + t))[0]) for t in curve_ts]
    curve = [
        {"t": t, "σ_t": float(sigma_t[t]), "rel err": e}
        for t, e in zip(curve_ts, ddpm_curve, strict=True)
    ]
    with open(os.path.join(args.outdir, "ddpm_curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    plot(args.outdir, dist, d, eps_fn, ncsn_fn, sigmas, sigma_t, curve_ts, ddpm_curve, level_rows)


def plot(outdir, dist, d, eps_fn, ncsn_fn, sigmas, sigma_t, curve_ts, ddpm_curve, level_rows):
    fig = plt.figure(figsize=(12, 7))
    gs = fig.add_gridspec(3, 5, width_ratios=[2.2, 0.25, 1, 1, 1], hspace=0.25, wspace=0.08)
    ax = fig.add_subplot(gs[:, 0])
    ax.loglog(sigma_t[curve_ts], ddpm_curve, "-", label="DDPM ε-model → score (every 5th t)")
    ax.loglog(
        [r["σ_i"] for r in level_rows],
        [r["NCSN rel err"] for r in level_rows],
        "o",
        label="NCSN (its 10 levels)",
    )
    ax.loglog(
        [r["σ_i"] for r in level_rows],
        [r["‖DDPM − NCSN‖² rel"] for r in level_rows],
        "x",
        label="DDPM vs NCSN (NCSN frame)",
    )
    ax.set_xlabel("noise level σ (DDPM: σ_t = √(1−ᾱ_t)/√ᾱ_t)")
    ax.set_ylabel("E‖ŝ − ∇log q‖² / E‖∇log q‖²")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.set_title("relative score error against the exact score", fontsize=10)

    lim = 5.0
    ticks = np.linspace(-lim, lim, 17)
    gx, gy = np.meshgrid(ticks, ticks)
    y = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], -1), jnp.float32)
    m = y.shape[0]
    shown = [len(sigmas) - 1, len(sigmas) // 2, 1]  # small, middle and large σ
    for r, i in enumerate(shown):
        sig = float(sigmas[i])
        t = int(np.argmin(np.abs(np.log(sigma_t) - np.log(sig))))
        a = float(d.sqrt_alphas_cumprod[t])
        tt = jnp.full((m,), t, jnp.int32)
        fields = {
            f"exact ∇log q_σ, σ={sig:.3g}": dist.noised(1.0, sig).score(y),
            f"DDPM t={t} (σ_t={sigma_t[t]:.3g})": a
            * diffusion_lib.score_from_eps(d, eps_fn(a * y, tt), tt),
            f"NCSN level {i}": ncsn_fn(y, jnp.full((m,), i, jnp.int32)),
        }
        xx, yy, logp = common.density_grid(dist.noised(1.0, sig), lim, 60)
        # One arrow scale per row: the exact field's longest arrow spans one grid cell.
        exact = np.asarray(next(iter(fields.values())))
        scale = np.log1p(np.linalg.norm(exact, axis=-1).max()) / (ticks[1] - ticks[0])
        for c, (name, f) in enumerate(fields.items()):
            ax = fig.add_subplot(gs[r, 2 + c])
            ax.contour(xx, yy, np.exp(logp), levels=4, colors="0.75", linewidths=0.6)
            common.quiver_field(ax, np.asarray(y), np.asarray(f), scale=scale, width=0.006)
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
    common.save_figure(fig, os.path.join(outdir, "ddpm_score_link.png"))


if __name__ == "__main__":
    main()
