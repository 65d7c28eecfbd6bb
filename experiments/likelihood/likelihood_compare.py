"""Runs side by side by the bound and by sample quality: the likelihood study's table and the
L_t / eps-MSE curves of several trained workdirs on one figure.

    python experiments/likelihood/likelihood_compare.py \\
        --runs before=runs/digits_old after=runs/digits

Reads each ``WORKDIR/eval/metrics.json`` (``--mode eval`` with ``bpd`` and, for the quality
columns, ``fd_classifier`` / ``is_classifier`` in ``eval.metrics``), prints a markdown table
(bits/dim with its L_0 / sum L_t / L_T split, the classifier's Frechet distance and Inception
score of the samples) and writes ``likelihood_curves.png`` and ``likelihood_compare.md`` to
``--outdir``.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))  # common


def _cell(m: dict, key: str, digits: int = 4) -> str:
    if key not in m:
        return "–"
    err = m.get(f"{key}_stderr")
    return f"{m[key]:.{digits}f}" + (f" ± {err:.{digits}f}" if err is not None else "")


def table(runs: dict[str, dict]) -> str:
    """Markdown rows of the bound and the classifier metrics of each run's metrics.json."""
    head = (
        "| run | test bits/dim | L_0 | sum L_t | L_T | classifier FD | classifier IS |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for label, m in runs.items():
        t = m.get("bpd_terms", {})
        split = [f"{t[k]:.3g}" if k in t else "–" for k in ("decoder_L0", "sum_Lt", "prior_LT")]
        rows.append(
            f"| {label} | {_cell(m, 'bpd')} | {' | '.join(split)} | "
            f"{_cell(m, 'fd_classifier', 3)} | {_cell(m, 'is_classifier', 3)} |"
        )
    return head + "\n".join(rows) + "\n"


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, help="label=WORKDIR ...")
    parser.add_argument("--outdir", default=os.path.join(ROOT, "experiments/likelihood/results"))
    args = parser.parse_args(argv)

    import common

    from diffusion_jax.evaluation import plots

    runs = {label: m for label, (_, m) in common.read_runs(parser, args.runs).items()}
    text = table(runs)
    print(text, end="")
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "likelihood_compare.md"), "w") as f:
        f.write(text)
    curves = {
        label: (m["terms_bpd_per_t"], m.get("mse_per_t"))
        for label, m in runs.items()
        if "terms_bpd_per_t" in m
    }
    plots.plot_lt_curves(
        curves,
        os.path.join(args.outdir, "likelihood_curves.png"),
        "L_t per t on the test split",
        log_t=True,
    )
    return text


if __name__ == "__main__":
    main()
