import os
import signal

import pytest

from diffusion_jax import interrupts


def test_signals_are_recorded_then_raised_at_the_check_and_handlers_restored():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    recorder = interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM))
    recorder.check()  # nothing received: nothing raised
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not acted on
    os.kill(os.getpid(), signal.SIGINT)  # the first one counts
    with pytest.raises(interrupts.Interrupted, match="SIGTERM"):
        recorder.check()
    recorder.restore()
    recorder.restore()  # idempotent
    assert {s: signal.getsignal(s) for s in before} == before
    recorder = interrupts.SignalRecorder((signal.SIGINT,))
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        recorder.check()
    recorder.restore()
    assert issubclass(interrupts.Interrupted, KeyboardInterrupt)  # main exits 130 for both
