"""Shared pieces of the system tests: a tiny digits config, a CLI runner, checkpoint damage."""

import os
import shutil
import subprocess
import sys

import numpy as np

from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LLVM's cheapest code generation, for every program the tests compile, in-process (conftest.py)
# and in their subprocesses (runs of the CLI and the scripts): they compile about a third faster
# and run a few steps, where speed does not matter. XLA's passes over the HLO are the same, but
# rounding may differ from the default build's by a few ulp, so tests compare with tolerances
# that admit it, or compare two results of the same build; CI's first command (step 1 of
# .ci/run) compiles with the defaults, as users do.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test's subprocess on ``devices`` host-platform CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


TINY = {  # the digits config shrunk to seconds: a 2-level U-Net with 32 channels, T = 20
    "model.ch": 32,
    "model.num_res_blocks": 1,
    "model.attn_resolutions": (4,),
    "diffusion.num_timesteps": 20,
    "training.batch_size": 8,
    "training.num_train_steps": 6,
    "training.log_every": 2,
    "training.checkpoint_every": 2,
    "training.sample_every": 0,
    "eval.num_examples": 16,
    "eval.batch_size": 8,
    "eval.figures": (),
    "eval.bound_num_t": 0,  # the full bound (the default estimates it from 20 t)
    "sampling.method": "ancestral",  # the whole chain (the default: 20 calls of DPM-Solver++)
    "sampling.num_steps": 0,
    "sampling.num_samples": 4,
    "sampling.batch_size": 4,
}


def apply_overrides(config, overrides: dict):
    """``config`` with each dotted key of ``overrides`` set to its value (as --config.KEY=V)."""
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node[name] = value
    return config


def tiny_config(**overrides):
    return apply_overrides(digits.get_config(), {**TINY, **overrides})


def cli_args(**overrides) -> list[str]:
    out = []
    for key, value in {**TINY, **overrides}.items():
        if isinstance(value, tuple):
            value = "(" + "".join(f"{v!r}," for v in value) + ")"
        out.append(f"--config.{key}={value}")
    return out


def main_command(workdir, *args, devices=1, config="configs/digits.py", **overrides):
    """(argv, env) of ``python -m diffusion_jax.main`` on ``devices`` CPU devices."""
    env = dict(
        os.environ,
        XLA_FLAGS=xla_flags(devices),
        PYTHONPATH=ROOT,
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    cmd = [
        sys.executable,
        "-m",
        "diffusion_jax.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *cli_args(**overrides),
        *args,
    ]
    return cmd, env


def run_main(workdir, *args, devices=1, config="configs/digits.py", check=True, **overrides):
    """Run ``python -m diffusion_jax.main`` in a subprocess on ``devices`` CPU devices."""
    cmd, env = main_command(workdir, *args, devices=devices, config=config, **overrides)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


DAMAGES = ("data file deleted", "data overwritten", "garbage metadata", "empty folder")


def corrupt_checkpoint(step_dir, how: str) -> None:
    """Damage the checkpoint folder ``step_dir`` in one of the ways of DAMAGES."""
    state = os.path.join(step_dir, "state")
    data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(state, "d")) for f in fs]
    assert data, os.listdir(state)
    if how == "data file deleted":
        os.remove(data[0])
    elif how == "data overwritten":
        for path in data:
            with open(path, "r+b") as f:
                f.write(np.random.default_rng(0).bytes(os.path.getsize(path)))
    elif how == "garbage metadata":
        with open(os.path.join(state, "_METADATA"), "w") as f:
            f.write("garbage")
    else:  # an empty step folder
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
