"""The review's shared vocabulary: report columns, settings, the journal reader, flags.

:mod:`pcl_viewer.review` (the computation) and :mod:`pcl_viewer.review_html` (the
reports) both import this module; neither imports the other at module level.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcl_viewer.parents import VIEW_KINDS

JOURNAL = ".journal.jsonl"
JOURNAL_VERSION = 1
REPORT_FILES: tuple[str, ...] = ("report.csv", "errors.csv", "report.html")
REPORT_COLUMNS: tuple[str, ...] = (
    "path", "name", "height", "width", "scanner", "sex", "effusion", "p_scanner", "p_sex",
    "p_effusion", "parents_source", "domain_score", "out_of_domain", "intervention", "do",
    "dice", "dice_right", "dice_left",
    "area_right_change", "area_left_change", "flagged", "flag_reason",
)
ERROR_COLUMNS: tuple[str, ...] = ("path", "stage", "error")
# Pixels of decoded scans held at once (the batch in the models plus the read-ahead).
DEFAULT_MAX_PIXELS = 64_000_000
# Resident memory per pixel of budget, an upper bound of what was measured (docs/review.md):
# the pipeline keeps the native-size factual and counterfactual images, labels and
# intermediates of a batch (16-32 bytes per pixel), the read-ahead 4 bytes per pixel. The
# review's peak RSS stays under the RSS with the models loaded + BYTES_PER_PIXEL * max_pixels.
BYTES_PER_PIXEL = 40
DEFAULT_DECODE_TIMEOUT_S = 30.0

@dataclass
class ReviewConfig:
    """Settings of one review.

    threshold: flag a counterfactual whose mean lung Dice vs the factual is below it.
    area_threshold: flag when |lung-area change| of either lung exceeds it (a fraction).
    batch_size: at most this many scans per pipeline batch, and per journal line.
    max_pixels: pixel budget: at most this many pixels of decoded scans are held at once
        (the batch in the models plus the scans read ahead); a larger scan is an error row.
    decode_timeout_s: time limit of one file's decode (s); None or 0: no limit.
    read_workers: threads decoding files while the models work on the previous batch.
    thumb_size: longest side (px) of the thumbnails stored for flagged scans.
    """

    threshold: float = 0.9
    area_threshold: float = 0.1
    batch_size: int = 16
    interventions: tuple[str, ...] = VIEW_KINDS[:2]  # scanner, effusion
    read_workers: int = 2
    thumb_size: int = 96
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_timeout_s: float | None = DEFAULT_DECODE_TIMEOUT_S

    def settings(self) -> dict[str, Any]:
        """The settings that change results (batch composition, views): kept in the journal."""
        return {"batch_size": int(self.batch_size), "max_pixels": int(self.max_pixels),
                "interventions": list(self.interventions)}



def display_text(text: Any) -> str:
    """``text`` printable in any UTF-8 file: undecodable file-name bytes as ``\\xNN``.

    Paths are carried as ``str`` with surrogate escapes (``os.fsdecode``), which is lossless
    in the journal (JSON writes ``\\udcff``) but cannot be encoded as UTF-8. For the CSV,
    the HTML and the terminal the raw bytes are shown backslash-escaped: ``scan\\xff.png``.
    """
    s = str(text)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        pass
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # lone surrogates that are not escaped bytes
        return s.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")



def read_journal(out: str | os.PathLike[str]
                 ) -> tuple[dict[str, Any] | None, list[dict[str, Any]], dict[str, int]]:
    """Header, scan records and interrupted decodes of a journal.

    Returns:
        ``(header, records, interrupted)``: ``interrupted`` maps a path without a record to
        the number of decodes of it that were started (``reading``) and never finished
        (``read``). A torn last line (a kill mid-write) is dropped.
    """
    path = Path(out) / JOURNAL
    header: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    attempts: dict[str, int] = {}
    if not path.is_file():
        return header, records, attempts
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue  # the batch in flight when the process died
            if "header" in item:
                header = header or item["header"]
            for p in item.get("read", []):
                attempts.pop(p, None)
            for p in item.get("reading", []):
                attempts[p] = attempts.get(p, 0) + 1
            records.extend(item.get("batch", []))
    unique: dict[str, dict[str, Any]] = {}
    for rec in records:  # a scan journaled twice (a merge, a re-run) keeps its first record
        unique.setdefault(rec["path"], rec)
    for p in unique:
        attempts.pop(p, None)
    return header, list(unique.values()), attempts


def load_journal(out: str | os.PathLike[str]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and scan records of a journal. A torn last line (a kill mid-write) is dropped."""
    header, records, _ = read_journal(out)
    return header, records



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
