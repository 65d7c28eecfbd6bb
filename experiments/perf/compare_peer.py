"""Our CIFAR-10 U-Net against the PyTorch peer, alternating in one window: each round runs
`python -m diffusion_jax.benchmark ... --peer_python P --peer_script S` (ours, then the peer,
same batch) for every case, so the machine's drift falls on both alike. Prints one JSON line per
run, then the table of the README (median ratio over the rounds, and the lowest), and writes
both to ``--out``.

    python experiments/perf/compare_peer.py --peer_python ~/peer-venv/bin/python \
        --peer_script ../shared/bench/peer_torch_unet.py --rounds 3 --out experiments/results/perf

Cases: train at batch 16 (with one denoiser step at batch 64), train at batch 32, and with
``--bf16`` train at batch 16 in bfloat16 against the peer under ``torch.autocast``
(experiments/perf/peer_autocast.py). The FP32 peak is measured first (fma_peak.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = "configs/cifar10_ddpm.py"
PRINTED = ("train_images_per_s", "train_vs_peer", "sample_images_per_s", "sample_vs_peer")


def cases(bf16: bool) -> list[dict]:
    out = [
        dict(name="float32, batch 16", batch=16, sample=64, dtype="float32"),
        dict(name="float32, batch 32", batch=32, sample=0, dtype="float32"),
    ]
    if bf16:
        out.append(dict(name="bfloat16, batch 16", batch=16, sample=64, dtype="bfloat16"))
    return out


def run_case(case: dict, args, peak: float) -> dict:
    peer_script = args.peer_script
    env = dict(os.environ)
    if case["dtype"] == "bfloat16":
        env["PEER_SCRIPT"] = os.path.abspath(args.peer_script)
        peer_script = os.path.join(HERE, "peer_autocast.py")
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.benchmark",
        f"--config={CONFIG}",
        f"--batch_size={case['batch']}",
        f"--steps={args.steps}",
        f"--cpu_peak_gflops={peak}",
        f"--peer_python={args.peer_python}",
        f"--peer_script={peer_script}",
        f"--config.model.dtype={case['dtype']}",
    ]
    cmd += [f"--sample_batch_size={case['sample']}"] if case["sample"] else ["--skip_sample"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer_python", required=True)
    p.add_argument("--peer_script", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="also bfloat16 vs the peer's autocast")
    p.add_argument("--out", default="", help="a folder for compare_peer.json")
    args = p.parse_args()

    fma = subprocess.run(
        [sys.executable, os.path.join(HERE, "fma_peak.py")], capture_output=True, text=True
    )
    peak = json.loads(fma.stdout.strip().splitlines()[-1])["gflops"]
    print(json.dumps({"fma_peak_gflops": peak}), flush=True)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in cases(args.bf16)}
    for r in range(args.rounds):
        for case in cases(args.bf16):
            res = run_case(case, args, peak)
            runs[case["name"]].append(res)
            line = {k: res.get(k) for k in PRINTED}
            line |= {"round": r, "case": case["name"], "peer": res["peer"]}
            line |= {"contention": res["contention"], "train_gflops": res["train_gflops"]}
            print(json.dumps(line), flush=True)

    table = []
    for name, rs in runs.items():
        row = {"case": name}
        for what in ("train", "sample"):
            ratios = [x[f"{what}_vs_peer"] for x in rs if f"{what}_vs_peer" in x]
            if not ratios:
                continue
            row[what] = {
                "ours": [x[f"{what}_images_per_s"] for x in rs],
                "peer": [x["peer"][what]["images_per_s"] for x in rs],
                "ratios": ratios,
                "median_ratio": statistics.median(ratios),
                "min_ratio": min(ratios),
            }
        row["train_gflops"] = [x["train_gflops"] for x in rs]
        table.append(row)

    print(f"\nFP32 FMA peak {peak} GFLOP/s; {args.rounds} alternating rounds")
    print("| case | step | ours img/s | peer img/s | ratio (median) | lowest |")
    print("|---|---|---|---|---|---|")
    for row in table:
        for what in ("train", "sample"):
            if what in row:
                w = row[what]
                ours = ", ".join(f"{v:.3f}" for v in w["ours"])
                peer = ", ".join(f"{v:.3f}" for v in w["peer"])
                print(
                    f"| {row['case']} | {what} | {ours} | {peer} | "
                    f"{w['median_ratio']:.3f} | {w['min_ratio']:.3f} |"
                )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compare_peer.json"), "w") as f:
            json.dump({"fma_peak_gflops": peak, "table": table, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
