"""Does training through Winograd convolutions give the run that direct convolutions give? The
digits default never reaches `winograd.applies` (8x8 images), so this trains a U-Net on the
digits upsampled 4x to 32x32 (nearest neighbour, 17 levels), whose 32x32 and 16x16 layers with
>= 64 channels take Winograd, twice from the same seed: ``model.conv_impl="xla"`` and
``"winograd"``. Prints, and writes to ``--out``, each run's loss per logging window and its
bits/dim on the first test digits (T = 100 steps, batch 16: a check of agreement, not a recipe).

    python experiments/perf/winograd_training.py --workdir /tmp/winograd_training \
        --out experiments/perf/results
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys

import numpy as np


def make_data(path: str) -> None:
    """digits' train/test splits, each pixel repeated 4x4: [N, 32, 32, 1], levels 0..16."""
    from configs import digits
    from diffusion_jax import input_pipeline

    config = digits.get_config()
    up = lambda a: np.kron(a, np.ones((1, 4, 4, 1), np.uint8))  # noqa: E731
    splits = {s: up(input_pipeline.load_split(config, s).images) for s in ("train", "test")}
    np.savez(path, **splits)


def overrides(data: str, impl: str, steps: int, num_eval: int) -> list[str]:
    return [
        f"--config.data.dataset={data}",
        "--config.data.image_size=32",
        "--config.model.ch=64",
        "--config.model.ch_mult=(1, 2)",
        "--config.model.attn_resolutions=(16,)",
        "--config.model.fourier_features=()",
        f"--config.model.conv_impl={impl}",
        f"--config.training.num_train_steps={steps}",
        "--config.training.batch_size=16",
        "--config.diffusion.num_timesteps=100",  # the bound's cost: T network calls per digit
        "--config.training.log_every=50",
        f"--config.training.checkpoint_every={steps}",
        "--config.training.sample_every=0",
        "--config.training.eval_at_end=False",
        f"--config.eval.num_examples={num_eval}",
        f"--config.eval.batch_size={num_eval}",
        "--config.eval.figures=()",
    ]


def train_losses(workdir: str) -> list[tuple[int, float]]:
    """(step, loss of the logging window) from the run's logs (one file per process start)."""
    found = {}
    for name in sorted(glob.glob(os.path.join(workdir, "log.*.INFO.*"))):
        with open(name) as f:
            found |= {
                int(s): float(v) for s, v in re.findall(r"step (\d+): .*?loss ([\d.]+)", f.read())
            }
    return sorted(found.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--num_eval", type=int, default=32)
    p.add_argument("--out", default="")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    data = os.path.join(args.workdir, "digits32.npz")
    make_data(data)
    result = {}
    for impl in ("xla", "winograd"):
        workdir = os.path.join(args.workdir, impl)
        metrics_path = os.path.join(workdir, "eval", "metrics.json")
        if not os.path.exists(metrics_path):  # a run already done is only read
            cmd = [sys.executable, "-m", "diffusion_jax.main", "--config=configs/digits.py"]
            cmd += [f"--workdir={workdir}", *overrides(data, impl, args.steps, args.num_eval)]
            subprocess.run(cmd, check=True, capture_output=True)  # train
            subprocess.run([*cmd, "--mode=eval"], check=True, capture_output=True)  # bits/dim
        with open(metrics_path) as f:
            metrics = json.load(f)
        with open(os.path.join(workdir, "config.json")) as f:
            recorded = json.load(f)["model"]["conv_impl"]
        result[impl] = dict(
            conv_impl_recorded=recorded,
            loss=train_losses(workdir),
            bpd=metrics["bpd"],
            bpd_stderr=metrics["bpd_stderr"],
        )
        print(json.dumps({impl: result[impl]}), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "winograd_training.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
