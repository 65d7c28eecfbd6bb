"""Shared pieces of the experiment scripts: arguments, the toy runs, exact targets, tables, plots.

The scripts are run as ``python experiments/STUDY/NAME.py``; each puts ``experiments/`` on
``sys.path`` first, so this file is importable as ``common``;
importing it puts the repository root on ``sys.path`` (``diffusion_jax`` and ``configs``).

Both learned models of the DDPM ↔ NCSN experiments come from ``configs/ncsn_toy.py`` (8 Gaussians
on a ring, the same residual MLP, batch, optimiser and number of steps) and are trained through
the library's own system (``train.train_and_evaluate``), the NCSN with ``training.objective =
"ncsn"`` and the DDPM with ``"ddpm"`` (T = 200 linear betas 1e-4 … 0.1, ε-prediction).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402

matplotlib.use("Agg")

from configs import ncsn_toy  # noqa: E402
from diffusion_jax import diffusion as diffusion_lib  # noqa: E402
from diffusion_jax import models, objectives, score, train  # noqa: E402
from diffusion_jax.data import toy_distributions  # noqa: E402

DATASET = "gmm8"


def parse_args(outdir: str, doc: str, steps: int, argv=None, extra=None) -> argparse.Namespace:
    """Flags --outdir (default ``outdir``, in the study's results/), --steps, --quick, --seed."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--outdir", default=outdir)
    parser.add_argument("--steps", type=int, default=steps, help="training steps per model")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke test: tiny models and sample sizes"
    )
    parser.add_argument("--seed", type=int, default=0)
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    return args


# ------------------------------------------------------------------------------ the toy runs


def toy_config(objective: str, steps: int, seed: int = 0, quick: bool = False):
    """``configs/ncsn_toy.py`` with ``training.objective`` = objective and ``steps`` steps."""
    config = ncsn_toy.get_config()
    config.seed = seed
    config.training.objective = objective
    config.sampling.method = objectives.OBJECTIVES[objective].default_sampler
    config.training.num_train_steps = steps
    config.training.log_every = max(1, min(500, steps))
    config.training.checkpoint_every = steps
    config.training.eval_at_end = False  # the experiments sample for themselves
    if quick:
        config.model.hidden_dim = 16
        config.model.num_layers = 1
        config.training.batch_size = 32
        config.optim.warmup_steps = 1
    return config


def train_toy(objective: str, steps: int, workdir: str | None, seed: int = 0, quick: bool = False):
    """Train (or, when ``workdir`` already holds the finished run, load) one toy model.

    Returns (config, model, EMA params, wall seconds spent training here). With ``workdir=None``
    the run goes to a temporary folder, deleted once the parameters are in memory.
    """
    config = toy_config(objective, steps, seed, quick)
    start = time.perf_counter()
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix=f"dj_{objective}_") as tmp:
            state = train.train_and_evaluate(config, tmp)
    else:
        state = train.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    return config, models.get_model(config), state.ema_params, seconds


def train_both(args) -> dict:
    """The DDPM and the NCSN toy runs of the scripts, by objective ("ddpm", "ncsn"), each kept in
    ``args.workdir/<objective>`` when a workdir is given (so a second script reuses them)."""
    runs = {}
    for objective in ("ddpm", "ncsn"):
        workdir = None if args.workdir is None else os.path.join(args.workdir, objective)
        runs[objective] = train_toy(objective, args.steps, workdir, args.seed, args.quick)
    return runs


def ncsn_sigmas(config) -> jax.Array:
    return objectives.make_sigmas(config)


def ncsn_score(config, model, params):
    """s(x, i) = net(x, i) / σ_i, the trained NCSN's score at level i (int32 [B])."""
    return score.ncsn_score_fn(models.model_fn(model, params), ncsn_sigmas(config))


def ddpm_eps(model, params):
    """ε̂(x_t, t) of the trained DDPM."""
    return models.model_fn(model, params)


# ------------------------------------------------------------------------------ exact targets


def exact_noised_score(dist, scale: jax.Array, sigma: jax.Array, x: jax.Array) -> jax.Array:
    """∇ log of the law of scale·x0 + sigma·z at x, per example: scale, sigma [B]; x [B, D]."""
    one = lambda xi, a, s: dist.noised(a, s).score(xi[None])[0]
    return jax.vmap(one)(x, scale, sigma)


def exact_ncsn_score(dist, sigmas: jax.Array):
    """The oracle NCSN: s(x, i) = ∇ log q_σi(x), q_σ = p ⊛ N(0, σ² I)."""

    def score_fn(x, level):
        level = jnp.broadcast_to(level, x.shape[:1])
        return exact_noised_score(dist, jnp.ones_like(sigmas[level]), sigmas[level], x)

    return score_fn


def exact_eps(dist, d: diffusion_lib.GaussianDiffusion):
    """The oracle ε-model E[ε | x_t] = −√(1 − ᾱ_t) ∇ log q(x_t), q(x_t) = p scaled by √ᾱ_t and
    noised by √(1 − ᾱ_t)."""

    def eps_fn(x, t):
        a = d.sqrt_alphas_cumprod[t]
        s = d.sqrt_one_minus_alphas_cumprod[t]
        return -s[:, None] * exact_noised_score(dist, a, s, x)

    return eps_fn


def toy_dist():
    return toy_distributions.get(DATASET)


# ------------------------------------------------------------------------------ output


def _objective(workdir: str) -> str | None:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("training", {}).get("objective")


def read_runs(parser: argparse.ArgumentParser, specs: list[str]) -> dict[str, tuple[str, dict]]:
    """``label=WORKDIR`` arguments -> {label: (workdir, its eval/metrics.json)}; a bad argument
    or a missing file is a parser error naming it."""
    runs = {}
    for spec in specs:
        label, sep, workdir = spec.partition("=")
        if not sep or not label:
            parser.error(f"--runs takes label=WORKDIR, got {spec!r}")
        path = os.path.join(workdir, "eval", "metrics.json")
        if _objective(workdir) == "distill":  # students: eval/student_<N>/, and no bound
            runs[label] = (workdir, {})
            continue
        if not os.path.exists(path):
            parser.error(f"{path} does not exist: run --mode eval on {workdir} first")
        with open(path) as f:
            runs[label] = (workdir, json.load(f))
    return runs


def fmt(v) -> str:
    if isinstance(v, float | np.floating):
        return f"{v:.4g}"
    return str(v)


def write_table(outdir: str, name: str, rows: list[dict], note: str = "") -> str:
    """``rows`` (same keys) -> NAME.md (a markdown table) and NAME.json; returns the markdown."""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    if note:
        md = note.strip() + "\n\n" + md
    with open(os.path.join(outdir, name + ".md"), "w") as f:
        f.write(md)
    with open(os.path.join(outdir, name + ".json"), "w") as f:
        json.dump(to_builtin(rows), f, indent=1)
    print(md)
    return md


def to_builtin(obj):
    """NumPy/JAX scalars and arrays -> JSON-able Python values."""
    if isinstance(obj, dict):
        return {k: to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray | jax.Array):
        return np.asarray(obj).tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def density_grid(dist, lim: float = 4.5, n: int = 120):
    """(X, Y, log p) on an n × n grid over [-lim, lim]² for background contours."""
    ticks = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(ticks, ticks)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
    return xx, yy, np.asarray(dist.log_prob(pts)).reshape(n, n)


def quiver_field(ax, xy: np.ndarray, field: np.ndarray, **kw) -> None:
    """Arrows of s with the length compressed to log(1 + ‖s‖) (then divided by ``scale``), so
    that both the small scores far from the data and the large ones near it stay visible."""
    norm = np.linalg.norm(field, axis=-1, keepdims=True)
    v = field * np.log1p(norm) / np.maximum(norm, 1e-12)
    ax.quiver(xy[:, 0], xy[:, 1], v[:, 0], v[:, 1], angles="xy", scale_units="xy", **kw)


def save_figure(fig, path: str, dpi: int = 64) -> None:
    """Save as a PNG with a 256-colour palette (plots lose nothing visible; a third the bytes)."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    quantize_png(path)
    print(f"wrote {path} ({os.path.getsize(path) // 1024} KB)")


def quantize_png(path: str) -> None:
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256)
    small.save(path, optimize=True)
