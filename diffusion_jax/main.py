"""Entry point: ``python -m diffusion_jax.main --config configs/X.py --workdir DIR [--mode ...]``.

Modes: ``train`` (resumes from the newest checkpoint; samples and evaluates at the end),
``eval`` (``DIR/eval/metrics.json``) and ``sample`` (``DIR/samples/``). Any config key can be
overridden: ``--config.training.num_train_steps=100``.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from diffusion_jax import distributed, evaluate, train  # after flags: jax config first

    distributed.initialize(_DISTRIBUTED.value)
    os.makedirs(_WORKDIR.value, exist_ok=True)
    logging.get_absl_handler().use_absl_log_file("log", _WORKDIR.value)
    logging.get_absl_handler().setLevel(logging.INFO)
    logging.info("Mode %s, workdir %s, config:\n%s", _MODE.value, _WORKDIR.value, _CONFIG.value)
    try:
        if _MODE.value == "train":
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
        elif _MODE.value == "eval":
            evaluate.evaluate(_CONFIG.value, _WORKDIR.value)
        else:
            evaluate.sample(_CONFIG.value, _WORKDIR.value)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    app.run(main)
