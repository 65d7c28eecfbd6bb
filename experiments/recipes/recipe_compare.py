"""Trained runs side by side by their bound and by the quality of their samples, per sampler.

    python experiments/recipes/recipe_compare.py --runs prev=runs/a today=runs/b \
        --samplers ancestral:0 dpmpp_2m_sde:20 --num_samples 500 --outdir DIR
    python experiments/recipes/recipe_compare.py --runs new=runs/digits --plot calls \
        --samplers ancestral:10 ancestral:20 dpmpp_2m:10 dpmpp_2m:10:lower_order_final=true ...

For each run (a workdir with ``eval/metrics.json`` holding ``bpd``: the test bound, e.g. from
its training's ``eval_at_end``; or a distilled run, whose students have no bound) and each
sampler ``METHOD:CALLS[:KEY=VALUE,...]`` (CALLS = ``sampling.num_steps``, 0 = all T; KEY=VALUE
more ``sampling.*`` keys), draws ``--num_samples`` samples from the newest checkpoint's EMA
parameters (a distilled run: its student of CALLS steps; a sampler that does not fit a run is
skipped with a line), key fold_in(run sample key, 0xC0DE), cached in ``WORKDIR/eval/compare/``,
and judges them with one classifier for every run (``evaluation.classifier``, cached in
``--judge_dir``) against each split of ``--references``: FD, KID, IS, precision and recall,
each with its standard error and its real-vs-real value, and the least share of a class.

Writes ``recipe_compare.json`` (every number) and ``recipe_compare.md`` (the table) to
``--outdir``, and ``bound_vs_quality.png`` (``--plot bound``: the bound against FD and KID, one
marker per sampler) or ``quality_vs_calls.png`` (``--plot calls``: FD and KID against network
calls, one line per sampler).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # common

_TAG = 0xC0DE  # fold_in(run sample key, .): the compared samples
METRICS = ("fd", "kid", "is", "precision", "recall")


def parse_sampler(spec: str) -> dict:
    """``METHOD:CALLS[:KEY=VALUE,...]`` -> dict(method, num_steps, extra={key: value})."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit():
        raise ValueError(f"a sampler is METHOD:CALLS[:KEY=VALUE,...], got {spec!r}")
    extra = {}
    for item in filter(None, (parts[2].split(",") if len(parts) == 3 else [])):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} in {spec!r} is not KEY=VALUE")
        extra[key] = json.loads(value)
    return dict(method=parts[0], num_steps=int(parts[1]), extra=extra, name=spec)


def draw(workdir: str, sampler: dict, num: int, batch_size: int) -> tuple:
    """(uint8 levels [num, H, W, C], seconds, checkpoint step, the run's checked config) of one
    run and sampler (the newest checkpoint, as ``load_params`` reads it)."""
    import jax
    import numpy as np

    from configs import workdir as workdir_config
    from diffusion_jax import (
        checkpoints,
        evaluation,
        input_pipeline,
        models,
        objectives,
        sampling,
        sharding,
    )

    run_config = evaluation.prepare(workdir_config.get_config(workdir))
    config = run_config.copy_and_resolve_references()
    folder = checkpoints.checkpoint_dir(workdir)
    step = max((int(n) for n in os.listdir(folder) if n.isdigit()), default=None)
    if step is None:
        raise ValueError(f"{folder} holds no checkpoint")
    name = sampler["name"].replace(":", "_").replace(",", "_").replace("=", "-")
    path = os.path.join(workdir, "eval", "compare", f"{name}_n{num}_step{step}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            return f["images"], float(f["seconds"]), step, run_config
    with config.unlocked():
        s = config.sampling
        s.method, s.num_steps = sampler["method"], sampler["num_steps"]
        s.num_samples, s.batch_size = num, min(batch_size, num)
        for key, value in sampler["extra"].items():
            if key not in s:
                raise ValueError(f"sampling.{key} is not a key of the config's sampling section")
            s[key] = value
    sampling.check_config(config)
    model = models.get_model(config)
    mesh = sharding.make_mesh()
    params, _ = evaluation.load_run_params(config, workdir, mesh)  # a student: its of N steps
    sample_fn = sampling.make_sample_fn(config, model, mesh, desc=sampler["name"])
    key = jax.random.fold_in(objectives.run_keys(config.seed)["sample"], _TAG)
    start = time.perf_counter()
    x = sample_fn(params, key)
    seconds = time.perf_counter() - start
    images = input_pipeline.to_uint8_levels(x, config.data.num_bins)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, images=images, seconds=seconds)
    return images, seconds, step, run_config


def judge(config, images, reference: str, judge_dir: str) -> dict:
    """The classifier metrics of ``images`` against split ``reference`` (one judge per data set
    and seed, cached in ``judge_dir``), under short names: fd, fd_stderr, fd_real, ..."""
    from diffusion_jax.evaluation import classifier

    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.eval.classifier.split = reference
    m = classifier.classifier_metrics(config, images, judge_dir)
    out = {}
    for short in METRICS:
        long = f"{short}_classifier"
        for suffix in ("", "_stderr", "_real"):
            out[short + suffix] = m[long + suffix]
    out["num_real"] = m["classifier_num_real"]
    out["class_share_min"] = min(m["classifier_class_shares"])
    out["classifier_test_accuracy"] = m["classifier_test_accuracy"]
    return out


def _num_timesteps(workdir: str) -> int:
    with open(os.path.join(workdir, "config.json")) as f:
        return json.load(f)["diffusion"]["num_timesteps"]


def _cell(row: dict, key: str, digits: int) -> str:
    return f"{row[key]:.{digits}f} ± {row[key + '_stderr']:.{digits}f}"


def table(rows: list[dict], reference: str) -> str:
    head = (
        f"| run | bound (bits/dim) | sampler | FD ({reference}) | KID ×1e3 | IS | precision | "
        "recall | least class | s / sample set |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        q = r["quality"][reference]
        kid = {k: 1e3 * q[k] for k in ("kid", "kid_stderr")}
        bound = "–" if r["bpd"] is None else _cell(r, "bpd", 4)  # a distilled student has none
        least = f"{q['class_share_min']:.3f}" if "class_share_min" in q else "–"
        lines.append(
            f"| {r['run']} | {bound} | {r['sampler']} | {_cell(q, 'fd', 2)} | "
            f"{_cell(kid, 'kid', 2)} | {_cell(q, 'is', 3)} | {_cell(q, 'precision', 3)} | "
            f"{_cell(q, 'recall', 3)} | {least} | {r['seconds']:.1f} |"
        )
    q = rows[0]["quality"][reference]
    real = (
        f"| real vs real ({q['num_real']} held-out images) | – | – | {q['fd_real']:.2f} | "
        f"{1e3 * q['kid_real']:.2f} | {q['is_real']:.3f} | {q['precision_real']:.3f} | "
        f"{q['recall_real']:.3f} | – | – |"
    )
    return head + "\n".join(lines + [real]) + "\n"


def plot(rows: list[dict], reference: str, kind: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, ("fd", "kid"), strict=True):
        scale = 1e3 if metric == "kid" else 1.0
        if kind == "bound":
            for sampler in dict.fromkeys(r["sampler"] for r in rows):
                pts = [r for r in rows if r["sampler"] == sampler]
                xs = [r["bpd"] for r in pts]
                ys = [scale * r["quality"][reference][metric] for r in pts]
                es = [scale * r["quality"][reference][metric + "_stderr"] for r in pts]
                ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=sampler)
                for r, x, y in zip(pts, xs, ys, strict=True):
                    ax.annotate(
                        r["run"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points"
                    )
            ax.set_xlabel("test bound (bits/dim)")
        else:
            runs = len({r["run"] for r in rows})
            for run, method in dict.fromkeys((r["run"], r["label"]) for r in rows):
                pts = [r for r in rows if (r["run"], r["label"]) == (run, method)]
                pts = sorted(pts, key=lambda r: r["calls"])
                ax.errorbar(
                    [r["calls"] for r in pts],
                    [scale * r["quality"][reference][metric] for r in pts],
                    yerr=[scale * r["quality"][reference][metric + "_stderr"] for r in pts],
                    marker="o",
                    capsize=3,
                    label=f"{method}, {run}" if runs > 1 else method,
                )
            ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=10.0)  # a few calls can be 100x off
            ax.set_xlabel("network calls")
        real = scale * rows[0]["quality"][reference][metric + "_real"]
        ax.axhline(real, color="gray", ls="--", lw=1, label="real vs real")
        ax.set_ylabel(f"classifier {'KID ×1e3' if metric == 'kid' else 'FD'} vs {reference}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="label=WORKDIR ...")
    parser.add_argument("--samplers", nargs="+", default=["ancestral:0", "dpmpp_2m_sde:20"])
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--references", default="train,test", help="splits judged against")
    parser.add_argument("--judge_dir", default=os.path.join(ROOT, "runs", "judge"))
    parser.add_argument("--plot", choices=("bound", "calls"), default="bound")
    parser.add_argument("--outdir", default=os.path.join(ROOT, "experiments/recipes/results"))
    args = parser.parse_args(argv)
    samplers = [parse_sampler(s) for s in args.samplers]
    references = args.references.split(",")

    rows = []
    import common

    for label, (workdir, metrics) in common.read_runs(parser, args.runs).items():
        for sampler in samplers:
            try:
                images, seconds, step, config = draw(
                    workdir, sampler, args.num_samples, args.batch_size
                )
            except (ValueError, FileNotFoundError) as e:  # e.g. dpmpp on a distilled student
                print(f"{label} {sampler['name']}: skipped ({' '.join(str(e).split())})")
                continue
            # One cache folder per reference: the judge's fingerprint names its test split.
            quality = {
                ref: judge(config, images, ref, os.path.join(args.judge_dir, ref))
                for ref in references
            }
            extra = ",".join(f"{k}={v}" for k, v in sampler["extra"].items())
            rows.append(
                dict(
                    run=label,
                    workdir=workdir,
                    step=step,
                    bpd=metrics.get("bpd"),
                    bpd_stderr=metrics.get("bpd_stderr"),
                    sampler=sampler["name"],
                    label=sampler["method"] + (f" ({extra})" if extra else ""),
                    calls=sampler["num_steps"] or _num_timesteps(workdir),
                    num_samples=len(images),
                    seconds=seconds,
                    quality=quality,
                )
            )
            print(table(rows[-1:], references[0]).splitlines()[2], flush=True)
    os.makedirs(args.outdir, exist_ok=True)
    text = "".join(f"Against the {ref} split:\n\n{table(rows, ref)}\n" for ref in references)
    print(text, end="")
    with open(os.path.join(args.outdir, "recipe_compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.outdir, "recipe_compare.json"), "w") as f:
        json.dump(rows, f, indent=1)
    name = "bound_vs_quality.png" if args.plot == "bound" else "quality_vs_calls.png"
    plot(rows, references[0], args.plot, os.path.join(args.outdir, name))
    return rows


if __name__ == "__main__":
    main()
