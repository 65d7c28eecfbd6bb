"""Shared pieces of the system tests: a tiny digits config and a CLI runner."""

import os
import subprocess
import sys

from configs import digits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    "sampling.num_samples": 4,
    "sampling.batch_size": 4,
}


def tiny_config(**overrides):
    config = digits.get_config()
    for key, value in {**TINY, **overrides}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


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
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
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
