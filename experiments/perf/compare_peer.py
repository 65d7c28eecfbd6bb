"""Ours against the PyTorch peer on the three networks users train, alternating in one window:
each round runs `python -m diffusion_jax.benchmark ... --peer_python P --peer_script S` (ours,
then the peer, same network and batch) for every case, so the machine's drift falls on both
alike. Prints one JSON line per run, then the table of experiments/perf/README.md (median ratio
over the rounds, and the lowest), and writes both to ``--out``.

    python experiments/perf/compare_peer.py --peer_python ~/peer-venv/bin/python \
        --peer_script ../shared/bench/peer_torch_unet.py --rounds 3 --bf16 \
        --out experiments/perf/results

Networks (ours changed only where the peer cannot follow: no input Fourier features, fixed
variances, so both have the same parameters and the same work a step):
  digits   configs/digits.py, batch 64 vs the peer's ``--config digits`` without its attention
           at 4x4 and dropout, as ours (917,889 parameters, checked equal; 1,001,729 with them);
  fashion  configs/fashion_mnist.py (the CPU recipe), batch 64 vs ``--config digits`` with the
           recipe's shape given by ``--override`` (1,623,169 parameters);
  cifar10  configs/cifar10_ddpm.py at batch 16 (its batch 128 takes minutes a step on two cores),
           with one denoiser step at batch 64, vs ``--config ddpm_cifar10`` (35.7M).
With ``--bf16`` each network is also run in bfloat16 against the peer under ``torch.autocast``
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
PRINTED = ("train_images_per_s", "train_vs_peer", "sample_images_per_s", "sample_vs_peer")
# The digits default's objective with what the peer lacks turned off (same parameter count).
MATCHED = (
    "--config.model.fourier_features=()",
    "--config.diffusion.var_type=fixedlarge",
    "--config.diffusion.loss_type=simple",
    "--config.diffusion.t_sampler=uniform",
)


def network(config, batch, steps, peer_config, flags=MATCHED, sample=0, peer_override=()) -> dict:
    """One network of the comparison: our config and its flags, the peer's config and overrides."""
    return dict(
        config=config,
        batch=batch,
        steps=steps,
        peer_config=peer_config,
        flags=flags,
        sample=sample,
        peer_override=peer_override,
    )


NETWORKS = {
    "digits": network(
        "configs/digits.py",
        64,
        20,
        "digits",
        peer_override=(  # the first-run network: attention in the middle block only, no dropout
            'down_block_types=["DownBlock2D","DownBlock2D"]',
            'up_block_types=["UpBlock2D","UpBlock2D"]',
            "dropout=0.0",
        ),
    ),
    "fashion": network(
        "configs/fashion_mnist.py",
        64,
        10,
        "digits",
        peer_override=(
            "sample_size=28",
            "block_out_channels=[32,64,64]",
            'down_block_types=["DownBlock2D","DownBlock2D","AttnDownBlock2D"]',
            'up_block_types=["AttnUpBlock2D","UpBlock2D","UpBlock2D"]',
            "dropout=0.0",
        ),
    ),
    "cifar10": network("configs/cifar10_ddpm.py", 16, 3, "ddpm_cifar10", flags=(), sample=64),
}


def cases(networks: list[str], bf16: bool) -> list[dict]:
    dtypes = ("float32", "bfloat16") if bf16 else ("float32",)
    return [
        dict(NETWORKS[n], name=f"{n}, {d}, batch {NETWORKS[n]['batch']}", dtype=d)
        for n in networks
        for d in dtypes
    ]


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
        f"--config={case['config']}",
        f"--batch_size={case['batch']}",
        f"--steps={case['steps']}",
        "--warmup=2",
        f"--cpu_peak_gflops={peak}",
        f"--peer_python={args.peer_python}",
        f"--peer_script={peer_script}",
        f"--peer_config={case['peer_config']}",
        f"--config.model.dtype={case['dtype']}",
        *case["flags"],
        *(f"--peer_override={o}" for o in case["peer_override"]),
    ]
    cmd += [f"--sample_batch_size={case['sample']}"] if case["sample"] else ["--skip_sample"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["peer"]["train"]["num_params"] != res["num_params"]:
        raise SystemExit(
            f"{case['name']}: ours has {res['num_params']} parameters, the peer "
            f"{res['peer']['train']['num_params']}: not the same network."
        )
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer_python", required=True)
    p.add_argument("--peer_script", required=True)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--networks", default="digits,fashion,cifar10", help=f"of {','.join(NETWORKS)}")
    p.add_argument("--bf16", action="store_true", help="also bfloat16 vs the peer's autocast")
    p.add_argument("--out", default="", help="a folder for compare_peer.json")
    args = p.parse_args()
    networks = args.networks.split(",")
    unknown = sorted(set(networks) - set(NETWORKS))
    if unknown:
        p.error(f"--networks: {unknown} unknown; allowed: {sorted(NETWORKS)}")

    fma = subprocess.run(
        [sys.executable, os.path.join(HERE, "fma_peak.py")], capture_output=True, text=True
    )
    peak = json.loads(fma.stdout.strip().splitlines()[-1])["gflops"]
    print(json.dumps({"fma_peak_gflops": peak}), flush=True)
    runs: dict[str, list[dict]] = {c["name"]: [] for c in cases(networks, args.bf16)}
    for r in range(args.rounds):
        for case in cases(networks, args.bf16):
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
