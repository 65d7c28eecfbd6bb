"""The config a run was started with, read from its workdir, for resuming, evaluating and sampling
a run whose recipe has since changed (or an earlier version's run):

    python -m diffusion_jax.main --config configs/workdir.py:runs/digits --workdir runs/digits \
        --mode eval

Keys added after the run was written take their defaults, which keep the old behaviour; keys
renamed since are moved to their new names (``configs/base.py``: ``RENAMED``, ``migrate``);
``--config.KEY=VALUE`` overrides still apply.
"""

import os

import ml_collections

from configs import base


def _tuples(value):
    """JSON turns the config's tuples into lists: back to tuples, as the config files write them."""
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def get_config(workdir: str = "") -> ml_collections.ConfigDict:
    if not workdir:
        raise ValueError(
            "configs/workdir.py needs the run's folder: --config configs/workdir.py:DIR"
        )
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{path} does not exist: {workdir!r} holds no run written by train mode.")
    return ml_collections.ConfigDict(_tuples(base.read_run_config(path)))
