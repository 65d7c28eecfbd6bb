"""The digits run's evaluation in full: bits/dim on test and train with the L_0 / sum L_t / L_T
split, the L_t curve, the rate-distortion curve and the progressive-generation strip.

    python experiments/digits/digits_eval.py --workdir /tmp/digits_eval

Trains ``configs/digits.py`` for ``--train_steps`` first when the workdir holds no checkpoint,
then runs what ``--mode eval`` runs (``evaluation.evaluate``); FID/IS are requested and, with no
Inception weights here, skipped with the reason recorded. Copies metrics, curves and figures to
``--outdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/digits_eval")
    parser.add_argument(
        "--outdir", default=os.path.join(ROOT, "experiments/digits/results/digits_eval")
    )
    parser.add_argument("--train_steps", type=int, default=1500)
    parser.add_argument("--train_examples", type=int, default=300, help="0: the whole split")
    parser.add_argument("--rd_examples", type=int, default=0, help="0: the whole test split")
    args = parser.parse_args(argv)

    from absl import logging

    from configs import digits
    from diffusion_jax import checkpoints, evaluation, reporting, train

    logging.set_verbosity(logging.INFO)
    config = digits.get_config()
    config.eval.metrics = ("bpd", "fid", "is")
    config.eval.bpd_splits = ("train",)
    config.eval.bpd_splits_num_examples = args.train_examples
    config.eval.rate_distortion.num_examples = args.rd_examples
    if not os.path.isdir(checkpoints.checkpoint_dir(args.workdir)):
        config.training.num_train_steps = args.train_steps
        config.training.eval_at_end = False
        train.train_and_evaluate(config, args.workdir)

    start = time.time()
    metrics = evaluation.evaluate(config, args.workdir)
    metrics["eval_seconds"] = time.time() - start
    reporting.write_json(os.path.join(args.workdir, "eval", "metrics.json"), metrics)

    os.makedirs(args.outdir, exist_ok=True)
    for src in [
        os.path.join(args.workdir, "eval", "metrics.json"),
        metrics["rate_distortion"]["path"],
    ]:
        shutil.copy(src, args.outdir)
    for path in metrics["figures"].values():
        shutil.copy(path, args.outdir)
    summary = {k: v for k, v in metrics.items() if not k.endswith("_per_t")}
    print(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":
    main()
