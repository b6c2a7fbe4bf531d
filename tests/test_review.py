"""Batch robustness review as a specification: discovery, bad inputs, flags, resume, merge.

Runs in-process on the fake counterfactual model and a random smoke U-Net
(``fake_pipeline`` in conftest), so every test takes about a second.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pcl_viewer import review as rv
from pcl_viewer.review import ReviewConfig, discover, flag_reason, load_journal, run_review
from tests.conftest import synthetic_chest
from tests.data_factory import build_corpus, write_png


def write_scans(folder: Path, n: int, size: tuple[int, int] = (96, 80), seed: int = 0) -> list[Path]:
    """``n`` readable 8-bit PNG chest images ``scan_000.png ...`` (brightness varies)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = synthetic_chest(*size, seed=seed + i) * (0.7 + 0.6 * ((i * 7) % 10) / 10)
        paths.append(write_png(folder / f"scan_{i:03d}.png", (np.clip(img, 0, 1) * 255).astype(np.uint8)))
    return paths


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def review_cli(args: list[str], pipeline, monkeypatch) -> object:
    """Invoke ``pcl review`` in-process with ``pipeline`` in place of the shipped bundles."""
    from pcl_viewer.cli import main
    from pcl_viewer.commands import review as cmd

    monkeypatch.setattr(cmd, "_pipeline", lambda *a: pipeline)
    return CliRunner().invoke(main, ["review", *args], catch_exceptions=False)


# --------------------------------------------------------------------- discovery


def test_discovery_recurses_narrows_to_scan_files_and_lists_linked_files_once(tmp_path):
    write_scans(tmp_path / "a" / "b", 2)
    (tmp_path / "a" / "readme.txt").write_text("not a scan")
    (tmp_path / "vol.nii.gz").write_bytes(b"x")
    os.symlink(tmp_path / "a" / "b" / "scan_000.png", tmp_path / "alias.png")
    paths, errors = discover(tmp_path)
    found = sorted(os.path.realpath(p) for p in paths)
    # recursion into sub-folders, scan files only (readme.txt is not one)
    assert found == sorted(os.path.realpath(tmp_path / f)
                           for f in ("a/b/scan_000.png", "a/b/scan_001.png", "vol.nii.gz"))
    # scan_000.png and its link alias.png are one file, listed once
    assert len(paths) == 3
    assert errors == []


def test_a_symlink_loop_is_an_error_row_not_an_endless_walk(tmp_path):
    write_scans(tmp_path / "in" / "sub", 1)
    os.symlink(tmp_path / "in", tmp_path / "in" / "sub" / "back")
    os.symlink("self.png", tmp_path / "in" / "self.png")  # a link to itself: ELOOP
    paths, errors = discover(tmp_path / "in")
    assert [Path(p).name for p in paths] == ["scan_000.png"]
    reasons = {Path(e["path"]).name: e["error"] for e in errors}
    assert "symbolic link loop" in reasons["back"]
    assert "link" in reasons["self.png"]


def test_a_csv_list_keeps_its_order_and_resolves_relative_paths(tmp_path):
    paths = write_scans(tmp_path / "s", 3)
    (tmp_path / "list.csv").write_text("path,note\ns/scan_002.png,x\n" + f"{paths[0]},y\n")
    found, errors = discover(tmp_path / "list.csv")
    assert [Path(p).name for p in found] == ["scan_002.png", "scan_000.png"]
    assert Path(found[0]).is_file() and errors == []
    (tmp_path / "bad.csv").write_text("file\na.png\n")
    with pytest.raises(ValueError, match="column 'path'"):
        discover(tmp_path / "bad.csv")


# ------------------------------------------------------------------------ flags


def test_flags_follow_the_dice_and_area_thresholds():
    cfg = ReviewConfig(threshold=0.9, area_threshold=0.1)
    ok = {"dice": 0.95, "area_right_change": 0.05, "area_left_change": -0.02}
    assert flag_reason(ok, cfg) == ""
    assert "dice 0.850 < 0.9" in flag_reason(ok | {"dice": 0.85}, cfg)
    assert "area change -15.0%" in flag_reason(ok | {"area_left_change": -0.15}, cfg)
    assert "no factual lung" in flag_reason(ok | {"area_right_change": float("nan")}, cfg)


# ----------------------------------------------------------------- the review


def test_review_writes_one_row_per_scan_and_intervention(tmp_path, fake_pipeline):
    write_scans(tmp_path / "in", 5)
    summary = run_review(tmp_path / "in", tmp_path / "out", fake_pipeline,
                         ReviewConfig(batch_size=2))
    rows = read_csv(tmp_path / "out" / "report.csv")
    assert summary.processed == 5 and summary.errors == 0
    assert len(rows) == 10 and {r["intervention"] for r in rows} == {"scanner", "effusion"}
    assert set(rows[0]) == set(rv.REPORT_COLUMNS)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        assert r["flagged"] in ("0", "1") and (r["flagged"] == "1") == bool(r["flag_reason"])
        assert 0.0 <= float(r["p_scanner"]) <= 1.0 and r["parents_source"] == "inferred"
    lines = [json.loads(x) for x in open(tmp_path / "out" / rv.JOURNAL)][1:]
    recs = [r for b in lines for r in b.get("batch", [])]
    assert len(recs) == 5
    # Thumbnails are kept exactly for flagged scans (factual + every counterfactual).
    for rec in recs:
        is_flagged = any(flag_reason(x, ReviewConfig()) for x in rec["rows"])
        assert ("thumbs" in rec) == is_flagged
        if is_flagged:
            assert set(rec["thumbs"]) == {"factual", "scanner", "effusion"}
    assert summary.rate > 0


def test_bad_input_corpus_gives_an_error_row_per_file_and_the_review_goes_on(
        tmp_path, fake_pipeline, monkeypatch):
    corpus = build_corpus(tmp_path / "in")
    write_scans(tmp_path / "in" / "good", 2)
    os.symlink(tmp_path / "in", tmp_path / "in" / "good" / "loop")
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--batch-size", "4"],
                     fake_pipeline, monkeypatch)
    assert res.exit_code == 0, res.output
    assert "scans/s" in res.output
    errors = {Path(e["path"]).name: e for e in read_csv(tmp_path / "out" / "errors.csv")}
    reviewed = {Path(r["path"]).name for r in read_csv(tmp_path / "out" / "report.csv")}
    for case in corpus.values():
        name = case.path.name
        if not name.lower().endswith(rv.SCAN_SUFFIXES):
            assert name not in errors and name not in reviewed  # not a scan: not listed
        elif case.readable:
            assert name in reviewed, f"{case.name}: {errors.get(name)}"
        else:
            assert name in errors, case.name
            assert case.expect in errors[name]["error"], (case.name, errors[name])
            assert name not in reviewed
    assert "symbolic link loop" in errors["loop"]["error"]
    assert {"scan_000.png", "scan_001.png"} <= reviewed
    # Nothing half written: only the four outputs and the lock, no temporary files.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [rv.JOURNAL, ".lock", "errors.csv", "report.csv", "report.html"])


def test_monochrome1_dicom_is_reviewed_with_bone_bright(tmp_path, fake_pipeline):
    corpus = build_corpus(tmp_path / "in")
    from pcl_viewer.data.readers import read_scan

    scan = read_scan(corpus["MONOCHROME1 DICOM"].path)
    ref = read_scan(corpus["16-bit PNG (12-bit data)"].path)
    assert np.corrcoef(scan.image.ravel(), ref.image.ravel())[0, 1] > 0.99


def test_a_second_run_skips_finished_scans(tmp_path, fake_pipeline):
    write_scans(tmp_path / "in", 4)
    first = run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, ReviewConfig(batch_size=2))
    before = (tmp_path / "out" / "report.csv").read_bytes()
    second = run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, ReviewConfig(batch_size=2))
    assert (first.processed, second.processed, second.skipped) == (4, 0, 4)
    assert (tmp_path / "out" / "report.csv").read_bytes() == before


def test_a_torn_journal_line_is_redone_and_the_report_is_identical(tmp_path, fake_pipeline):
    write_scans(tmp_path / "in", 6)
    cfg = ReviewConfig(batch_size=2)
    run_review(tmp_path / "in", tmp_path / "full", fake_pipeline, cfg)
    lines = (tmp_path / "full" / rv.JOURNAL).read_text().splitlines(keepends=True)
    # As after a kill -9 in the middle of writing batch 2: everything up to batch 1 (with
    # its read marks), then half of batch 2's line.
    batch_at = [i for i, line in enumerate(lines) if line.startswith('{"batch"')]
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / rv.JOURNAL).write_text(
        "".join(lines[: batch_at[0] + 1]) + lines[batch_at[1]][: len(lines[batch_at[1]]) // 2])
    assert len(load_journal(tmp_path / "cut")[1]) == 2
    resumed = run_review(tmp_path / "in", tmp_path / "cut", fake_pipeline, cfg)
    assert resumed.processed == 4 and resumed.skipped == 2
    assert (tmp_path / "cut" / "report.csv").read_bytes() == (
        tmp_path / "full" / "report.csv").read_bytes()


def test_a_journal_made_with_other_models_is_not_mixed_in(tmp_path, fake_pipeline):
    write_scans(tmp_path / "in", 2)
    run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, bundles={"seg": "a@1"})
    with pytest.raises(ValueError, match="other models"):
        run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, bundles={"seg": "b@2"})


def test_shards_merge_into_the_report_of_one_run(tmp_path, fake_pipeline, monkeypatch):
    paths = write_scans(tmp_path / "in", 6)
    for k, part in enumerate((paths[:3], paths[3:])):
        (tmp_path / f"shard{k}.csv").write_text("path\n" + "".join(f"{p}\n" for p in part))
        run_review(tmp_path / f"shard{k}.csv", tmp_path / f"r{k}", fake_pipeline,
                   ReviewConfig(batch_size=3))
    res = review_cli(["--merge", str(tmp_path / "r0"), str(tmp_path / "r1"), "--out",
                      str(tmp_path / "merged")], fake_pipeline, monkeypatch)
    assert res.exit_code == 0, res.output
    run_review(tmp_path / "in", tmp_path / "single", fake_pipeline, ReviewConfig(batch_size=3))

    def key(rows):
        return sorted((r["path"], r["intervention"], r["dice"], r["flagged"]) for r in rows)

    assert key(read_csv(tmp_path / "merged" / "report.csv")) == key(
        read_csv(tmp_path / "single" / "report.csv"))
    assert len(read_csv(tmp_path / "merged" / "report.csv")) == 12


def test_cancel_stops_between_batches_and_keeps_finished_work(tmp_path, fake_pipeline):
    write_scans(tmp_path / "in", 6)
    calls = iter([False, True])
    summary = run_review(tmp_path / "in", tmp_path / "out", fake_pipeline,
                         ReviewConfig(batch_size=2), cancel=lambda: next(calls, True))
    assert summary.processed == 2
    assert len(load_journal(tmp_path / "out")[1]) == 2


# ------------------------------------------------------------------- the GUI


@pytest.mark.gui
def test_review_widget_reviews_a_folder_in_a_worker_and_opens_flagged_scans(
        make_napari_viewer, qtbot, fake_pipeline, tmp_path, monkeypatch):
    pytest.importorskip("napari")
    from pcl_viewer_napari import _review_widget
    from pcl_viewer_napari._state import AppState

    monkeypatch.delenv("PCL_VIEWER_SYNC", raising=False)
    errors: list[str] = []
    monkeypatch.setattr(_review_widget, "show_error", errors.append)
    write_scans(tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_text("not an image")
    viewer = make_napari_viewer()
    widget = _review_widget.ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    widget.cf_edit.setText("fake-cf")
    widget.seg_edit.setText("seg-smoke")
    AppState.set(fake_pipeline, "fake-cf", "seg-smoke", "auto")
    try:
        widget.folder_edit.setText(str(tmp_path / "in"))
        widget.batch_spin.setValue(2)
        widget.threshold_spin.setValue(1.0)  # with a random U-Net: flag everything not identical
        with qtbot.waitSignal(widget.finished, timeout=120_000) as sig:
            assert widget.run()
        assert sig.args == ["ok"], (errors, widget.status.text())
        assert widget.summary.processed == 6 and widget.summary.errors == 1
        assert widget.progress.value() == widget.progress.maximum()
        assert (tmp_path / "in_review" / "report.html").is_file()
        assert widget.table.rowCount() == len(widget.flagged) > 0
        before = len(viewer.layers)
        layers = widget.open_row(0)
        assert len(layers) == 1 and len(viewer.layers) == before + 1
        assert layers[0].data.ndim == 2
    finally:
        AppState.pipeline = AppState.key = None
