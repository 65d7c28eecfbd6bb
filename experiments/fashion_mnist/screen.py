"""Screens of recipes at one budget of image-passes, judged on both sides.

    python experiments/fashion_mnist/screen.py --screens ema hybrid1 vdm cosine \
        --passes 38400 --root runs/fm_screens
    python experiments/fashion_mnist/screen.py --config configs/digits.py --reference train \
        --screens ema hybrid1 --passes 184320 --bound_examples 0 --root runs/digits_screens \
        --judge_dir runs/digits_judge --outdir experiments/digits/results/first_run_screens

Each screen is ``--config`` (configs/fashion_mnist.py or configs/digits.py) with the overrides of
SCREENS[config][name]. It trains for ``--passes`` / (batch x passes per example) steps (a recipe
that sends each image through the network twice gets half the steps), with the learning-rate
warm-up a tenth of the run; then

- the bound on the first ``--bound_examples`` test images (0: all), L_0 and L_T exact and sum
  L_t from K = 20 stratified t per image (``--mode eval``), with its L_0 / sum L_t / L_T split;
- ``--num_samples`` samples of DPM-Solver++(2M) SDE at 20 calls, judged against split
  ``--reference`` by one classifier for every screen of a config
  (``experiments/recipes/recipe_compare.py``): FD, KID, IS, precision, recall with standard
  errors.

A screen whose workdir already holds its last checkpoint, or its bound, is not redone. Writes
``screens.json`` (every number), ``screens.md`` (the table) and ``bound_vs_fd.png`` to
``--outdir``; the training wall time is the machine's as it was (say whether it was shared).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [os.path.join(ROOT, "experiments", "recipes"), os.path.join(ROOT, "experiments")]

import recipe_compare  # noqa: E402

# name: (what it is, passes per example, overrides of configs/fashion_mnist.py)
ONE_PASS_HYBRID = {  # Improved DDPM's L_hybrid: both terms at one uniform t, lambda 0.001
    "diffusion.t_sampler": "uniform",
    "diffusion.hybrid_lambda": 0.001,
    "diffusion.hybrid_train_mean": False,
}
VDM = {  # continuous time, learned gamma from gamma_min = -13.3 (sigma/alpha 0.0013 at t = 0)
    "training.objective": "vdm",
    "diffusion.var_type": "fixedlarge",
    "diffusion.loss_type": "simple",
    "diffusion.t_sampler": "uniform",
    "diffusion.hybrid_lambda": 0.001,
    "diffusion.hybrid_train_mean": False,
    "vdm.gamma": "learned",
    "vdm.gamma_min": -13.3,
    "vdm.gamma_max": 5.0,
}
EMA = {"optim.ema_warmup_power": 0.75}
FASHION_SCREENS = {
    "base": ("today's recipe: hybrid at two t's, EMA 0.999", 2, {}),
    "ema": ("hybrid at two t's, EMA warm-up 3/4", 2, EMA),
    "hybrid1": ("hybrid at one t (lambda 0.001), EMA warm-up", 1, {**EMA, **ONE_PASS_HYBRID}),
    "simple": (
        "L_simple, fixedlarge, EMA warm-up",
        1,
        {
            **EMA,
            **ONE_PASS_HYBRID,
            "diffusion.loss_type": "simple",
            "diffusion.var_type": "fixedlarge",
        },
    ),
    "cosine": (
        "hybrid at one t, cosine schedule, EMA warm-up",
        1,
        {**EMA, **ONE_PASS_HYBRID, "diffusion.beta_schedule": "cosine"},
    ),
    "vdm": ("VDM, learned gamma, EMA warm-up", 1, {**EMA, **VDM}),
    "vdm_sigmoid": (
        "VDM, sigmoid(2 - lambda) weighting (fixed endpoints), EMA warm-up",
        1,
        {
            **EMA,
            **VDM,
            "vdm.weighting": "sigmoid",
            "vdm.sigmoid_bias": 2.0,
            "vdm.learn_endpoints": False,
        },
    ),
    "lr2e-3": (
        "hybrid at one t, EMA warm-up, learning rate 2e-3",
        1,
        {**EMA, **ONE_PASS_HYBRID, "optim.learning_rate": 2e-3},
    ),
    "beta1e-5": (
        "hybrid at one t, EMA warm-up, linear betas from 1e-5",
        1,
        {**EMA, **ONE_PASS_HYBRID, "diffusion.beta_start": 1e-5},
    ),
    "wide": (
        "hybrid at one t, EMA warm-up, 48 channels (3.6M parameters)",
        1,
        {**EMA, **ONE_PASS_HYBRID, "model.ch": 48},
    ),
}
# configs/digits.py's recipe (L_simple at a uniform t + 0.1 L_vlb at a loss-aware t, two passes)
# in a first run's budget (issue 40): what makes its bound in fewer image-passes.
DIGITS_ONE_PASS = {  # both terms at one uniform t, the mean trained by both
    "diffusion.t_sampler": "uniform",
}
LEAN = {**EMA, "optim.learning_rate": 3e-3, "model.attn_resolutions": (), "model.dropout": 0.0}
LEAN_WHAT = "EMA warm-up, learning rate 3e-3, no attention at 4x4, no dropout"
DIGITS_SCREENS = {
    "base": ("today's recipe: hybrid at two t's, EMA 0.999", 2, {}),
    "ema": ("hybrid at two t's, EMA warm-up 3/4", 2, EMA),
    "hybrid1": (
        "hybrid (lambda 0.1, mean trained by both) at one uniform t, EMA warm-up",
        1,
        {**EMA, **DIGITS_ONE_PASS},
    ),
    "lr2e-3": (
        "hybrid at two t's, EMA warm-up, learning rate 2e-3",
        2,
        {**EMA, "optim.learning_rate": 2e-3},
    ),
    "lr3e-3": (
        "hybrid at two t's, EMA warm-up, learning rate 3e-3",
        2,
        {**EMA, "optim.learning_rate": 3e-3},
    ),
    "lr5e-3": (
        "hybrid at two t's, EMA warm-up, learning rate 5e-3",
        2,
        {**EMA, "optim.learning_rate": 5e-3},
    ),
    "lr3e-3_vb0.3": (
        "hybrid (lambda 0.3) at two t's, EMA warm-up, learning rate 3e-3",
        2,
        {**EMA, "optim.learning_rate": 3e-3, "diffusion.hybrid_lambda": 0.3},
    ),
    "lean": ("hybrid at two t's, " + LEAN_WHAT, 2, LEAN),
    "lean_bf16": (
        "lean, bfloat16 activations (float32 parameters and loss)",
        2,
        {**LEAN, "model.dtype": "bfloat16"},
    ),
    "cosine": (
        "hybrid at two t's, EMA warm-up, cosine schedule",
        2,
        {**EMA, "diffusion.beta_schedule": "cosine"},
    ),
    "decay": (
        "hybrid at two t's, EMA warm-up, learning rate cosine-decayed to 0",
        2,
        {**EMA, "optim.lr_decay": "cosine"},
    ),
}
SCREENS = {"fashion_mnist": FASHION_SCREENS, "digits": DIGITS_SCREENS}


def _screens(config: str) -> dict:
    name = os.path.splitext(os.path.basename(config))[0]
    if name not in SCREENS:
        raise SystemExit(f"--config {config}: screens are defined for {sorted(SCREENS)}")
    return SCREENS[name]


def _arg(key: str, value) -> str:
    if isinstance(value, tuple):
        value = "(" + "".join(f"{v!r}," for v in value) + ")"
    return f"--config.{key}={value}"


def _main(config: str, workdir: str, overrides: dict, *extra: str) -> float:
    """Run ``python -m diffusion_jax.main`` on ``config``; its wall seconds."""
    cmd = [sys.executable, "-m", "diffusion_jax.main", f"--config={config}"]
    cmd += [f"--workdir={workdir}", *(_arg(k, v) for k, v in overrides.items()), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_screen(name: str, args) -> dict:
    what, passes, overrides = _screens(args.config)[name]
    batch = 64
    steps = args.passes // (batch * passes)
    workdir = os.path.join(args.root, name)
    overrides = {
        **overrides,
        "training.num_train_steps": steps,
        "training.checkpoint_every": steps,
        "training.sample_every": 0,
        "training.eval_at_end": False,
        "optim.warmup_steps": max(steps // 10, 1),
    }
    info_path = os.path.join(workdir, "screen.json")
    info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    if "train_seconds" not in info:
        info = dict(name=name, what=what, steps=steps, passes=steps * batch * passes)
        info["overrides"] = overrides
        info["train_seconds"] = _main(args.config, workdir, overrides)
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
    metrics_path = os.path.join(workdir, "eval", "metrics.json")
    if "bound_seconds" not in info:
        bound = {
            "eval.num_examples": args.bound_examples,
            "eval.bound_num_t": 20,
            "eval.metrics": ("bpd",),
            "eval.figures": (),
        }
        info["bound_seconds"] = _main(args.config, workdir, {**overrides, **bound}, "--mode=eval")
        with open(info_path, "w") as f:
            json.dump(info, f, indent=1)
    with open(metrics_path) as f:
        m = json.load(f)
    terms = m["bpd_terms"]  # continuous time names them decoder_L0, diffusion, prior_L1
    info.update(bpd=m["bpd"], bpd_stderr=m["bpd_stderr"], decoder_L0=terms["decoder_L0"])
    info["sum_Lt"] = terms.get("sum_Lt", terms.get("diffusion"))
    info["prior_LT"] = terms.get("prior_LT", terms.get("prior_L1"))
    if "bpd_finite" in m:  # continuous time: its T = 1000 discretisation too
        info["bpd_T1000"] = m["bpd_finite"]["bpd"]
    return info


def table(rows: list[dict], reference: str = "test") -> str:
    head = (
        "| screen | what | steps | image-passes | train s | bound (bits/dim) | L_0 | ΣL_t | L_T "
        "| FD | KID ×1e3 | IS | precision | recall |\n|" + "---|" * 14 + "\n"
    )
    lines = []
    for r in rows:
        q = r["quality"]
        cell = recipe_compare._cell
        kid = {k: 1e3 * q[k] for k in ("kid", "kid_stderr")}
        lines.append(
            f"| {r['name']} | {r['what']} | {r['steps']} | {r['passes']:,} | "
            f"{r['train_seconds']:.0f} | {cell(r, 'bpd', 4)} | {r['decoder_L0']:.4f} | "
            f"{r['sum_Lt']:.4f} | {r['prior_LT']:.2g} | {cell(q, 'fd', 2)} | "
            f"{cell(kid, 'kid', 2)} | {cell(q, 'is', 3)} | {cell(q, 'precision', 3)} | "
            f"{cell(q, 'recall', 3)} |"
        )
    q = rows[0]["quality"]
    real = (
        f"| real vs real | {q['num_real']} real images against {reference} | | | | | | | | "
        f"{q['fd_real']:.3f} | "
        f"{1e3 * q['kid_real']:.2f} | {q['is_real']:.3f} | {q['precision_real']:.3f} | "
        f"{q['recall_real']:.3f} |"
    )
    return head + "\n".join(lines + [real]) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist.py")
    parser.add_argument("--screens", nargs="+", required=True)
    parser.add_argument("--reference", default="test", help="the split the judge compares with")
    parser.add_argument("--passes", type=int, default=38_400, help="image-passes per screen")
    parser.add_argument("--bound_examples", type=int, default=2000)
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "fm_screens"))
    parser.add_argument("--judge_dir", default=os.path.join(ROOT, "runs", "fm_judge"))
    parser.add_argument("--outdir", default=os.path.join(HERE, "results", "screens"))
    args = parser.parse_args(argv)
    unknown = set(args.screens) - set(_screens(args.config))
    if unknown:
        parser.error(
            f"no screen {sorted(unknown)} for {args.config}: {sorted(_screens(args.config))}"
        )
    os.makedirs(args.outdir, exist_ok=True)
    json_path = os.path.join(args.outdir, "screens.json")
    rows = {r["name"]: r for r in json.load(open(json_path))} if os.path.exists(json_path) else {}
    sampler = recipe_compare.parse_sampler("dpmpp_2m_sde:20")
    for name in args.screens:
        row = run_screen(name, args)
        workdir = os.path.join(args.root, name)
        images, seconds, _, config = recipe_compare.draw(workdir, sampler, args.num_samples, 250)
        judge_dir = os.path.join(args.judge_dir, args.reference)
        row["quality"] = recipe_compare.judge(config, images, args.reference, judge_dir)
        row["sample_seconds"] = seconds
        rows[name] = row
        with open(json_path, "w") as f:
            json.dump(list(rows.values()), f, indent=1)
        text = table(list(rows.values()), args.reference)
        with open(os.path.join(args.outdir, "screens.md"), "w") as f:
            f.write(text)
        print(text, flush=True)
    plot_rows = [
        dict(r, run=r["name"], sampler="dpmpp_2m_sde:20", quality={args.reference: r["quality"]})
        for r in rows.values()
    ]
    path = os.path.join(args.outdir, "bound_vs_fd.png")
    recipe_compare.plot(plot_rows, args.reference, "bound", path)
    return list(rows.values())


if __name__ == "__main__":
    main()
