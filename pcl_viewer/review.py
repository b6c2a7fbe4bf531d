"""Batch robustness review: a folder or CSV of scans -> a report of segmentation consistency.

For every scan the pipeline infers the parents, decodes the counterfactuals by
scanner and by effusion, segments every view and compares each
counterfactual's segmentation with the factual one (Dice, lung-area change).
Scans whose segmentation changes beyond a threshold are flagged.

The run is resumable. Scans are cut into fixed batches over the ordered list
of inputs; each finished batch is appended as ONE line to ``REPORT/.journal.jsonl``
and fsync'ed, so a kill -9 loses at most the batch in flight, and a resumed
run re-runs that batch with the same composition (hence bit-identical results).
``report.csv``, ``errors.csv`` and ``report.html`` are rebuilt atomically from
the journal at the end (temp file + rename), so none is ever half written.

The computation is a generator (stardist pattern): :func:`iter_review` yields
:class:`ReviewProgress` and returns a :class:`ReviewSummary`; the CLI wraps it
in tqdm, the napari widget in a ``thread_worker``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCAN_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz",
)
JOURNAL = ".journal.jsonl"
JOURNAL_VERSION = 1
REPORT_COLUMNS: tuple[str, ...] = (
    "path", "name", "height", "width", "scanner", "sex", "effusion", "p_scanner", "p_sex",
    "p_effusion", "parents_source", "intervention", "do", "dice", "dice_right", "dice_left",
    "area_right_change", "area_left_change", "flagged", "flag_reason",
)
ERROR_COLUMNS: tuple[str, ...] = ("path", "stage", "error")


@dataclass
class ReviewConfig:
    """Settings of one review.

    threshold: flag a counterfactual whose mean lung Dice vs the factual is below it.
    area_threshold: flag when |lung-area change| of either lung exceeds it (a fraction).
    batch_size: scans per pipeline batch, and per journal line.
    read_workers: threads decoding files while the model runs on the previous batch.
    thumb_size: longest side (px) of the thumbnails stored for flagged scans.
    """

    threshold: float = 0.9
    area_threshold: float = 0.1
    batch_size: int = 16
    interventions: tuple[str, ...] = ("scanner", "effusion")
    read_workers: int = 2
    thumb_size: int = 96


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


# --------------------------------------------------------------------------- inputs


def _is_scan_file(name: str) -> bool:
    return name.lower().endswith(SCAN_SUFFIXES)


def discover(source: str | os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """List the scans of a folder (recursive) or a CSV with a ``path`` column.

    Symbolic links are followed, but every directory is entered once by its real
    path: a link back to an ancestor (a loop) becomes an error row instead of
    an endless walk. Files reached twice through links are listed once.

    Returns:
        ``(paths, errors)``: sorted scan paths, and error rows ``{path, stage, error}``.
    """
    src = Path(source)
    if src.is_file() and src.suffix.lower() == ".csv":
        return _discover_csv(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: neither a folder nor a .csv list of scans")
    paths: list[str] = []
    errors: list[dict[str, str]] = []
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    stack = [src]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            errors.append(_error(folder, "discover", f"symbolic link loop: points to {real}, "
                                 "a folder already visited; not followed"))
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
            elif entry.is_symlink() and not is_file and _is_scan_file(entry.name):
                errors.append(_error(path, "discover", "broken or looping symbolic link"))
            elif is_file and _is_scan_file(entry.name):
                real_file = os.path.realpath(path)
                if real_file not in seen_files:
                    seen_files.add(real_file)
                    paths.append(str(path))
    return sorted(paths), errors


def _discover_csv(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: a scan list needs a column 'path' "
                             f"(found {reader.fieldnames})")
        rows = [r["path"].strip() for r in reader if (r.get("path") or "").strip()]
    paths = [str(p if Path(p).is_absolute() else csv_path.parent / p) for p in rows]
    return list(dict.fromkeys(paths)), []  # keep the CSV's order: it defines the shard


def _error(path: str | os.PathLike, stage: str, reason: str) -> dict[str, str]:
    return {"path": str(path), "stage": stage, "error": reason}


def read_for_review(path: str):
    """Read one scan, or return the error row; never raises for a bad file."""
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError

    try:
        scan = read_scan(path)
    except ScanReadError as exc:
        return _error(path, "read", exc.reason)
    except Exception as exc:  # noqa: BLE001 - a reader bug must not end a review
        return _error(path, "read", f"unexpected {type(exc).__name__}: {exc}")
    if not np.isfinite(scan.image).all():
        return _error(path, "read", "non-finite pixel values (NaN or inf) after reading")
    return scan


# --------------------------------------------------------------------------- journal


def load_journal(out: str | os.PathLike) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and scan records of a journal. A torn last line (a kill mid-write) is dropped."""
    path = Path(out) / JOURNAL
    header, records = None, []
    if not path.is_file():
        return header, records
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # the batch in flight when the process died
            if "header" in item:
                header = header or item["header"]
            records.extend(item.get("batch", []))
    unique = {}
    for rec in records:  # a scan journaled twice (a merge, a re-run) keeps its first record
        unique.setdefault(rec["path"], rec)
    return header, list(unique.values())


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


def append_journal(out: Path, item: dict[str, Any]) -> None:
    """Append one JSON line and fsync: the line is on disk before we go on."""
    line = json.dumps(item, separators=(",", ":"), allow_nan=True) + "\n"
    with open(out / JOURNAL, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def _check_header(out: Path, header: dict[str, Any] | None, want: dict[str, Any]) -> None:
    if header is None:
        append_journal(out, {"header": want})
        return
    if header.get("bundles") != want.get("bundles"):
        raise ValueError(
            f"{out} holds a review made with other models ({header.get('bundles')}); "
            f"now {want.get('bundles')}. Use another --out or --restart."
        )


# --------------------------------------------------------------------------- one batch


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def flag_reason(row: dict[str, Any], cfg: ReviewConfig) -> str:
    """Why a consistency row is flagged ("" if it is not)."""
    dice = _num(row.get("dice"))
    areas = [_num(row.get(k)) for k in ("area_right_change", "area_left_change")]
    reasons = []
    if not math.isfinite(dice) or dice < cfg.threshold:
        reasons.append(f"dice {dice:.3f} < {cfg.threshold:g}")
    if any(not math.isfinite(a) for a in areas):
        reasons.append("no factual lung area")
    elif max(abs(a) for a in areas) > cfg.area_threshold:
        reasons.append(f"area change {max(areas, key=abs):+.1%}")
    return "; ".join(reasons)


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


# --------------------------------------------------------------------------- the run


def iter_review(
    source: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    pipeline: Any,
    cfg: ReviewConfig | None = None,
    bundles: dict[str, Any] | None = None,
    cancel: Any = None,
) -> Generator[ReviewProgress, None, ReviewSummary]:
    """Review ``source`` (folder, CSV, or list of paths) into ``out``; resumes a journal.

    Yields a :class:`ReviewProgress` after each journaled batch; returns a
    :class:`ReviewSummary` after writing the report files. ``cancel()`` -> bool is
    polled between batches (the journal keeps what is done).
    """
    cfg = cfg or ReviewConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (str, os.PathLike)):
        paths, found_errors = discover(source)
    else:
        paths, found_errors = [str(p) for p in source], []
    repair_journal(out)
    header, done_records = load_journal(out)
    _check_header(out, header, {"version": JOURNAL_VERSION, "bundles": bundles or {},
                                "source": [str(source)] if isinstance(source, (str, os.PathLike))
                                else "list"})
    finished = {r["path"] for r in done_records}
    new_errors = [e | {"status": "error"} for e in found_errors if e["path"] not in finished]
    if new_errors:
        append_journal(out, {"batch": new_errors})
    # Batches are fixed slices of the full ordered list: a resumed batch has the same members.
    batches = [paths[i:i + cfg.batch_size] for i in range(0, len(paths), cfg.batch_size)]
    todo = [b for b in batches if any(p not in finished for p in b)]
    total = sum(len(b) for b in todo)
    skipped = len(paths) - total
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    yield ReviewProgress(done=0, total=total, records=[])  # the bar knows its length now
    with ThreadPoolExecutor(max(1, cfg.read_workers)) as pool:
        pending: list[Future] | None = None
        for i in range(len(todo)):
            if cancel is not None and cancel():
                break
            pending = pending or [pool.submit(read_for_review, p) for p in todo[i]]
            items = [f.result() for f in pending]
            # Prefetch the next batch while the models work on this one.
            pending = ([pool.submit(read_for_review, p) for p in todo[i + 1]]
                       if i + 1 < len(todo) else None)
            pairs = [(p, s) for p, s in zip(todo[i], items) if not isinstance(s, dict)]
            by_path = {r["path"]: r for r in (_run_batch(pipeline, pairs, cfg) if pairs else [])}
            batch = [s | {"status": "error"} if isinstance(s, dict) else by_path[p]
                     for p, s in zip(todo[i], items)]
            # Wall and CPU clocks let a rate be read from a journal of an interrupted run.
            append_journal(out, {"batch": batch, "t": round(time.time(), 3),
                                 "cpu": round(time.process_time() - c0, 3)})
            done += len(todo[i])
            del items, pairs, by_path
            yield ReviewProgress(done=done, total=total, records=batch)
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
            return stop.value


# --------------------------------------------------------------------------- outputs


def finalize(out: str | os.PathLike, cfg: ReviewConfig | None = None) -> dict[str, Path]:
    """Rewrite report.csv, errors.csv and report.html from the journal (each atomically)."""
    from pcl_viewer.review_html import write_reports

    return write_reports(out, cfg or ReviewConfig())


def merge(reports: Sequence[str | os.PathLike], out: str | os.PathLike,
          cfg: ReviewConfig | None = None) -> dict[str, Path]:
    """Merge the journals of several review folders (shards) into ``out`` and finalize it.

    A scan present in several shards keeps its first record. All shards must have used
    the same models (their journal headers name the bundles).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    merged: dict[str, dict[str, Any]] = {}
    first_header = None
    for rep in reports:
        header, records = load_journal(rep)
        if header is None and not records:
            raise FileNotFoundError(f"{rep}: no review journal ({JOURNAL})")
        first_header = first_header or header
        if header and first_header and header.get("bundles") != first_header.get("bundles"):
            raise ValueError(f"{rep}: made with other models than {reports[0]}; not merged")
        for rec in records:
            merged.setdefault(rec["path"], rec)
    lines = [json.dumps({"header": (first_header or {}) | {"merged_from": [str(r) for r in reports]}})]
    lines.append(json.dumps({"batch": list(merged.values())}, separators=(",", ":")))
    from pcl_viewer.review_html import atomic_write

    atomic_write(out / JOURNAL, "\n".join(lines) + "\n")
    return finalize(out, cfg)
