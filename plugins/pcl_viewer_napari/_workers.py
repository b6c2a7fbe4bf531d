"""Running a pipeline generator off the Qt thread (stardist-napari pattern).

:func:`start` runs a generator in a napari ``thread_worker``: each yielded
value goes to ``on_yield`` in the Qt thread (progress bar, layer builder) and
the outcome to ``on_done(status, value)`` with status ``"ok"`` (value: the
generator's return value), ``"cancelled"`` or ``"error"`` (value: the
exception). Exceptions never escape the worker, so napari's traceback dialog
never replaces our readable message. ``PCL_VIEWER_SYNC=1`` runs the same
generator inline in the calling thread, for debugging and for timing.

Either way the run uses :func:`worker_threads` torch threads (one fewer than the
cores): on a 2-core machine two OpenMP threads beside the Qt thread and the
software-GL raster threads are oversubscribed, and every one of the thousands of
small parallel regions in a 128 px network waits at its barrier for a thread that
lost its core. The same count in both modes keeps ``PCL_VIEWER_SYNC=1`` a faithful
replay of a worker run (timing and numerics).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from typing import Any

from pcl_viewer.device import limited_threads, thread_count
from pcl_viewer.pipeline import Cancelled

Outcome = tuple[str, Any]


def synchronous() -> bool:
    return os.environ.get("PCL_VIEWER_SYNC", "").strip().lower() not in ("", "0", "false", "no")


def worker_threads() -> int:
    """Torch intra-op threads for a run started from the widget.

    ``$PCL_VIEWER_WORKER_THREADS`` if set, else :func:`pcl_viewer.device.thread_count`
    with one core reserved: one fewer than the usable cores (at least one, at most
    ``$PCL_VIEWER_THREADS``), so the Qt thread keeps a core to paint.
    """
    env = os.environ.get("PCL_VIEWER_WORKER_THREADS", "").strip()
    if env:
        return max(1, int(env))
    return thread_count(gui_reserve=1)


def with_worker_threads(gen: Generator[Any, None, Any]) -> Generator[Any, None, Any]:
    """``gen`` run with :func:`worker_threads` torch threads in the thread that iterates it."""
    with limited_threads(worker_threads()):
        return (yield from gen)


def guarded(gen: Generator[Any, None, Any]) -> Generator[Any, None, Outcome]:
    """Yield from ``gen`` and return its outcome instead of raising."""
    try:
        value = yield from gen
    except Cancelled:
        return ("cancelled", None)
    except Exception as exc:  # reported to the user by on_done, never re-raised
        return ("error", exc)
    return ("ok", value)


class SyncWorker:
    """The bit of napari's GeneratorWorker interface the widget uses, for inline runs."""

    is_running = False

    def quit(self) -> None:  # the widget's cancel flag stops the generator
        pass


def start(gen_fn: Callable[[], Generator[Any, None, Any]], *,
          on_yield: Callable[[Any], None], on_done: Callable[[str, Any], None]):
    """Run ``gen_fn()`` in a worker thread (inline when :func:`synchronous`); returns the worker."""
    if synchronous():
        worker = SyncWorker()
        gen = guarded(with_worker_threads(gen_fn()))
        while True:
            try:
                on_yield(next(gen))
            except StopIteration as stop:
                on_done(*stop.value)
                return worker

    from napari.qt.threading import GeneratorWorker, create_worker

    def job():
        return (yield from guarded(with_worker_threads(gen_fn())))

    return create_worker(job, _worker_class=GeneratorWorker, _start_thread=True,
                         _connect={"yielded": on_yield,
                                   "returned": lambda out: on_done(*out)})
