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


def test_check_acts_for_the_installed_recorder_and_progress_bars_are_safe_points():
    from diffusion_jax import reporting

    interrupts.check()  # none installed: nothing
    recorder = interrupts.SignalRecorder((signal.SIGINT, signal.SIGTERM))
    try:
        bar = reporting.progress_bar(10, "test")
        bar.update(1)  # nothing received
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(interrupts.Interrupted, match="SIGTERM"):
            bar.update(1)  # the loop stops between two of its compiled calls
        bar.close()
    finally:
        recorder.restore()
    interrupts.check()  # restored: no longer acted on
    assert recorder not in interrupts._ACTIVE


def test_a_second_ctrl_c_before_a_safe_point_stops_at_once():
    recorder = interrupts.SignalRecorder((signal.SIGINT,))
    try:
        os.kill(os.getpid(), signal.SIGINT)  # recorded
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: raised in the handler
    finally:
        recorder.restore()
