"""Handing a worker's partial results to the Qt thread in short, paced event-loop turns.

A worker can yield faster than layers are built, and every layer change costs a
repaint: with napari's OpenGL canvas in the window, a repaint composites the whole
window through OpenGL and redraws every visible layer. With software GL (llvmpipe)
that is 50-300 ms of CPU, much of it in Python (napari's window ``event()``, vispy's
draw) holding the GIL, so on a 2-core machine a worker stalls during each one.

So results are queued and handled by a timer in turns. A turn handles queued items
until :data:`TURN_BUDGET_S` of work is done (results that arrive together share one
repaint). The next turn waits until the Qt thread's share of the time since the last
turn began, its work and the repaint that followed, is down to :data:`GUI_SHARE`: a
turn of ~20 ms (hardware GL) allows one every ~0.2 s, one of ~300 ms (software GL
under load) one every ~3 s, and the worker keeps the CPU. Between turns the event
loop runs timers, input and paints. Once the last item of a run is queued the worker
is done, and the turns follow each other at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, QTimer

TURN_BUDGET_S = 0.05
# While the Qt thread repaints it holds the GIL and the worker stalls, so a run takes
# about 1 / (1 - GUI_SHARE) times as long as with a frozen window: 0.1 keeps it ~1.1x.
GUI_SHARE = 0.1


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
        self._next_turn = 0.0  # perf_counter() before which no turn starts (unless hurried)
        self._turn_start = 0.0
        self._settling = 0  # event-loop iterations left to measure the last turn's repaint
        self._hurry = False  # the last item is queued: no pacing until the queue is empty
        self.timings: list[tuple[str, float]] = []
        # Timer objects, not QTimer.singleShot(ms, callable): see _compat.
        self._timer = QTimer(self, singleShot=True, interval=0)
        self._timer.timeout.connect(self._turn)
        self._settle_timer = QTimer(self, singleShot=True, interval=0)
        self._settle_timer.timeout.connect(self._settle)

    def put(self, label: str, func: Callable[..., None], *args: Any, inline: bool = False,
            last: bool = False) -> None:
        """Queue ``func(*args)``; ``inline``: run everything queued now, in order; ``last``:
        nothing more comes (the worker is done), so drain without spacing the turns."""
        self._queue.append((label, func, args))
        self._hurry = self._hurry or last
        if last and self._scheduled and not self._settling:
            self._timer.start(0)
        if inline:
            while self._queue:
                self._call(*self._queue.popleft())
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._settling or self._scheduled:  # _settle schedules when it is done
            return
        self._scheduled = True
        wait = 0.0 if self._hurry else self._next_turn - time.perf_counter()
        self._timer.start(max(0, int(1000 * wait)))

    def drop(self, which: Callable[[str], bool]) -> int:
        """Remove the queued calls whose label ``which`` accepts; returns how many."""
        keep = deque(item for item in self._queue if not which(item[0]))
        dropped = len(self._queue) - len(keep)
        self._queue = keep
        return dropped

    def __len__(self) -> int:
        return len(self._queue)

    def _call(self, label: str, func: Callable[..., None], args: tuple[Any, ...]) -> None:
        t0 = time.perf_counter()
        func(*args)
        self.timings.append((label, time.perf_counter() - t0))

    def _turn(self) -> None:
        self._scheduled = False
        self._turn_start = start = time.perf_counter()
        while self._queue:  # at least one item, then more while the budget lasts
            self._call(*self._queue.popleft())
            if time.perf_counter() - start >= TURN_BUDGET_S:
                break
        if self._after_turn is not None:
            self._after_turn()
        # The repaint this turn asked for runs in a later event-loop iteration: two
        # hops of a 0 ms timer see it done, whatever order Qt picks within one.
        self._settling = 2
        self._settle_timer.start()

    def _settle(self) -> None:
        self._settling -= 1
        if self._settling > 0:
            self._settle_timer.start()
            return
        busy = time.perf_counter() - self._turn_start  # the turn's work and its repaint
        self._next_turn = self._turn_start + busy / GUI_SHARE
        if self._queue:
            self._schedule()
        else:
            self._hurry = False
