"""Classifier-free guidance scale against class match, quality and diversity, on a trained
class-conditional run (e.g. ``configs/digits_cond.py``).

For each guidance scale w it draws ``--num_samples`` samples with the run's own config
(``configs/workdir.py:WORKDIR``) and the sampler asked for, sample i of class i mod K, all from
the same keys, and judges them with the classifier metric's classifier (trained on the training
digits, ``evaluation.classifier``):

- class match: the share of samples the classifier puts in the requested class (± binomial
  standard error);
- classifier FD and IS against the test split (± bootstrap standard errors);
- diversity: within each class, the mean distance between the classifier features of two
  different samples, divided by the same for the real test digits of that class, averaged over
  the classes (1 = as varied as the data, 0 = one image per class).

Writes ``guidance.md`` / ``guidance.json`` (``common.write_table``) and one grid per w (one class
per row) to ``--outdir``:

    python experiments/guidance/guidance_sweep.py --workdir runs/digits_cond \
        [--scales 0,0.5,1,2,4] [--method dpmpp_2m --num_steps 50] [--num_samples 500]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # common

import common
import jax
import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def add_args(parser) -> None:
    parser.add_argument("--workdir", required=True, help="a class-conditional run")
    parser.add_argument("--scales", default="0,0.5,1,2,4", help="guidance scales w")
    parser.add_argument("--method", default="", help="sampling.method ('' = the run's)")
    parser.add_argument("--num_steps", type=int, default=-1, help="sampling.num_steps (-1: run's)")
    parser.add_argument("--num_samples", type=int, default=500)
    parser.add_argument("--tag", default="guidance", help="the output files' name")


def within_class_spread(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[K] the mean distance between the features [N, F] of two different examples of class k
    (NaN for a class with fewer than two)."""
    out = []
    for k in range(int(labels.max()) + 1):
        f = features[labels == k].astype(np.float64)  # [n_k, F]
        if len(f) < 2:
            out.append(np.nan)
            continue
        sq = np.sum(f**2, axis=1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * f @ f.T, 0.0))  # [n_k, n_k]
        out.append(dist.sum() / (len(f) * (len(f) - 1)))
    return np.asarray(out)


def main(argv=None) -> list[dict]:
    args = common.parse_args(RESULTS, __doc__, steps=0, argv=argv, extra=add_args)

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
    from diffusion_jax.evaluation import classifier, judge

    config = evaluation.prepare(workdir_config.get_config(args.workdir))
    if not config.model.num_classes:
        raise SystemExit(f"{args.workdir} is not a class-conditional run (model.num_classes=0).")
    mesh = sharding.make_mesh()
    model = models.get_model(config)
    params = evaluation.load_ema_params(args.workdir, mesh)
    step = checkpoints.make_manager(args.workdir, 1).latest_step()
    n = 20 if args.quick else args.num_samples
    num_bins = config.data.num_bins

    # The real test digits' within-class spread, in the same classifier's features.
    cache = judge.classifier_dir(args.workdir)
    clf, clf_params, info = judge.load_or_train(config, cache)
    test = input_pipeline.load_split(config, judge.reference_split(config))
    _, test_features = judge.predict(clf, clf_params, test.images, num_bins)
    real_spread = within_class_spread(np.asarray(test_features), test.labels)  # [K]

    key = jax.random.fold_in(jax.random.key(args.seed), 0x6D)  # the same keys for every w
    rows, m = [], None
    for w in [float(s) for s in args.scales.split(",")]:
        cfg = config.copy_and_resolve_references()
        cfg.sampling.guidance_scale = w
        cfg.sampling.num_samples = n
        cfg.sampling.batch_size = min(n, 500)
        if args.method:
            cfg.sampling.method = args.method
        if args.num_steps >= 0:
            cfg.sampling.num_steps = args.num_steps
        sampler = sampling.make_sample_fn(cfg, model, mesh, desc=f"w={w}")
        start = time.perf_counter()
        x = sampler(params, key)  # [n, H, W, C] model space
        seconds = time.perf_counter() - start
        labels = sampling.sample_labels(cfg, n)  # [n]
        levels = input_pipeline.to_uint8_levels(x, num_bins)
        m = classifier.classifier_metrics(cfg, levels, args.workdir, labels)
        _, features = judge.predict(clf, clf_params, levels, num_bins)
        spread = within_class_spread(np.asarray(features), labels) / real_spread  # [K]
        rows.append(
            {
                "guidance w": w,
                "class match": m["class_match"],
                "match stderr": m["class_match_stderr"],
                "worst class match": min(v for v in m["class_match_per_class"] if v is not None),
                "diversity (vs real)": float(np.nanmean(spread)),
                "classifier FD": m["fd_classifier"],
                "FD stderr": m["fd_classifier_stderr"],
                "classifier IS": m["is_classifier"],
                "IS stderr": m["is_classifier_stderr"],
                "seconds (incl. compile)": seconds,
            }
        )
        path = os.path.join(args.outdir, f"{args.tag}_w{w:g}.png")
        reporting.save_sample_grid(path, x, num_bins, labels)  # one class per row
    s = config.sampling
    method = args.method or s.method
    calls = args.num_steps if args.num_steps >= 0 else s.num_steps
    note = (
        f"{n} samples per row (sample i of class i mod {config.model.num_classes}) from the EMA "
        f"parameters of {args.workdir} (step {step}), sampler {method} with "
        f"{calls or config.diffusion.num_timesteps} steps, the same keys for every w; judged by "
        f"a classifier trained on the training digits (test accuracy "
        f"{info['test_accuracy']:.4f}) against the {m['classifier_reference']['num_examples']} "
        f"{m['classifier_reference']['split']} digits; real vs "
        f"real FD {m['fd_classifier_real']:.3f}, IS {m['is_classifier_real']:.3f}. Diversity: "
        "the mean within-class feature distance of the samples over that of the real test "
        "digits."
    )
    common.write_table(args.outdir, args.tag, rows, note)
    return rows


if __name__ == "__main__":
    main()
