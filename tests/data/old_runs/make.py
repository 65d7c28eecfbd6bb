"""Write the tiny workdir of an earlier commit into ``tests/data/old_runs/<commit>/``.

    python tests/data/old_runs/make.py [COMMIT [CONFIG]]   # default: HEAD, before your change

The commit's tree is exported to a temporary folder (``git archive``) and its own
``python -m diffusion_jax.main`` trains a tiny config there (``configs/digits.py``, or CONFIG
among ``CONFIGS``, shrunk by ``OVERRIDES``: 4 steps, then its samples and bits/dim on 8 test
digits), on one CPU device as a laptop user would. The workdir is copied to ``<commit>`` (the
digits config) or ``<commit>_<config>`` without its log files, with ``manifest.json`` naming
the commit, the command and the versions that wrote it. ``tests/test_old_runs.py`` resumes,
evaluates and samples every folder here with today's code.

Run it at the commit before a change to the config, the checkpoint or the workdir layout, and
commit the folder it writes (about 1 MB) with the change.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

# The digits config (learned variances, loss-aware history, Fourier features) shrunk to seconds.
OVERRIDES = {
    "model.ch": 16,
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "diffusion.num_timesteps": 20,
    "training.batch_size": 8,
    "training.num_train_steps": 4,
    "training.log_every": 2,
    "training.checkpoint_every": 4,
    "training.keep_checkpoints": 1,
    "training.sample_every": 0,
    "eval.num_examples": 8,
    "eval.batch_size": 8,
    "eval.figures": (),
    "sampling.num_samples": 4,
    "sampling.batch_size": 4,
}


# The configs an old run may come from, with what shrinks each beyond OVERRIDES.
CONFIGS = {
    "digits": {},
    "digits_vdm": {"vdm.gamma_hidden": 8, "vdm.eval_num_steps": 4, "eval.bound_num_t": 2},
}


def flag(key: str, value) -> str:
    if isinstance(value, tuple):
        value = "(" + "".join(f"{v!r}," for v in value) + ")"
    return f"--config.{key}={value}"


def main(commit: str = "HEAD", config: str = "digits") -> str:
    full = subprocess.check_output(["git", "-C", ROOT, "rev-parse", commit], text=True).strip()
    overrides = {**OVERRIDES, **CONFIGS[config]}
    out = os.path.join(HERE, full[:7] if config == "digits" else f"{full[:7]}_{config}")
    if os.path.exists(out):
        raise SystemExit(f"{out} exists: remove it first to write it again.")
    with tempfile.TemporaryDirectory() as tmp:
        tree = os.path.join(tmp, "tree")
        os.makedirs(tree)
        archive = subprocess.run(
            ["git", "-C", ROOT, "archive", full], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        run = os.path.join(tmp, "run")
        argv = [f"--config=configs/{config}.py", f"--workdir={run}"]
        argv += [flag(k, v) for k, v in overrides.items()]
        env = dict(
            os.environ, PYTHONPATH=tree, XLA_FLAGS="--xla_force_host_platform_device_count=1"
        )
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
        subprocess.run(
            [sys.executable, "-m", "diffusion_jax.main", *argv], cwd=tree, env=env, check=True
        )
        shutil.copytree(run, out, ignore=shutil.ignore_patterns("log*", "train.lock"))
    manifest = {
        "commit": full,
        "written": datetime.date.today().isoformat(),
        "config": f"configs/{config}.py",
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "command": "python -m diffusion_jax.main " + " ".join(argv[:1] + argv[2:]),
        "devices": 1,
        "versions": {
            "python": sys.version.split()[0],
            **{name: metadata.version(name) for name in ("jax", "flax", "orbax-checkpoint")},
        },
    }
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return out


if __name__ == "__main__":
    print(main(*sys.argv[1:3]))
