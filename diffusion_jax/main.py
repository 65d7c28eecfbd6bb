"""Entry point: ``python -m diffusion_jax.main --config configs/X.py --workdir DIR [--mode ...]``.

Modes: ``train`` (resumes from the newest checkpoint; samples and evaluates at the end),
``eval`` (``DIR/eval/metrics.json``) and ``sample`` (``DIR/samples/``). Any config key can be
overridden: ``--config.training.num_train_steps=100``.
"""

import signal
import sys

from diffusion_jax import interrupts

# Run as the program: from this line on (before absl, the config file and JAX are imported)
# Ctrl-C and SIGTERM are recorded and acted on at safe points, never raised inside an import.
_EARLY = (
    interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM)) if __name__ == "__main__" else None
)

import logging as std_logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffusion_jax import cli  # noqa: E402
from diffusion_jax.cpu import runtime  # noqa: E402

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
    if process_index != 0:
        logging.set_verbosity(logging.WARNING)
        return
    handler.use_absl_log_file("log", workdir)
    flags.FLAGS.alsologtostderr = True
    logging.set_verbosity(logging.INFO)


def _to_log_file(level: int, message: str, *args) -> None:
    """Log to ``WORKDIR/log.INFO`` only, not to the terminal (the config dump, an error that
    is printed on its own)."""
    also = flags.FLAGS.alsologtostderr
    flags.FLAGS.alsologtostderr = False
    try:
        logging.log(level, message, *args)
    finally:
        flags.FLAGS.alsologtostderr = also


def _fail(e: Exception, created: str | None = None) -> None:
    """A user's error: one line on stderr (and in the log), exit status 1, no traceback.
    ``created``: the workdir this run created, removed when it holds nothing but the log."""
    if logging.get_absl_handler().python_handler.stream is not sys.stderr:
        _to_log_file(logging.ERROR, "%s", e)
    print(f"error: {e}", file=sys.stderr)
    if created and os.path.isdir(created):
        if all(name.startswith("log") for name in os.listdir(created)):
            shutil.rmtree(created, ignore_errors=True)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    # From the first moment to the end (imports, JAX's start, compilation, the train loop, the
    # chains of sampling and evaluation) the signals are recorded and acted on at safe points:
    # between steps and between the compiled segments of a chain (``interrupts.check``).
    signals = _EARLY or interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM))
    try:
        _main(signals)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        signals.restore()


def _main(signals: interrupts.SignalRecorder) -> None:
    if os.path.exists(_WORKDIR.value) and not os.path.isdir(_WORKDIR.value):
        _fail(ValueError(f"--workdir {_WORKDIR.value} is a file, not a folder."))
    config = _CONFIG.value
    try:  # before JAX starts
        runtime.configure_cpu_convolutions(_CPU_CONV.value)
        runtime.configure_allocator()
    except ValueError as e:
        _fail(e)
    import jax

    from diffusion_jax import checkpoints, distill_train, distributed, evaluation, files, train

    created = None if os.path.exists(_WORKDIR.value) else _WORKDIR.value
    # A library's malformed log call (orbax's, after a failed save) is dropped, not printed
    # with a traceback of the logging module's own; libraries' INFO lines (JAX's backends) too.
    std_logging.raiseExceptions = False
    logging.get_absl_handler().addFilter(cli.ReadableLog())
    try:
        distributed.initialize(_DISTRIBUTED.value)
        evaluation.prepare(config)  # a refused config: its one line, and no workdir made
        _setup_logging(_WORKDIR.value, jax.process_index())
        logging.info("Mode %s, workdir %s; the config is in its log.", _MODE.value, _WORKDIR.value)
        _to_log_file(logging.INFO, "Config:\n%s", config)
        signals.check()
        if _MODE.value == "train":
            # A distillation trains rounds of students against a teacher (distill_train).
            trainer = distill_train if config.training.objective == "distill" else train
            trainer.train_and_evaluate(
                config,
                _WORKDIR.value,
                tuple(_ALLOW_CHANGE.value),
                signals=signals,
                fresh_start=_FRESH_START.value,
            )
            return
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
        files.WriteError,
    ) as e:
        _fail(e, created)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
