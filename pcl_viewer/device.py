"""Devices and threads, decided in one place (micro-sam pattern).

* :func:`resolve_device` turns a ``--device`` value (``auto``, ``cpu``, ``cuda``,
  ``cuda:N``, ``mps`` or a ``torch.device``) into a ``torch.device``; ``auto`` means
  cuda, else mps, else cpu, unless a :func:`default_device` block says otherwise.
* :func:`configure_threads` sizes torch's intra-op pool once per process;
  :func:`limited_threads` sets it for one block and restores it.
* :func:`prepare_for_inference` puts a network in eval mode on its device, in the memory
  layout every inference path (GUI, ``pcl review``, ``pcl cf``) uses.

torch is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")

_AUTO_DEVICE: str | None = None  # what "auto" means inside a ``default_device`` block


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
    """``"auto"`` -> cuda, else mps, else cpu. An explicit unavailable choice raises ValueError.

    The kind only (no ``:N`` index); :func:`resolve_device` is the full resolver.
    """
    pref = (pref or "auto").lower()
    if pref not in DEVICES:
        raise ValueError(f"unknown device {pref!r}; choose one of {', '.join(DEVICES)}")
    avail = available_devices()
    if pref == "auto":
        return avail[0]
    if pref not in avail:
        raise ValueError(f"device {pref!r} is not available here (available: {', '.join(avail)})")
    return pref


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` of a device argument.

    ``"auto"`` (or None) is cuda if available, else mps, else cpu, unless an enclosing
    :func:`default_device` block names one. Explicit ``"cuda"``, ``"cuda:N"``, ``"mps"``,
    ``"cpu"`` (or a ``torch.device``) must be available here.

    Raises:
        ValueError: unknown or unavailable device (``cuda:N`` with N out of range
            included), naming what is available.
    """
    import torch

    name = str(spec) if spec is not None else "auto"
    if name.lower() == "auto" and _AUTO_DEVICE is not None:
        name = _AUTO_DEVICE
    base, _, index = name.lower().partition(":")
    try:
        chosen = choose_device(base)
    except ValueError as exc:
        hint = (" (a CUDA GPU needs the CUDA wheel of torch: README, 'GPU installation')"
                if base == "cuda" else "")
        raise ValueError(f"{exc}{hint}") from None
    if not index:
        return torch.device(chosen)
    if chosen != "cuda" or not index.isdigit() or int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} is not available here "
                         f"(available: {', '.join(available_devices())}, "
                         f"{torch.cuda.device_count()} CUDA device(s))")
    return torch.device(chosen, int(index))


@contextlib.contextmanager
def default_device(device: str | torch.device | None) -> Iterator[torch.device]:
    """Inside the block, :func:`resolve_device` calls given ``"auto"`` return ``device``
    (resolved now, so an unavailable choice fails here); restored on exit.

    How ``pcl bench --device`` reaches the fine-tuning done deep inside the benchmark
    grid. ``None`` or ``"auto"`` leave "auto" meaning what it meant before.
    """
    global _AUTO_DEVICE
    previous = _AUTO_DEVICE
    dev = resolve_device(device)
    _AUTO_DEVICE = str(dev)
    try:
        yield dev
    finally:
        _AUTO_DEVICE = previous


def device_notice(device: str | torch.device) -> str | None:
    """The persistent notice shown while inference runs on the CPU, else None."""
    if str(device) == "cpu":
        return "Running on the CPU: the small 'cpu' models keep a full run to a few seconds."
    return None


# ------------------------------------------------------------------ threads --


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def thread_count(n: int | None = None, *, gui_reserve: int = 0) -> int:
    """The torch intra-op thread count :func:`configure_threads` would set (nothing is set).

    ``n`` when given; else the usable cores minus ``gui_reserve`` (at least 1).
    ``$PCL_VIEWER_THREADS`` replaces the core count when nothing is reserved, and caps
    it when cores are reserved for a GUI thread.
    """
    if n is not None:
        return max(1, int(n))
    env = os.environ.get("PCL_VIEWER_THREADS", "").strip()
    if gui_reserve <= 0:
        return max(1, int(env)) if env else max(1, usable_cores())
    count = max(1, usable_cores() - gui_reserve)
    return min(count, max(1, int(env))) if env else count


def configure_threads(n: int | None = None, *, gui_reserve: int = 0) -> int:
    """Set torch's intra-op threads (see :func:`thread_count`) and return the count.

    One pool sized to the cores: more threads than cores only adds contention with the
    GUI thread and makes the heartbeat stutter. ``gui_reserve`` cores are left for a
    GUI thread. NumPy's BLAS is kept single-threaded (:func:`_single_threaded_blas`).
    """
    import torch

    n = thread_count(n, gui_reserve=gui_reserve)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    _single_threaded_blas()
    return n


@contextlib.contextmanager
def limited_threads(n: int) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads in the calling thread, then restore.

    OpenMP's thread count is per calling thread: set in a worker thread it leaves the
    GUI thread's count alone. A generator closed by the garbage collector may finish
    in another thread; the count is then left to its owner.
    """
    import torch

    n = max(1, int(n))
    before, owner = torch.get_num_threads(), threading.get_ident()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield n
    finally:
        if n != before and threading.get_ident() == owner:
            torch.set_num_threads(before)


def _single_threaded_blas() -> None:
    """NumPy's OpenBLAS on one thread: the pipeline's matrices are small (65k x 32), and a
    second BLAS pool beside torch's made one such product take ~2.8 s instead of ~5 ms
    on a loaded 2-core machine (threads spinning against each other)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


# ---------------------------------------------------------------- networks --


def prepare_for_inference(module: torch.nn.Module, device: str | torch.device,
                          *, channels_last: bool | None = None) -> torch.nn.Module:
    """``module`` in eval mode on ``device`` (resolved by :func:`resolve_device`).

    ``channels_last`` (None: on the CPU): NHWC weights, with which oneDNN's convolutions
    (transposed ones above all) run ~1.4x faster on the CPU; labels are unchanged and
    images differ by < 1e-7. Every inference path loads its networks through here, so
    the viewer, ``pcl review`` and ``pcl cf`` compute the same numbers.
    """
    import torch

    dev = resolve_device(device)
    if channels_last is None:
        channels_last = dev.type == "cpu"
    if channels_last:
        module = module.to(dev, memory_format=torch.channels_last)  # type: ignore[call-overload]
    else:
        module = module.to(dev)
    return module.eval()
