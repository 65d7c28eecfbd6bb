"""Bits/dim of models that need no network, on the digits split the default run uses, so the
study READMEs can print them beside the diffusion model's bound:

- independent pixels: one categorical over the L grey levels per pixel, fitted on the training
  split with add-1/2 counts (a model of no correlation between pixels at all);
- uniform: log2(L) bits/dim, a model of nothing.

    python experiments/likelihood/likelihood_baselines.py [--config configs/digits.py]

Prints one JSON line and writes it to ``--out`` (default
``experiments/likelihood/results/likelihood_baselines.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def independent_pixel_bpd(
    train: np.ndarray, test: np.ndarray, num_bins: int, alpha: float = 0.5
) -> tuple[float, float]:
    """Mean and standard error over test examples of -log2 prod_d p_d(x_d) / D, with
    p_d(k) = (n_dk + alpha) / (N + alpha L) fitted per dimension d on ``train``.

    Args:
      train: [N, ...] integers in [0, num_bins).
      test: [M, ...] integers in [0, num_bins), the same trailing shape.
    """
    train = train.reshape(len(train), -1).astype(np.int64)  # [N, D]
    test = test.reshape(len(test), -1).astype(np.int64)  # [M, D]
    dims = train.shape[1]
    counts = np.zeros((dims, num_bins))  # [D, L]
    np.add.at(counts, (np.broadcast_to(np.arange(dims), train.shape), train), 1.0)
    log_p = np.log2(counts + alpha) - np.log2(len(train) + alpha * num_bins)  # [D, L]
    per_example = -log_p[np.arange(dims), test].mean(axis=1)  # [M]
    return float(per_example.mean()), float(per_example.std(ddof=1) / np.sqrt(len(test)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "experiments/likelihood/results/likelihood_baselines.json"),
    )
    args = parser.parse_args(argv)

    import importlib.util

    from diffusion_jax import input_pipeline

    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, args.config))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    train = input_pipeline.load_split(config, config.data.train_split).images
    test = input_pipeline.load_split(config, config.eval.split).images
    bins = config.data.num_bins
    bpd, stderr = independent_pixel_bpd(train, test, bins)
    out = dict(
        config=args.config,
        train_examples=len(train),
        test_examples=len(test),
        num_bins=bins,
        independent_pixels_bpd=bpd,
        independent_pixels_stderr=stderr,
        uniform_bpd=float(np.log2(bins)),
    )
    print(json.dumps(out))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
