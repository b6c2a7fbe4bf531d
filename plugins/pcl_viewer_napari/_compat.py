"""Work-arounds for the Qt binding, applied once when the plugin's widgets are imported."""

from __future__ import annotations

import sys


def guard_none_refcount() -> list | None:
    """PySide6 6.12 drops references to None it does not own: once per
    ``QTimer.singleShot(ms, callable)`` and a few times per napari layer update or
    worker yield (measured: about -25 per ``layer.data = ...``). On Python 3.11 None
    is not immortal, so a long session (or a test suite) ends in "Fatal Python error:
    none_dealloc" during garbage collection. Holding two million extra references
    (16 MB) keeps None alive for about 80,000 layer updates. Hence also: the plugin
    uses QTimer objects, never ``QTimer.singleShot(ms, callable)``."""
    try:
        from qtpy import API_NAME
    except ImportError:
        return None
    if API_NAME != "PySide6" or sys.version_info >= (3, 12):  # 3.12+: None is immortal
        return None
    import PySide6

    # The `pyside6` extra pins PySide6 < 6.12; the guard is for environments that bring 6.12.
    if tuple(int(v) for v in PySide6.__version__.split(".")[:2]) < (6, 12):
        return None
    return [None] * 2_000_000


NONE_REFS = guard_none_refcount()
