"""Entry point: ``python -m diffusion_jax.main --config configs/X.py --workdir DIR [--mode ...]``.

Modes: ``train`` (resumes from the newest checkpoint; samples and evaluates at the end),
``eval`` (``DIR/eval/metrics.json``) and ``sample`` (``DIR/samples/``). Any config key can be
overridden: ``--config.training.num_train_steps=100``.
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from diffusion_jax import cli, interrupts, runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "sample"], "What to run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host runs)."
)
_CPU_CONV = flags.DEFINE_string(
    "cpu_conv_library", runtime.default_library(), runtime.CPU_CONV_HELP
)
_ALLOW_CHANGE = flags.DEFINE_list(
    "allow_config_change",
    [],
    "train: optimiser keys (optim.*) that may differ from the run's config.json on resume, "
    "e.g. optim.learning_rate after a NaN stop.",
)
_FRESH_START = flags.DEFINE_bool(
    "fresh_start",
    False,
    "train: start at step 0 in a workdir whose checkpoints are all damaged (corrupt-* folders).",
)
flags.mark_flags_as_required(["config", "workdir"])


def _setup_logging(workdir: str, process_index: int) -> None:
    """Log to the terminal and to ``WORKDIR/log.INFO``; other processes: warnings to stderr only."""
    os.makedirs(workdir, exist_ok=True)
    handler = logging.get_absl_handler()
    handler.addFilter(cli.ReadableLog())
    if process_index != 0:
        logging.set_verbosity(logging.WARNING)
        return
    handler.use_absl_log_file("log", workdir)
    flags.FLAGS.alsologtostderr = True
    logging.set_verbosity(logging.INFO)


def _fail(e: Exception) -> None:
    """A user's error: one line on stderr (and in the log), exit status 1, no traceback."""
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def _unraisable(hook):
    """``sys.unraisablehook`` that logs, without a traceback, the "Event loop is closed" error an
    abandoned orbax restore (a damaged checkpoint that was skipped) can leave for the garbage
    collector; every other unraisable exception goes to ``hook``."""

    def handle(unraisable):
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            logging.debug("Ignored at clean-up: %s", error)
            return
        hook(unraisable)

    return handle


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # as Ctrl-C: the same exit (130) from the first moment on


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    signal.signal(signal.SIGTERM, _sigterm)  # after start-up: as Ctrl-C
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    # From the first moment to the first training step (imports, JAX's start, compilation) the
    # signals are recorded and acted on at safe points, never raised inside a library call.
    signals = interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM))
    try:
        _main(signals)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        signals.restore()


def _main(signals: interrupts.SignalRecorder) -> None:
    config = _CONFIG.value
    try:  # before JAX starts
        runtime.configure_cpu_convolutions(runtime.process_library(config, _CPU_CONV.value))
        runtime.configure_allocator()
    except ValueError as e:
        _fail(e)
    import jax

    from diffusion_jax import checkpoints, distributed, evaluation, train

    try:
        distributed.initialize(_DISTRIBUTED.value)
        _setup_logging(_WORKDIR.value, jax.process_index())
        logging.info("Mode %s, workdir %s, config:\n%s", _MODE.value, _WORKDIR.value, config)
        signals.check()
        if _MODE.value == "train":
            train.train_and_evaluate(
                config,
                _WORKDIR.value,
                tuple(_ALLOW_CHANGE.value),
                signals=signals,
                fresh_start=_FRESH_START.value,
            )
            return
        signals.restore()  # eval and sample: Ctrl-C and SIGTERM act at once
        signals.check()
        if _MODE.value == "eval":
            evaluation.evaluate(config, _WORKDIR.value)
        else:
            evaluation.sample(config, _WORKDIR.value)
    except (
        ValueError,
        FileNotFoundError,
        FloatingPointError,
        evaluation.EvaluationError,
        checkpoints.CheckpointError,
    ) as e:
        _fail(e)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
