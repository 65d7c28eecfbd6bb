"""Fixed-seed outputs of the samplers, the bound and training, written to an .npz.

    python tests/data/reference_outputs/make.py OUT.npz [--src DIR]

``--src`` is a source tree of diffusion_jax and configs/ (default: this checkout); with
``git archive COMMIT | tar -x -C DIR`` it computes the outputs of an earlier commit with that
commit's own code, so two trees can be compared bit for bit (``--compare A.npz B.npz``).
The same outputs, stored as ``digits.npz`` beside this file, are what
``tests/test_reference_outputs.py`` checks the current code against.

What it computes, on one CPU device: 10 training steps of ``configs/digits.py`` and
``configs/digits_vdm.py`` (their networks shrunk to ``model.ch = 16``) and the losses of each
step; with the parameters after them, 4 samples of every sampler (the ancestral chain over all
T, the others at 20 network calls), and the bound on 8 test digits (every t, and K = 20).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

SAMPLERS = {  # name in the .npz: (config, overrides of config.sampling)
    "ancestral": ("digits", dict(method="ancestral", num_steps=0)),
    "ddim_eta0": ("digits", dict(method="ddim", num_steps=20, eta=0.0)),
    "ddim_eta1": ("digits", dict(method="ddim", num_steps=20, eta=1.0)),
    "dpmpp_2m": ("digits", dict(method="dpmpp_2m", num_steps=20)),
    "dpmpp_2m_sde": ("digits", dict(method="dpmpp_2m_sde", num_steps=20)),
    "heun": ("digits", dict(method="heun", num_steps=20)),
    "vdm_ancestral": ("digits_vdm", dict(method="vdm_ancestral", num_steps=20)),
    "vdm_ddim": ("digits_vdm", dict(method="vdm_ddim", num_steps=20, eta=0.0)),
    "vdm_dpmpp_2m": ("digits_vdm", dict(method="vdm_dpmpp_2m", num_steps=20)),
}
BOUNDS = {"bound_full": ("digits", 0), "bound_k20": ("digits", 20), "vdm_bound": ("digits_vdm", 0)}
TRAIN_STEPS = 10
PARTS = ("samplers", "bound")


def _config(name: str):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config()
    config.model.ch = 16
    # The network and optimiser the stored outputs were computed with (digits.py's before its
    # first-run recipe: attention at 4x4, dropout 0.1, learning rate 1e-3, a constant EMA).
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.1
    config.optim.learning_rate = 1e-3
    config.optim.ema_warmup_power = 0.0
    config.training.batch_size = 16
    config.sampling.num_samples = config.sampling.batch_size = 4
    config.eval.num_examples = config.eval.batch_size = 8
    return config


def _trained(name: str) -> tuple[object, object, object, dict]:
    """(config, model, EMA params, {loss_<name>: [TRAIN_STEPS] losses}) after 10 steps."""
    import numpy as np

    from diffusion_jax import input_pipeline, objectives, sharding, train

    config = _config(name)
    mesh = sharding.make_mesh()
    program = train.build(config, mesh)
    keys = objectives.run_keys(config.seed)
    state = program.init(keys["init"])
    source = input_pipeline.load_split(config, config.data.train_split)
    batches = input_pipeline.train_batches(config, source, 0, 0, 1)
    losses = []
    for _ in range(TRAIN_STEPS):
        batch = sharding.global_batch(mesh, next(batches))
        state, metrics = program.step(state, batch, keys["train"])
        losses.append(np.asarray(metrics["loss"]))
    return config, program, state.ema_params, {f"loss_{name}": np.stack(losses)}


def compute(
    names: tuple[str, ...] = ("digits", "digits_vdm"), parts: tuple[str, ...] = PARTS
) -> dict:
    """The outputs of the configs ``names``: their losses, and of ``parts`` (samplers, bound)."""
    import jax
    import numpy as np

    from diffusion_jax import sampling
    from diffusion_jax.evaluation import bpd, context

    out = {}
    runs = {}
    for name in names:
        config, program, params, losses = _trained(name)
        runs[name] = (config, program, params)
        out |= losses
    for key, (name, overrides) in SAMPLERS.items():
        if name not in runs or "samplers" not in parts:
            continue
        config, program, params = runs[name]
        config = config.copy_and_resolve_references()
        config.sampling.update(overrides)
        sample = sampling.make_sample_fn(config, program.model, program.mesh, desc=key)
        out[key] = np.asarray(sample(params, jax.random.PRNGKey(1)))
    for key, (name, num_t) in BOUNDS.items():
        if name not in runs or "bound" not in parts:
            continue
        config, program, params = runs[name]
        config = config.copy_and_resolve_references()
        config.eval.bound_num_t = num_t
        ctx = context.EvalContext(config, program.model, params, program.mesh, "/nonexistent")
        out |= _numbers(key, bpd.bpd_of_split(ctx, "test", 8))
    return out


def _numbers(prefix: str, tree) -> dict:
    """Every number (or list of numbers) of a nested dict, as float64 arrays by dotted key."""
    import numpy as np

    if isinstance(tree, dict):
        return {
            k: v for name, sub in tree.items() for k, v in _numbers(f"{prefix}.{name}", sub).items()
        }
    if isinstance(tree, bool) or isinstance(tree, str):
        return {}
    return {prefix: np.asarray(tree, np.float64)}


def compare(a_path: str, b_path: str) -> int:
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    bad = 0
    for k in sorted(set(a) | set(b)):
        if k not in a or k not in b:
            print(f"{k}: only in {'the first' if k in a else 'the second'}")
            bad += 1
            continue
        same = np.array_equal(a[k], b[k])
        diff = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) if a[k].size else 0.0
        print(f"{k:32s} {'identical' if same else f'DIFFERS, max |diff| {diff:.3e}'}")
        bad += not same
    print(f"{len(set(a) | set(b)) - bad} identical, {bad} differ")
    return int(bad > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--src", default=ROOT, help="a source tree holding diffusion_jax/")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    parser.add_argument(
        "--config", action="append", choices=("digits", "digits_vdm"), help="only these"
    )
    parser.add_argument("--part", action="append", choices=PARTS, help="only these (and losses)")
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    sys.path.insert(0, os.path.abspath(args.src))
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    import numpy as np

    import diffusion_jax

    assert os.path.abspath(diffusion_jax.__file__).startswith(os.path.abspath(args.src)), (
        diffusion_jax.__file__
    )
    out = compute(tuple(args.config or ("digits", "digits_vdm")), tuple(args.part or PARTS))
    np.savez(args.out, **out)
    print(f"wrote {len(out)} arrays to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
