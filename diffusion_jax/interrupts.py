"""Ctrl-C and SIGTERM as a run meets them: recorded while installed, acted on at safe points.

A signal handler that raises lands wherever the main thread happens to be, inside an import or
a library's C++ call included (an ``ImportError: initialization failed`` of tensorstore, a
segfault after a save); recording it and raising only between steps keeps every signal, from
the process's first moment on, and ends the run with exit 130 (``main``).
"""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """A signal other than Ctrl-C (SIGTERM): ends the run as Ctrl-C does (exit 130)."""


class SignalRecorder:
    """Signals recorded, not acted on, while installed: the run looks at them at safe points
    (``check``), so one arriving during start-up or compilation is neither lost nor raised
    inside a library call."""

    def __init__(self, signums: tuple[int, ...]):
        self.received: int | None = None
        self._old = {s: signal.signal(s, self._record) for s in signums}
        _ACTIVE.append(self)

    def _record(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            # Ctrl-C again before a safe point came: the user insists, stop here and now.
            raise KeyboardInterrupt
        self.received = self.received or signum

    def check(self) -> None:
        """Raise what the first recorded signal means: KeyboardInterrupt for SIGINT (Ctrl-C),
        Interrupted("SIGTERM") for SIGTERM."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is not None:
            raise Interrupted(signal.Signals(self.received).name)

    def restore(self) -> None:
        """Reinstall the handlers from before (idempotent)."""
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)


# The recorders installed, innermost last: signal handlers are the process's, and so is this.
_ACTIVE: list[SignalRecorder] = []


def check() -> None:
    """A safe point: act on a signal recorded by the innermost installed recorder (raise
    KeyboardInterrupt / Interrupted); nothing when none is installed (a notebook, a test), where
    Ctrl-C raises as Python's default handler does. The loops of training, sampling and
    evaluation call it between their compiled steps (``reporting.progress_bar`` does, on each
    update)."""
    if _ACTIVE:
        _ACTIVE[-1].check()
