"""Measuring responsiveness: a 10 ms QTimer heartbeat while a widget run goes on."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class RunTiming:
    status: str
    seconds: float
    max_gap_ms: float
    beats: int


def run_and_measure(widget, mode: str = "all", timeout_s: float = 120.0,
                    **run_kwargs) -> RunTiming:
    """Start ``widget.run(mode)`` and spin the Qt event loop until it ends.

    A 10 ms QTimer records the largest gap between two of its ticks: the time
    the Qt thread was unable to process events (the window was frozen).
    """
    from qtpy.QtCore import QEventLoop, QTimer

    beats: list[float] = []
    heart = QTimer()
    heart.setInterval(10)
    heart.timeout.connect(lambda: beats.append(time.perf_counter()))
    loop = QEventLoop()
    outcome: list[str] = []

    def done(status: str) -> None:
        outcome.append(status)
        loop.quit()

    widget.finished.connect(done)
    guard = QTimer(singleShot=True, interval=int(timeout_s * 1000))
    guard.timeout.connect(loop.quit)
    heart.start()
    t0 = time.perf_counter()
    beats.append(t0)
    try:
        started = widget.run(mode, **run_kwargs)
        if started and not outcome:
            guard.start()
            loop.exec()
        seconds = time.perf_counter() - t0
        beats.append(time.perf_counter())
    finally:
        heart.stop()
        guard.stop()
        widget.finished.disconnect(done)
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    return RunTiming(outcome[0] if outcome else ("not started" if not started else "timeout"),
                     seconds, 1000 * max(gaps, default=0.0), len(beats))
