"""Choosing the torch device once, and telling the user about it (micro-sam pattern)."""

from __future__ import annotations

import os

DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")


def available_devices() -> list[str]:
    """Devices torch can use here, best first (always ends with ``"cpu"``)."""
    import torch

    found = []
    if torch.cuda.is_available():
        found.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return [*found, "cpu"]


def choose_device(pref: str | None = "auto") -> str:
    """``"auto"`` -> cuda, else mps, else cpu. An explicit unavailable choice raises ValueError."""
    pref = (pref or "auto").lower()
    if pref not in DEVICES:
        raise ValueError(f"unknown device {pref!r}; choose one of {', '.join(DEVICES)}")
    avail = available_devices()
    if pref == "auto":
        return avail[0]
    if pref not in avail:
        raise ValueError(f"device {pref!r} is not available here (available: {', '.join(avail)})")
    return pref


def device_notice(device: str) -> str | None:
    """The persistent notice shown while inference runs on the CPU, else None."""
    if device == "cpu":
        return "Running on the CPU: the small 'cpu' models keep a full run to a few seconds."
    return None


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (``$PCL_VIEWER_THREADS`` or the usable cores) and return it.

    One pool sized to the cores: more threads than cores only adds contention with
    the GUI thread and makes the heartbeat stutter.
    """
    import torch

    if n is None:
        env = os.environ.get("PCL_VIEWER_THREADS")
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # macOS / Windows
            cores = os.cpu_count() or 1
        n = int(env) if env else max(1, cores)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _single_threaded_blas()
    return n


def _single_threaded_blas() -> None:
    """NumPy's OpenBLAS on one thread: the pipeline's matrices are small (65k x 32), and a
    second BLAS pool beside torch's made one such product take ~2.8 s instead of ~5 ms
    on a loaded 2-core machine (threads spinning against each other)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=1, user_api="blas")
