"""Handing a worker's partial results to the Qt thread in short event-loop turns.

A worker can yield faster than layers are built. Its results are queued and
handled by a 0 ms timer, several per turn until :data:`TURN_BUDGET_S` of work is
done, so that timers, paints and input run between turns instead of after a
burst, and so that results arriving together cost one repaint. With napari's
OpenGL canvas in the window every repaint of any widget composites the whole
window through OpenGL: with software GL, tens of ms of the Qt thread and of the
raster threads, taken from the worker on a 2-core machine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, QTimer

TURN_BUDGET_S = 0.03


class UiQueue(QObject):
    """Calls queued in the Qt thread, a few per event-loop turn (or at once when ``inline``).

    ``after_turn`` runs at the end of every turn (e.g. to show the progress, which then
    shares the turn's repaint). ``timings`` lists ``(label, seconds)`` of each call.
    """

    def __init__(self, parent: QObject, after_turn: Callable[[], None] | None = None) -> None:
        super().__init__(parent)
        self._queue: deque[tuple[str, Callable[..., None], tuple[Any, ...]]] = deque()
        self._after_turn = after_turn
        self._scheduled = False
        self.timings: list[tuple[str, float]] = []
        # A timer object, not QTimer.singleShot(ms, callable): see _compat.
        self._timer = QTimer(self, singleShot=True, interval=0)
        self._timer.timeout.connect(self._turn)

    def put(self, label: str, func: Callable[..., None], *args: Any, inline: bool = False) -> None:
        """Queue ``func(*args)``; ``inline``: run everything queued now, in order."""
        self._queue.append((label, func, args))
        if inline:
            while self._queue:
                self._call(*self._queue.popleft())
        elif not self._scheduled:
            self._scheduled = True
            self._timer.start()

    def __len__(self) -> int:
        return len(self._queue)

    def _call(self, label: str, func: Callable[..., None], args: tuple[Any, ...]) -> None:
        t0 = time.perf_counter()
        func(*args)
        self.timings.append((label, time.perf_counter() - t0))

    def _turn(self) -> None:
        self._scheduled = False
        start = time.perf_counter()
        while self._queue and time.perf_counter() - start < TURN_BUDGET_S:
            self._call(*self._queue.popleft())
        if self._after_turn is not None:
            self._after_turn()
        if self._queue and not self._scheduled:
            self._scheduled = True
            self._timer.start()
