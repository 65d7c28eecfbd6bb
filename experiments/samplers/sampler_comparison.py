"""Samplers per number of network calls: ancestral DDPM (full and respaced), DDIM η = 0 and η = 1,
and annealed Langevin, on the ring of 8 Gaussians, scored by two-sample distances to fresh data.

The DDPM (T = 200) and the NCSN (10 levels, σ 6 → 0.05) are the runs of ``ddpm_score_link.py``
(same config, steps and seed: pass the same ``--workdir`` to reuse them). Each sampler runs with
the learned network and with the oracle, the exact ε (E[ε | x_t] = −√(1−ᾱ_t) ∇log q(x_t)) or
the exact score ∇log q_σ, which separates the sampler's own error from the network's.

- ancestral: ``p_sample_loop`` respaced to K steps (K = T = 200 is the full DDPM chain);
- DDIM: ``ddim_sample_loop`` over K steps, η = 0 (deterministic) and η = 1;
- annealed Langevin: the NCSN's 10 levels × K/10 steps each, α_i = ε σ_i²/σ_L² with
  ε = c σ_L², c = min(1, 20/(K/10)): c = 0.2 at 100 steps per level (``configs/ncsn_toy.py``),
  larger steps for shorter chains (capped at c = 1, where the chain stays stable). The rule was
  set with the oracle score, never with the learned one. Start: uniform on [-1, 1]² as in
  ``sampling.make_sample_fn``.

Distances (``metrics.py``) between N = 5000 generated points and one set of N fresh data points:
sliced 2-Wasserstein over 512 directions (sensitive to a few far-away points) and the unbiased
MMD² with RBF kernels of bandwidths 0.1, 0.3, 1, 3 (summed; bounded, so blind to how far an
outlier is), plus the fraction of points beyond ‖x‖ = 5, where the data has none. The floor is
the same distance from 5 other fresh data sets to that reference (mean ± std): differences
smaller than its std are noise. Every sampler starts from the same x_T (or initial points).

    python experiments/samplers/sampler_comparison.py [--steps 6000] [--workdir /tmp/dj_runs]

With ``--digits_workdir DIR`` (a run of ``configs/digits.py``, e.g. the README's first command's
``runs/digits``) it compares instead the product's samplers (``sampling.SAMPLERS`` through
``sampling.make_sample_fn``, EMA parameters) on the digits model per number of network calls:
ancestral (respaced to K steps; K = T = 1000 is the full chain), DDIM η = 0, DPM-Solver++(2M) and
Heun (K calls buy (K + 1) // 2 steps), each from the same keys, judged by the classifier metric
(``evaluation.classifier.classifier_metrics``: Fréchet distance of a small classifier's features
and its IS-like score, against the training digits, with bootstrap standard errors and the
real-vs-real value), and writes ``digits.md`` / ``digits.json``, ``digits.png`` and a grid of
each sampler at 20 calls:

    python experiments/samplers/sampler_comparison.py --digits_workdir runs/digits \\
        [--num_samples 500]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import metrics
import numpy as np

from diffusion_jax import diffusion as diffusion_lib
from diffusion_jax import objectives, score

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

BUDGETS = (10, 50, 200, 1000)
FAR = 5.0  # no data point lies this far from the origin (the modes are at radius 3, std 0.3)
SAMPLERS = ("ancestral", "DDIM η=0", "DDIM η=1", "annealed Langevin")


def add_args(parser) -> None:
    parser.add_argument("--workdir", default=None, help="keep/reuse the runs here")
    parser.add_argument("--num_samples", type=int, default=5000)
    parser.add_argument("--digits_workdir", default=None, help="compare samplers on this run")
    parser.add_argument("--budgets", default="10,20,50,100,1000", help="digits: network calls")
    parser.add_argument("--samplers", default="ancestral,ddim,dpmpp_2m,heun", help="digits")
    parser.add_argument("--tag", default="digits", help="digits: the output files' name")
    parser.add_argument(
        "--inversion", action="store_true", help="digits: DDIM inversion of test digits instead"
    )


def langevin_step_lr(sigma_min: float, n_steps_each: int) -> float:
    return min(1.0, 20.0 / n_steps_each) * sigma_min**2


def make_samplers(d, eps_fns, score_fns, sigmas, n: int) -> dict:
    """(sampler, model, K) -> jitted sample(key) -> [n, 2], for the budgets each sampler has."""
    shape = (n, 2)
    out = {}
    num_levels = sigmas.shape[0]
    for model in ("learned", "oracle"):
        eps_fn, score_fn = eps_fns[model], score_fns[model]
        for k in BUDGETS:
            if k <= d.num_timesteps:
                out["ancestral", model, k] = jax.jit(
                    lambda key, k=k, f=eps_fn: diffusion_lib.p_sample_loop(
                        d, f, shape, key, num_steps=k, clip_denoised=False
                    )
                )
                for eta in (0.0, 1.0):
                    out[f"DDIM η={eta:.0f}", model, k] = jax.jit(
                        lambda key, k=k, f=eps_fn, eta=eta: diffusion_lib.ddim_sample_loop(
                            d, f, shape, key, k, eta=eta, clip_denoised=False
                        )
                    )
            if k % num_levels == 0:
                steps = k // num_levels
                lr = langevin_step_lr(float(sigmas[-1]), steps)

                def langevin(key, steps=steps, lr=lr, f=score_fn):
                    init_key, key = jax.random.split(key)
                    x = jax.random.uniform(init_key, shape, minval=-1.0, maxval=1.0)
                    return score.annealed_langevin(f, x, sigmas, key, steps, lr)

                out["annealed Langevin", model, k] = jax.jit(langevin)
    return out


def digits_comparison(args) -> None:
    """The product's samplers on a trained digits run, judged by the classifier metric."""
    import time

    from configs import workdir as workdir_config
    from diffusion_jax import (
        checkpoints,
        evaluation,
        input_pipeline,
        models,
        reporting,
        sampling,
        sharding,
    )
    from diffusion_jax.evaluation import classifier

    config = evaluation.prepare(workdir_config.get_config(args.digits_workdir))  # the run's own
    config.eval.classifier.split = "train"  # judged against the 1,500 training digits
    mesh = sharding.make_mesh()
    model = models.get_model(config)
    params = evaluation.load_ema_params(args.digits_workdir, mesh)
    step = checkpoints.make_manager(args.digits_workdir, 1).latest_step()
    key = jax.random.fold_in(jax.random.key(args.seed), 0x5A)  # the same keys for every sampler
    n = 16 if args.quick else args.num_samples
    budgets = [int(b) for b in args.budgets.split(",")][: 1 if args.quick else None]
    names = {"ancestral": "ancestral", "ddim": "DDIM η=0", "dpmpp_2m": "DPM-Solver++(2M)"}
    names["heun"] = "Heun (Karras ρ=7)"
    rows, grids = [], {}
    for method in args.samplers.split(","):
        for calls in budgets:
            cfg = config.copy_and_resolve_references()
            cfg.sampling.method, cfg.sampling.num_steps = method, calls
            cfg.sampling.num_samples, cfg.sampling.batch_size = n, min(n, 500)
            cfg.sampling.eta = 0.0
            sampler = sampling.make_sample_fn(cfg, model, mesh, desc=f"{method} {calls}")
            start = time.perf_counter()
            x = sampler(params, key)  # [n, 8, 8, 1] model space
            seconds = time.perf_counter() - start
            levels = input_pipeline.to_uint8_levels(x, config.data.num_bins)
            m = classifier.classifier_metrics(config, levels, args.digits_workdir)
            rows.append(
                {
                    "sampler": names[method],
                    "network calls": calls,
                    "classifier FD": m["fd_classifier"],
                    "FD stderr": m["fd_classifier_stderr"],
                    "classifier IS": m["is_classifier"],
                    "IS stderr": m["is_classifier_stderr"],
                    "seconds (incl. compile)": seconds,
                }
            )
            if calls == 20:
                grids[method] = x[:64]
    real = m
    note = (
        f"{n} samples per row from the EMA parameters of {args.digits_workdir} (step {step}), "
        f"the same keys for every sampler, judged against the {real['classifier_reference']} "
        f"digits by a classifier of test accuracy {real['classifier_test_accuracy']:.4f}. "
        f"Real vs real ({real['classifier_num_real']} held-out test digits): FD "
        f"{real['fd_classifier_real']:.3f}, IS {real['is_classifier_real']:.3f}. Stderr: "
        f"bootstrap over the samples ({config.eval.classifier.num_bootstrap} resamplings)."
    )
    common.write_table(args.outdir, args.tag, rows, note)
    for method, x in grids.items():
        reporting.save_sample_grid(
            os.path.join(args.outdir, f"{args.tag}_{method}_20calls.png"), x, config.data.num_bins
        )
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for method in args.samplers.split(","):
        pts = [(r["network calls"], r["classifier FD"], r["FD stderr"]) for r in rows]
        pts = [p for p, r in zip(pts, rows, strict=True) if r["sampler"] == names[method]]
        if pts:
            c, fd, err = map(np.asarray, zip(*pts, strict=True))
            ax.errorbar(c, fd, yerr=err, marker="o", capsize=2, label=names[method])
    ax.axhline(real["fd_classifier_real"], color="grey", ls=":", label="real vs real")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network calls")
    ax.set_ylabel("classifier Fréchet distance")
    ax.set_title(f"digits, {n} samples per point", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, f"{args.tag}.png"), dpi=110)


def digits_inversion(args) -> None:
    """DDIM inversion (``ode.ddim_invert``) of test digits with K steps, then DDIM η = 0
    regeneration from the x_T found: the reconstruction error against K (``digits_inversion``)."""
    from configs import workdir as workdir_config
    from diffusion_jax import evaluation, input_pipeline, models, objectives, ode, sharding

    config = evaluation.prepare(workdir_config.get_config(args.digits_workdir))  # the run's own
    params = evaluation.load_ema_params(args.digits_workdir, sharding.make_mesh())
    model = models.get_model(config)
    images = input_pipeline.load_split(config, "test").images[: 8 if args.quick else 64]
    x0 = input_pipeline.to_model_space(jnp.asarray(images), config.data.num_bins)  # [N, 8, 8, 1]
    d = objectives.make_diffusion(config)
    rows = []
    for k in [int(b) for b in args.budgets.split(",")][: 1 if args.quick else None]:

        @jax.jit
        def round_trip(params, x0, k=k):
            net = models.model_fn(model, params)
            x_T = ode.ddim_invert(d, net, x0, k)
            x = diffusion_lib.ddim_sample_loop(
                d, net, x0.shape, jax.random.key(0), k, x_T=x_T, clip_denoised=False
            )
            return x_T, x

        x_T, x = map(np.asarray, round_trip(params, x0))
        err = np.abs(x - np.asarray(x0))  # [N, 8, 8, 1], data space [-1, 1]
        levels = input_pipeline.to_uint8_levels(x, config.data.num_bins)
        rows.append(
            {
                "steps K": k,
                "network calls": 2 * k,
                "max abs error": float(err.max()),
                "RMSE": float(np.sqrt(np.mean(err**2))),
                "pixels off by a level": float(np.mean(levels != images)),
                "x_T std": float(x_T.std()),
            }
        )
    note = (
        f"{len(images)} test digits from {args.digits_workdir}: x_T = ddim_invert(x0, K), then "
        "ddim_sample_loop(K, η = 0, x_T) back (2K network calls). Errors in data space [-1, 1] "
        f"(one grey level = {2 / (config.data.num_bins - 1):.3f})."
    )
    common.write_table(args.outdir, "digits_inversion", rows, note)


def main(argv=None) -> None:
    args = common.parse_args(
        os.path.join(RESULTS, "sampler_comparison"), __doc__, steps=6000, argv=argv, extra=add_args
    )
    if args.digits_workdir and args.inversion:
        return digits_inversion(args)
    if args.digits_workdir:
        return digits_comparison(args)
    dist = common.toy_dist()
    key = jax.random.key(args.seed)
    n = 200 if args.quick else args.num_samples
    runs = common.train_both(args)
    config, model, params, _ = runs["ddpm"]
    d = objectives.make_diffusion(config)
    ncfg, nmodel, nparams, _ = runs["ncsn"]
    sigmas = common.ncsn_sigmas(ncfg)
    eps_fns = {"learned": common.ddpm_eps(model, params), "oracle": common.exact_eps(dist, d)}
    score_fns = {
        "learned": common.ncsn_score(ncfg, nmodel, nparams),
        "oracle": common.exact_ncsn_score(dist, sigmas),
    }
    samplers = make_samplers(d, eps_fns, score_fns, sigmas, n)
    if args.quick:
        samplers = {k: v for k, v in samplers.items() if k[2] == BUDGETS[0]}

    sw_key = jax.random.fold_in(key, 7)
    sw = jax.jit(lambda x, y: metrics.sliced_wasserstein(x, y, sw_key))
    mmd = jax.jit(metrics.mmd2)
    reference = dist.sample(jax.random.fold_in(key, 1), n)

    floors = []  # fresh data sets scored exactly like the samplers' outputs
    for j in range(5):
        fresh = dist.sample(jax.random.fold_in(key, 100 + j), n)
        floors.append((float(sw(fresh, reference)), float(mmd(fresh, reference))))
    floors = np.asarray(floors)
    floor = {
        "SW mean": floors[:, 0].mean(),
        "SW std": floors[:, 0].std(ddof=1),
        "MMD² mean": floors[:, 1].mean(),
        "MMD² std": floors[:, 1].std(ddof=1),
    }

    rows, samples = [], {}
    sample_key = jax.random.fold_in(key, 2)  # the same x_T / initial points for every sampler
    for (name, which, k), fn in samplers.items():
        print(f"{name} ({which}), {k} calls", flush=True)
        x = fn(sample_key)
        ok = bool(jnp.all(jnp.isfinite(x)))
        x = jnp.where(jnp.isfinite(x), x, 1e3)  # a diverged chain scores as far away
        samples[name, which, k] = np.asarray(x)
        rows.append(
            {
                "sampler": name,
                "model": which,
                "network calls": k,
                "sliced W2": float(sw(x, reference)),
                "MMD²": float(mmd(x, reference)),
                f"‖x‖ > {FAR:g}": float(jnp.mean(jnp.linalg.norm(x, axis=-1) > FAR)),
                "finite": ok,
            }
        )
    note = (
        f"{n} samples vs the same {n} fresh data points. Floor (5 other fresh data sets vs those "
        f"points): sliced W2 "
        f"{floor['SW mean']:.4f} ± {floor['SW std']:.4f}, MMD² {floor['MMD² mean']:.2e} ± "
        f"{floor['MMD² std']:.2e}."
    )
    common.write_table(args.outdir, "sampler_comparison", rows, note)
    common.write_table(args.outdir, "floor", [floor])
    plot(args.outdir, rows, floor, samples, reference)


def plot(outdir, rows, floor, samples, reference) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, fkey in zip(axes, ("sliced W2", "MMD²"), ("SW", "MMD²"), strict=True):
        for c, name in enumerate(SAMPLERS):
            for which, style in (("learned", "-o"), ("oracle", "--x")):
                pts = [
                    (r["network calls"], r[metric])
                    for r in rows
                    if r["sampler"] == name and r["model"] == which
                ]
                if pts:
                    k, v = zip(*pts, strict=True)
                    label = f"{name} ({which})"
                    ax.plot(k, v, style, color=f"C{c}", label=label, ms=4, alpha=0.9)
        m, s = floor[f"{fkey} mean"], floor[f"{fkey} std"]
        ax.axhspan(m - s, m + s, color="0.8", label="data vs data (±1 std)")
        ax.axhline(m, color="0.5", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log" if metric == "sliced W2" else "symlog", **sym(metric, floor))
        ax.set_xlabel("network calls per sample")
        ax.set_title(f"{metric} to fresh data (lower is better)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    common.save_figure(fig, os.path.join(outdir, "sampler_distances.png"))

    budgets = sorted({k for (_, w, k) in samples if w == "learned"})
    fig, axes = plt.subplots(
        len(SAMPLERS), len(budgets) + 1, figsize=(1.9 * (len(budgets) + 1), 1.9 * len(SAMPLERS))
    )
    axes = np.asarray(axes).reshape(len(SAMPLERS), len(budgets) + 1)
    for r, name in enumerate(SAMPLERS):
        for c, k in enumerate(budgets):
            ax = axes[r, c]
            x = samples.get((name, "learned", k))
            if x is not None:
                ax.scatter(x[:, 0], x[:, 1], s=0.5, alpha=0.5, rasterized=True)
            ax.set_title(f"{name}, {k}" if x is not None else "", fontsize=7)
        ax = axes[r, -1]
        ref = np.asarray(reference)
        ax.scatter(ref[:, 0], ref[:, 1], s=0.5, alpha=0.5, color="k")
        ax.set_title("data", fontsize=7)
    for ax in axes.ravel():
        ax.set_xlim(-5, 5)
        ax.set_ylim(-5, 5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    common.save_figure(fig, os.path.join(outdir, "sampler_samples.png"))


def sym(metric: str, floor: dict) -> dict:
    """symlog needs a linear range around 0 for MMD², which can be slightly negative."""
    if metric == "sliced W2":
        return {}
    return {"linthresh": max(abs(floor["MMD² std"]), 1e-6)}


if __name__ == "__main__":
    main()
