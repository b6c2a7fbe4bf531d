"""Batch robustness review: a folder or CSV of scans -> a report of segmentation consistency.

For every scan the pipeline infers the parents, decodes the counterfactuals by
scanner and by effusion, segments every view and compares each
counterfactual's segmentation with the factual one (Dice, lung-area change).
Scans whose segmentation changes beyond a threshold are flagged.

The run is resumable. Scans are taken in the order of the input list and cut into
batches of at most ``batch_size`` scans and at most ``max_pixels`` pixels; each
finished batch is appended as ONE line to ``REPORT/.journal.jsonl`` and fsync'ed, so
a kill -9 loses at most the batch in flight, and a resumed run re-runs that batch
with the same members (hence bit-identical results). Before a file is decoded, a
``reading`` line names it, and a ``read`` line follows a finished decode: a file
whose decode was interrupted twice (it hung or crashed the process) becomes an
error row on the next run instead of stopping every resume. Decodes run under a
time limit (``decode_timeout_s``) where the reader offers one.

``report.csv``, ``errors.csv`` and ``report.html`` are rebuilt atomically from the
journal at the end (:mod:`pcl_viewer.atomic`), so none is ever half written; a run
that adds to the journal first removes the previous report files, so a report on
disk always covers the whole journal. One process at a time may write a report
folder (:class:`pcl_viewer.atomic.FolderLock`).

The computation is a generator (stardist pattern): :func:`iter_review` yields
:class:`ReviewProgress` and returns a :class:`ReviewSummary`; the CLI wraps it
in tqdm, the napari widget in a ``thread_worker``.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pcl_viewer.review_records import (  # noqa: F401  (re-exported: the review's names)
    BYTES_PER_PIXEL,
    DEFAULT_DECODE_TIMEOUT_S,
    DEFAULT_MAX_PIXELS,
    ERROR_COLUMNS,
    JOURNAL,
    JOURNAL_VERSION,
    REPORT_COLUMNS,
    REPORT_FILES,
    ReviewConfig,
    _num,
    display_text,
    flag_reason,
    load_journal,
    read_journal,
)

SCAN_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz",
)
# A file whose decode was started this many times without finishing (the process hung or
# died while decoding it) is skipped with an error row. Two, not one: a single kill -9
# by the user during an innocent decode must not turn that scan into an error.
MAX_INTERRUPTED_READS = 2


@dataclass
class ReviewProgress:
    """One finished batch: ``done`` of ``total`` scans to do in this run."""

    done: int
    total: int
    records: list[dict[str, Any]]


@dataclass
class ReviewSummary:
    """What a run did: scans processed now, skipped (already in the journal), errors, rate."""

    out: Path
    processed: int
    skipped: int
    errors: int
    flagged: int
    seconds: float
    cpu_seconds: float = float("nan")
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Scans per second over the scans processed by this run."""
        return self.processed / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_per_scan(self) -> float:
        """Process CPU seconds (all threads) per processed scan: the cost on a busy machine."""
        return self.cpu_seconds / self.processed if self.processed else float("nan")


def fixed_mmap_threshold(threshold: int = 2 << 20) -> bool:
    """Serve every allocation of ``threshold`` bytes or more by its own ``mmap`` (glibc only).

    glibc raises its mmap threshold after large blocks are freed (up to 32 MiB), so later
    native-size arrays of a review come from the heap, which fragments and keeps growing:
    six 1600^2 scans in a row raised the peak RSS by 97 MiB instead of 67-82. A fixed
    threshold returns each freed large image to the system at once; 2 MiB keeps the
    arrays of small scans (512^2 float32 = 1 MiB) on the faster heap. Process-wide, so
    the ``pcl review`` command sets it, not the library. Hand-written through ctypes:
    ``mallopt`` has no Python binding, and the ``MALLOC_MMAP_THRESHOLD_`` variable only
    works when set before the process starts. Returns False where it does not apply.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        return bool(libc.mallopt(m_mmap_threshold, int(threshold)))
    except (OSError, AttributeError, TypeError):
        return False


# --------------------------------------------------------------------------- text


# --------------------------------------------------------------------------- inputs


def _is_scan_file(name: str) -> bool:
    return name.lower().endswith(SCAN_SUFFIXES)


def _not_regular(mode: int) -> str:
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a character device" if stat.S_ISCHR(mode) else
            "a block device" if stat.S_ISBLK(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "not a file")
    return f"not a regular file ({kind}); not read"


def discover(source: str | os.PathLike[str]) -> tuple[list[str], list[dict[str, str]]]:
    """List the scans of a folder (recursive) or a CSV with a ``path`` column.

    Symbolic links are followed, but every directory is entered once by its real
    path: a link back to an ancestor (a loop) becomes an error row instead of
    an endless walk. Files reached twice through links are listed once. A scan name
    that is not a regular file (a FIFO, a link to a device) is an error row: it is
    never opened, so it can neither block nor stream forever.

    Returns:
        ``(paths, errors)``: sorted scan paths, and error rows ``{path, stage, error}``.
        Paths are ``str``; undecodable bytes in names are surrogate-escaped (lossless).
    """
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _discover_csv(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{display_text(src)}: neither a folder nor a .csv list of scans")
    paths: list[str] = []
    errors: list[dict[str, str]] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    stack = [src]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            errors.append(_error(folder, "discover", "symbolic link loop: points to "
                                 f"{display_text(real)}, a folder already visited; not followed"))
            continue
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            errors.append(_error(folder, "discover", f"cannot list folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = entry.is_file(follow_symlinks=True)
            except OSError as exc:  # ELOOP on a self-referencing link
                errors.append(_error(path, "discover", f"unreadable link: {exc.strerror or exc}"))
                continue
            if is_dir:
                stack.append(path)
            elif not is_file and _is_scan_file(entry.name):
                try:
                    mode = os.stat(path).st_mode  # follows links
                except OSError:
                    errors.append(_error(path, "discover", "broken or looping symbolic link"))
                    continue
                errors.append(_error(path, "discover", _not_regular(mode)))
            elif is_file and _is_scan_file(entry.name):
                real_file = os.path.realpath(path)
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    paths.append(str(path))
    return sorted(paths), errors


def _discover_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    # utf-8-sig: a list saved by Excel starts with a byte-order mark.
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{display_text(csv_path)}: a scan list needs a column 'path' "
                             f"(found {reader.fieldnames})")
        rows = [r["path"].strip() for r in reader if (r.get("path") or "").strip()]
    paths = [str(p if Path(p).is_absolute() else csv_path.parent / p) for p in rows]
    return list(dict.fromkeys(paths)), []  # keep the CSV's order: it defines the batches


def _error(path: str | os.PathLike[str], stage: str, reason: str) -> dict[str, str]:
    return {"path": os.fsdecode(path), "stage": stage, "error": reason}


def read_for_review(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    timeout_s: float | None = None) -> Any:
    """Read one scan, or return the error row; never raises for a bad file.

    Args:
        path: the file.
        max_pixels: refuse a scan with more pixels (samples, for colour) from its header,
            before decoding: an error row naming its size. None: the reader's side limits.
        timeout_s: time limit of the decode in seconds, in a helper process that is killed
            when it runs over (None or 0: decoded in this process, no limit).
    """
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError

    try:
        scan = read_scan(path, max_pixels=int(max_pixels) if max_pixels else None,
                         timeout_s=float(timeout_s) if timeout_s else None)
    except ScanReadError as exc:
        return _error(path, "read", exc.reason)
    except Exception as exc:  # noqa: BLE001 - a reader bug must not end a review
        return _error(path, "read", f"unexpected {type(exc).__name__}: {exc}")
    h, w = scan.image.shape
    if max_pixels and h * w > max_pixels:
        return _error(path, "read", too_large(h, w, max_pixels))
    if not np.isfinite(scan.image).all():
        return _error(path, "read", "non-finite pixel values (NaN or inf) after reading")
    return scan


def too_large(h: int, w: int, max_pixels: int) -> str:
    """The error of a scan above the review's pixel budget."""
    return (f"{w} x {h} pixels ({h * w / 1e6:.1f} Mpx) is more than the review's pixel budget "
            f"of {max_pixels / 1e6:g} Mpx (--max-megapixels); not reviewed")


# --------------------------------------------------------------------------- journal


def repair_journal(out: Path) -> None:
    """Cut a torn last line (the batch in flight at a kill), so appends start on a new line."""
    path = Path(out) / JOURNAL
    if not path.is_file():
        return
    with open(path, "rb+") as fh:
        data = fh.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            fh.truncate(keep)
            os.fsync(fh.fileno())


_JOURNAL_LOCK = threading.RLock()


def append_journal(out: Path, item: dict[str, Any], sync: bool = True) -> None:
    """Append one JSON line; with ``sync``, fsync it: the line is on disk before we go on.

    Without ``sync`` the line is in the operating system's cache when this returns: it
    survives a kill of this process (what the decode marks guard against), not a power
    cut; the next synced line makes it durable too. JSON escapes every non-ASCII
    character, so a surrogate-escaped file name is stored losslessly. Thread-safe (the
    read-ahead marks decodes from its worker threads).
    """
    line = json.dumps(item, separators=(",", ":"), allow_nan=True) + "\n"
    with _JOURNAL_LOCK, open(Path(out) / JOURNAL, "a", encoding="ascii") as fh:
        fh.write(line)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def _settings_text(s: dict[str, Any]) -> str:
    return (f"--batch-size {s.get('batch_size')}, --max-megapixels "
            f"{(s.get('max_pixels') or 0) / 1e6:g}, interventions {s.get('interventions')}")


def _check_header(out: Path, header: dict[str, Any] | None, want: dict[str, Any]) -> None:
    if header is None:
        append_journal(out, {"header": want})
        return
    if header.get("bundles") != want.get("bundles"):
        raise ValueError(
            f"{display_text(out)} holds a review made with other models "
            f"({header.get('bundles')}); now {want.get('bundles')}. "
            "Use another --out or --restart."
        )
    had, now = header.get("settings"), want.get("settings")
    if had is not None and now is not None and had != now:
        raise ValueError(
            f"{display_text(out)} holds a review made with {_settings_text(had)}; now "
            f"{_settings_text(now)}. Batches are cut by these settings and results depend "
            "on a batch's members (by about 1e-9), so a resume must use the same ones: run "
            "again with them, or use another --out or --restart."
        )


def remove_reports(out: Path) -> None:
    """Remove the report files: about to grow the journal, they would no longer cover it."""
    for name in REPORT_FILES:
        (Path(out) / name).unlink(missing_ok=True)


# --------------------------------------------------------------------------- one batch


def _opt_num(v: Any) -> float | None:
    return None if v is None else _num(v)


def record_of(result: Any, cfg: ReviewConfig) -> dict[str, Any]:
    """JSON record of one ``PipelineResult``: parents, consistency rows, thumbnails if flagged."""
    scan = result.scan
    rows = []
    for c in result.consistency:
        row = {
            "key": getattr(c, "view", ""), "do": getattr(c, "intervention", ""),
            "dice": _num(c.dice), "dice_right": _num(c.dice_right), "dice_left": _num(c.dice_left),
            "area_right_change": _num(c.area_right_change),
            "area_left_change": _num(c.area_left_change),
        }
        rows.append(row)
    probs = result.probabilities or {}
    rec: dict[str, Any] = {
        "path": str(scan.path), "name": scan.name, "status": "ok",
        "shape": list(scan.image.shape),
        "parents": result.parents.to_dict() if result.parents is not None else {},
        "probabilities": {k: _num(v) for k, v in probs.items()},
        "parents_source": result.parents_source, "rows": rows,
        "domain_score": _opt_num(getattr(result, "domain_score", None)),
        "out_of_domain": getattr(result, "out_of_domain", None),
        "warnings": list(getattr(result, "errors", []) or []),
        "notices": [str(n) for n in scan.metadata.get("notices", [])],
    }
    if any(flag_reason(r, cfg) for r in rows):
        from pcl_viewer.review_html import thumbnail

        rec["thumbs"] = {
            key: thumbnail(v.image, v.labels, cfg.thumb_size) for key, v in result.views.items()
        }
    return rec


def _run_batch(pipeline: Any, items: list[tuple[str, Any]], cfg: ReviewConfig
               ) -> list[dict[str, Any]]:
    """Records of ``(path, scan)`` pairs; if the batch fails, each scan alone, so one bad
    scan costs one error row, not the batch."""
    import torch

    torch.manual_seed(0)  # any sampling in the models repeats exactly on resume
    try:
        results = pipeline.run_batch([s for _, s in items], interventions=cfg.interventions,
                                     chromap=False, batch_size=cfg.batch_size)
        return [record_of(r, cfg) | {"path": p} for (p, _), r in zip(items, results)]
    except Exception:  # noqa: BLE001
        if len(items) == 1:
            raise
    records = []
    for item in items:
        try:
            records.extend(_run_batch(pipeline, [item], cfg))
        except Exception as exc:  # noqa: BLE001 - a model failure on one scan is its error row
            records.append(_error(item[0], "pipeline", f"{type(exc).__name__}: {exc}")
                           | {"status": "error"})
    return records


# --------------------------------------------------------------------------- read-ahead


def _pixels(item: Any) -> int:
    """Pixels held by a decoded scan (0 for an error row)."""
    return 0 if isinstance(item, dict) else int(item.image.size)


class _ReadAhead:
    """Decodes files in input order on ``workers`` threads, ahead of the models, within
    the pixel budget.

    ``held`` counts the pixels handed to the caller and not yet released (the batch
    being built or in the models). A new decode starts only while fewer than ``workers``
    run and ``held`` + decoded-but-waiting + the decodes in flight stay within the budget,
    each decode in flight counted as the largest scan seen so far in this run (at least a
    quarter of the budget, since its size is unknown until decoded). The caller's own
    request (:meth:`next` on an empty queue) always starts one decode.

    Every decode is journalled before it starts (``reading``) and after it ends
    (``read``), from the thread that starts or ends it.
    """

    def __init__(self, paths: Sequence[str], read: Callable[[str], Any],
                 mark: Callable[[list[str], list[str]], None], budget: int, workers: int,
                 max_queue: int) -> None:
        self.paths, self.read, self.mark = list(paths), read, mark
        self.budget, self.workers, self.max_queue = budget, max(1, workers), max(1, max_queue)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pcl-read")
        self.lock = threading.RLock()
        self.queue: deque[tuple[str, Future[Any]]] = deque()
        self.next_index = 0
        self.held = 0
        self.largest = 0
        self.closed = False
        self.error: BaseException | None = None
        self._finished: list[str] = []

    def _start(self, forced: bool = False) -> None:
        """Submit as many decodes as the budget allows (lock held by the caller)."""
        new: list[str] = []
        while self.next_index < len(self.paths) and not self.closed:
            waiting = sum(_pixels(f.result()) for _, f in self.queue if f.done())
            running = sum(not f.done() for _, f in self.queue) + len(new)
            reserve = max(self.largest, self.budget // 4)
            fits = (running < self.workers and len(self.queue) + len(new) < self.max_queue
                    and self.held + waiting + (running + 1) * reserve <= self.budget)
            if not (fits or (forced and not self.queue and not new)):
                break
            new.append(self.paths[self.next_index])
            self.next_index += 1
        done, self._finished = self._finished, []
        if new or done:
            self.mark(new, done)  # journalled before the decodes start
        futures = [(path, self.pool.submit(self.read, path)) for path in new]
        self.queue.extend(futures)  # in order, before a callback can start more decodes
        for path, fut in futures:
            fut.add_done_callback(functools.partial(self._on_done, path))

    def _on_done(self, path: str, fut: Future[Any]) -> None:
        with self.lock:
            try:
                if not fut.cancelled() and fut.exception() is None:
                    self.largest = max(self.largest, _pixels(fut.result()))
                    self._finished.append(path)
                self._start()
            except BaseException as exc:  # noqa: BLE001 - e.g. a full disk: raised by next()
                self.error = exc

    def next(self) -> tuple[str, Any] | None:
        """The next ``(path, Scan or error row)`` in input order, or None at the end.

        Its pixels count as held until :meth:`release`.
        """
        with self.lock:
            if self.error is not None:
                raise self.error
            if not self.queue:
                self._start(forced=True)
            if not self.queue:
                return None
            path, fut = self.queue[0]
        item = fut.result()
        with self.lock:
            self.queue.popleft()
            self.held += _pixels(item)
            self._start()
        return path, item

    def release(self, pixels: int) -> None:
        """The caller is done with ``pixels`` (a journalled batch): read further."""
        with self.lock:
            self.held -= pixels
            self._start()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)


def _batches(ahead: _ReadAhead, cfg: ReviewConfig
             ) -> Generator[tuple[list[tuple[str, Any]], int], None, None]:
    """Consecutive batches of ``(path, Scan or error row)``: at most ``cfg.batch_size``
    files and ``cfg.max_pixels`` pixels each. The cut depends only on the input order and
    the scan sizes, so a resumed run cuts the remaining scans as the first run did."""
    batch: list[tuple[str, Any]] = []
    px = 0
    while True:
        nxt = ahead.next()
        if nxt is None:
            break
        path, item = nxt
        n = _pixels(item)
        if batch and (len(batch) >= cfg.batch_size or px + n > cfg.max_pixels):
            yield batch, px
            batch, px = [], 0
        batch.append((path, item))
        px += n
    if batch:
        yield batch, px


# --------------------------------------------------------------------------- the run


def iter_review(
    source: str | os.PathLike[str] | Sequence[str],
    out: str | os.PathLike[str],
    pipeline: Any,
    cfg: ReviewConfig | None = None,
    bundles: dict[str, Any] | None = None,
    cancel: Any = None,
    restart: bool = False,
) -> Generator[ReviewProgress, None, ReviewSummary]:
    """Review ``source`` (folder, CSV, or list of paths) into ``out``; resumes a journal.

    Yields a :class:`ReviewProgress` after each journaled batch; returns a
    :class:`ReviewSummary` after writing the report files. ``cancel()`` -> bool is
    polled between batches (the journal keeps what is done). ``restart`` discards the
    journal and the reports of ``out`` first (under the folder's lock).

    Raises:
        pcl_viewer.atomic.LockedError: another process is writing ``out``.
        ValueError: ``out`` holds a journal made with other models or settings.
        OSError: writing failed (e.g. a full disk: :func:`pcl_viewer.atomic.disk_full`).
    """
    from pcl_viewer.atomic import FolderLock

    cfg = cfg or ReviewConfig()
    out = Path(out)
    lock = FolderLock(out).acquire()  # creates out; refuses at once if another writer holds it
    try:
        if restart:
            remove_reports(out)
            (out / JOURNAL).unlink(missing_ok=True)
        summary = yield from _review_locked(source, out, pipeline, cfg, bundles, cancel)
    finally:
        lock.release()
    return summary


def _review_locked(source: Any, out: Path, pipeline: Any, cfg: ReviewConfig,
                   bundles: dict[str, Any] | None, cancel: Any
                   ) -> Generator[ReviewProgress, None, ReviewSummary]:
    if isinstance(source, (str, os.PathLike)):
        paths, found_errors = discover(source)
    else:
        paths, found_errors = [os.fsdecode(p) for p in source], []
    repair_journal(out)
    header, done_records, interrupted = read_journal(out)
    _check_header(out, header, {"version": JOURNAL_VERSION, "bundles": bundles or {},
                                "source": [os.fsdecode(source)]
                                if isinstance(source, (str, os.PathLike)) else "list",
                                "settings": cfg.settings()})
    finished = {r["path"] for r in done_records}
    new_errors = [e | {"status": "error"} for e in found_errors if e["path"] not in finished]
    for p in paths:  # decodes that hung or crashed the process: skipped with an error row
        if p not in finished and interrupted.get(p, 0) >= MAX_INTERRUPTED_READS:
            new_errors.append(_error(p, "read", (
                f"decoding this file was started {interrupted[p]} times and never finished "
                "(the review hung or was killed while reading it); skipped")) | {"status": "error"})
    todo = [p for p in paths if p not in finished and p not in {e["path"] for e in new_errors}]
    if new_errors or todo:
        remove_reports(out)  # the journal grows: an older report would no longer cover it
    if new_errors:
        append_journal(out, {"batch": new_errors})
    total = len(todo)
    skipped = len(paths) - total
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    yield ReviewProgress(done=0, total=total, records=[])  # the bar knows its length now

    def read(path: str) -> Any:
        return read_for_review(path, cfg.max_pixels, cfg.decode_timeout_s)

    def mark(starting: list[str], finished_reads: list[str]) -> None:
        item: dict[str, Any] = {}
        if finished_reads:
            item["read"] = finished_reads
        if starting:
            item["reading"] = starting
        append_journal(out, item, sync=False)  # written before the decode: a kill keeps it

    ahead = _ReadAhead(todo, read, mark, cfg.max_pixels, cfg.read_workers,
                       max_queue=2 * cfg.batch_size + cfg.read_workers)
    try:
        for batch, px in _batches(ahead, cfg):
            if cancel is not None and cancel():
                break
            items = batch
            pairs = [(p, s) for p, s in items if not isinstance(s, dict)]
            by_path = {r["path"]: r for r in (_run_batch(pipeline, pairs, cfg) if pairs else [])}
            records = [s | {"status": "error"} if isinstance(s, dict) else by_path[p]
                       for p, s in items]
            # Wall and CPU clocks let a rate be read from a journal of an interrupted run.
            append_journal(out, {"batch": records, "t": round(time.time(), 3),
                                 "cpu": round(time.process_time() - c0, 3)})
            done += len(batch)
            del items, pairs, by_path, batch
            ahead.release(px)
            yield ReviewProgress(done=done, total=total, records=records)
    finally:
        ahead.close()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    files = finalize(out, cfg)
    _, all_records = load_journal(out)
    return ReviewSummary(
        out=out, processed=done, skipped=skipped, seconds=seconds, cpu_seconds=cpu, files=files,
        errors=sum(r.get("status") == "error" for r in all_records),
        flagged=sum(any(flag_reason(x, cfg) for x in r.get("rows", [])) for r in all_records),
    )


def run_review(*args: Any, **kwargs: Any) -> ReviewSummary:
    """Drain :func:`iter_review` (no progress) and return its summary."""
    gen = iter_review(*args, **kwargs)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            summary: ReviewSummary = stop.value
            return summary


# --------------------------------------------------------------------------- outputs


def finalize(out: str | os.PathLike[str], cfg: ReviewConfig | None = None) -> dict[str, Path]:
    """Rewrite report.csv, errors.csv and report.html from the journal (each atomically)."""
    from pcl_viewer.review_html import write_reports

    return write_reports(out, cfg or ReviewConfig())


def merge(reports: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
          cfg: ReviewConfig | None = None) -> dict[str, Path]:
    """Merge the journals of several review folders (shards) into ``out`` and finalize it.

    A scan present in several shards keeps its first record. All shards must have used
    the same models (their journal headers name the bundles).
    """
    from pcl_viewer.atomic import FolderLock

    out = Path(out)
    with FolderLock(out):
        return _merge_locked(reports, out, cfg)


def _merge_locked(reports: Sequence[str | os.PathLike[str]], out: Path,
                  cfg: ReviewConfig | None) -> dict[str, Path]:
    from pcl_viewer.atomic import atomic_write_text

    merged: dict[str, dict[str, Any]] = {}
    first_header = None
    for rep in reports:
        header, records = load_journal(rep)
        if header is None and not records:
            raise FileNotFoundError(f"{display_text(rep)}: no review journal ({JOURNAL})")
        first_header = first_header or header
        if header and first_header and header.get("bundles") != first_header.get("bundles"):
            raise ValueError(f"{display_text(rep)}: made with other models than "
                             f"{display_text(reports[0])}; not merged")
        for rec in records:
            merged.setdefault(rec["path"], rec)
    lines = [json.dumps({"header": (first_header or {}) | {"merged_from": [str(r) for r in reports]}})]
    lines.append(json.dumps({"batch": list(merged.values())}, separators=(",", ":")))
    remove_reports(out)
    atomic_write_text(out / JOURNAL, "\n".join(lines) + "\n")
    return finalize(out, cfg)
