"""``pcl review`` against hostile and broken inputs and environments.

A decode that hangs or crashes the process, file names that are not UTF-8, formula
cells, a pixel budget, a second writer, a full disk, a CSV from Excel, a FIFO, a link
to a device, and a resume with other settings. Every hostile file is built here.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pcl_viewer import atomic
from pcl_viewer import review as rv
from pcl_viewer.review import ReviewConfig, load_journal, run_review
from tests.test_review import read_csv, review_cli, write_scans

REPO = Path(__file__).resolve().parents[1]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _error_line(res) -> str:
    """The CLI's error: exactly one line (after the progress bar), no traceback."""
    assert "Traceback" not in res.output, res.output
    lines = [x for x in res.output.splitlines() if x.startswith("Error")]
    assert len(lines) == 1 and res.output.rstrip().endswith(lines[0]), res.output
    return lines[0]


def _cli_bundles(pipeline) -> dict[str, str]:
    return {k: f"{b.name}@{b.fingerprint}" for k, b in pipeline.bundles.items()}


# ------------------------------------------------------------- a decode that kills us

_POISON_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pcl_viewer import review as rv
    from pcl_viewer.data import readers

    real = readers.read_scan

    def read_scan(path, **kw):
        if "poison" in str(path):  # as a decoder that crashes or hangs the whole process
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, **kw)

    def run_batch(pipeline, items, cfg):  # no models: this test is about reading
        return [{"path": p, "name": s.name, "status": "ok", "shape": list(s.image.shape),
                 "rows": []} for p, s in items]

    readers.read_scan = read_scan
    rv._run_batch = run_batch
    s = rv.run_review(sys.argv[1], sys.argv[2], None,
                      rv.ReviewConfig(batch_size=2, read_workers=1, decode_timeout_s=None))
    print("processed", s.processed, "errors", s.errors)
""")


def test_a_file_that_kills_the_process_while_decoding_is_skipped_on_resume(tmp_path):
    write_scans(tmp_path / "in", 4)
    (tmp_path / "in" / "scan_001.png").rename(tmp_path / "in" / "scan_001_poison.png")
    script = tmp_path / "poison.py"
    script.write_text(_POISON_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(script), str(tmp_path / "in"), str(tmp_path / "out")]
    codes = [subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
             for _ in range(3)]
    # Killed while decoding it twice (the second run retries once: a kill -9 by the user
    # must not condemn an innocent file), then skipped with an error row.
    assert [c.returncode for c in codes[:2]] == [-9, -9], [c.stderr[-500:] for c in codes]
    assert codes[2].returncode == 0, codes[2].stderr[-2000:]
    assert "processed 3 errors 1" in codes[2].stdout
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert [Path(e["path"]).name for e in errors] == ["scan_001_poison.png"]
    assert "started 2 times and never finished" in errors[0]["error"]
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 0  # no rows: no models here
    assert len(load_journal(tmp_path / "out")[1]) == 4


def test_decodes_run_under_the_time_limit_and_within_the_pixel_budget(
        tmp_path, fake_pipeline, monkeypatch):
    from pcl_viewer.data import readers
    from pcl_viewer.data.scan import ScanReadError

    write_scans(tmp_path / "in", 3)
    (tmp_path / "in" / "hang.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    seen: list[dict] = []
    real = readers.read_scan

    def read_scan(path, *, max_pixels=None, timeout_s=None):
        seen.append({"max_pixels": max_pixels, "timeout_s": timeout_s})
        if Path(path).name == "hang.png":  # what the reader reports for a decode it stopped
            raise ScanReadError(path, f"decoding took longer than the time limit of "
                                      f"{timeout_s:g} s; stopped")
        return real(path, max_pixels=max_pixels)

    monkeypatch.setattr(readers, "read_scan", read_scan)
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out"),
                      "--decode-timeout", "2.5", "--max-megapixels", "5"],
                     fake_pipeline, monkeypatch)
    assert res.exit_code == 0, res.output
    assert {(s["max_pixels"], s["timeout_s"]) for s in seen} == {(5_000_000, 2.5)}
    errors = read_csv(tmp_path / "out" / "errors.csv")
    assert [Path(e["path"]).name for e in errors] == ["hang.png"]
    assert "time limit of 2.5 s" in errors[0]["error"]
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 3 * 2


# ---------------------------------------------------------------- non-UTF-8 names


def test_a_name_that_is_not_utf8_is_carried_losslessly_and_resume_works(
        tmp_path, fake_pipeline, monkeypatch):
    folder = os.fsencode(tmp_path) + b"/in\xfe"  # the folder's name is not UTF-8 either
    write_scans(Path(os.fsdecode(folder)), 3)
    odd = folder + b"/scan\xff.png"
    os.rename(folder + b"/scan_001.png", odd)
    out = tmp_path / "out"
    res = review_cli([os.fsdecode(folder), "--out", str(out), "--batch-size", "2"],
                     fake_pipeline, monkeypatch)
    assert res.exit_code == 0, res.output
    # Lossless in the journal: the exact bytes come back.
    paths = {os.fsencode(r["path"]) for r in load_journal(out)[1]}
    assert odd in paths and len(paths) == 3
    # Shown backslash-escaped (valid UTF-8) in the CSV and the HTML.
    rows = read_csv(out / "report.csv")
    assert sum(r["name"] == "scan\\xff" for r in rows) == 2
    assert any(r["path"].endswith("in\\xfe/scan\\xff.png") for r in rows)
    (out / "report.html").read_bytes().decode("utf-8")
    # A resume reads the name back from the journal and has nothing left to do.
    again = review_cli([os.fsdecode(folder), "--out", str(out), "--batch-size", "2"],
                       fake_pipeline, monkeypatch)
    assert again.exit_code == 0, again.output
    assert "reviewed 0 scans" in again.output and "(3 already done;" in again.output
    assert not [n for n in _listing(out) if n.endswith(".tmp")]


# --------------------------------------------------------------- formula injection


def test_formula_cells_are_neutralised_in_csv_and_escaped_in_html(tmp_path, fake_pipeline):
    names = ["=cmd|' -C calc'!A0", "+SUM(1+1)", "@SUM(A1)", "-2+3", "<b onclick=x>bold"]
    paths = write_scans(tmp_path / "in", len(names))
    for p, name in zip(paths, names):
        p.rename(p.with_name(f"{name}.png"))
    (tmp_path / "in" / "=HYPERLINK(x).png").write_bytes(b"")  # an error row too
    run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, ReviewConfig(threshold=1.0))
    rows = read_csv(tmp_path / "out" / "report.csv")
    shown = {r["name"] for r in rows}
    assert shown == {"'=cmd|' -C calc'!A0", "'+SUM(1+1)", "'@SUM(A1)", "'-2+3", "<b onclick=x>bold"}
    for r in rows:  # numbers stay numbers, including negative area changes
        float(r["dice"]), float(r["area_left_change"])
    text = (tmp_path / "out" / "report.html").read_text()
    assert "&lt;b onclick=x&gt;bold" in text and "<b onclick" not in text
    assert "=HYPERLINK(x).png" in (tmp_path / "out" / "errors.csv").read_text()
    from pcl_viewer.review_html import csv_cell

    assert [csv_cell(x) for x in ("\tx", "\rx", "ok", -0.5)] == ["'\tx", "'\rx", "ok", -0.5]


# ------------------------------------------------------------------- pixel budget


def test_batches_are_cut_by_pixels_and_the_read_ahead_is_counted(
        tmp_path, fake_pipeline, monkeypatch):
    write_scans(tmp_path / "in", 9)  # 96 x 80 = 7680 px each
    big = np.zeros((200, 200), np.uint8)
    from tests.data_factory import write_png

    write_png(tmp_path / "in" / "scan_004b.png", big + 128)  # 40000 px > the budget
    px = 96 * 80
    batches: list[int] = []
    real_run_batch = fake_pipeline.run_batch

    def run_batch(scans, **kw):
        batches.append(sum(s.image.size for s in scans))
        return real_run_batch(scans, **kw)

    monkeypatch.setattr(fake_pipeline, "run_batch", run_batch)
    # Pixels decoded and not yet journalled, at most, over the run.
    held = {"now": 0, "max": 0}
    real_read, real_append = rv.read_for_review, rv.append_journal

    def read(path, *a):
        item = real_read(path, *a)
        held["now"] += 0 if isinstance(item, dict) else item.image.size
        held["max"] = max(held["max"], held["now"])
        return item

    def append(out, item, sync=True):
        held["now"] -= sum(r.get("shape", [0, 0])[0] * r.get("shape", [0, 0])[1]
                           for r in item.get("batch", []) if r.get("status") == "ok")
        real_append(out, item, sync)

    monkeypatch.setattr(rv, "read_for_review", read)
    monkeypatch.setattr(rv, "append_journal", append)
    cfg = ReviewConfig(batch_size=16, max_pixels=3 * px, read_workers=2, decode_timeout_s=None)
    summary = run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, cfg)
    assert summary.processed == 10 and summary.errors == 1
    assert batches == [3 * px] * 3  # cut by pixels, not by the batch size of 16
    # The read-ahead counts: at most the budget plus the one scan that closed a batch.
    assert held["max"] <= 4 * px, held
    err = read_csv(tmp_path / "out" / "errors.csv")[0]
    assert err["path"].endswith("scan_004b.png")
    assert "200 x 200" in err["error"] and "budget" in err["error"]


_RSS_SCRIPT = textwrap.dedent("""
    import gc, sys, threading, time, psutil, torch
    from pcl_viewer.models.bundle import ModelBundle
    from pcl_viewer.pipeline import BundleInfo, Pipeline
    from pcl_viewer.review import ReviewConfig, fixed_mmap_threshold, run_review
    from tests.conftest import FakeCounterfactualModel

    torch.set_num_threads(1)
    fixed_mmap_threshold()  # as pcl review does
    b = ModelBundle.load(sys.argv[1])
    pipe = Pipeline(FakeCounterfactualModel(), b.build("unet"), "cpu",
                    {"cf": BundleInfo("fake-cf", "0" * 12, "<test>"),
                     "seg": BundleInfo(b.name, b.fingerprint, sys.argv[1])})
    run_review(sys.argv[5], sys.argv[3] + "-warm", pipe)  # imports (matplotlib ...) first
    me = psutil.Process()
    gc.collect()
    base = me.memory_info().rss
    peak, tree, stop = [base], [base], threading.Event()

    def sample():  # resident memory of this process and of its decoder helper, every 5 ms
        while not stop.is_set():
            rss = me.memory_info().rss
            kids = sum(c.memory_info().rss for c in me.children(recursive=True))
            peak[0], tree[0] = max(peak[0], rss), max(tree[0], rss + kids)
            time.sleep(0.005)

    t = threading.Thread(target=sample)
    t.start()
    # Decoded in this process (no helper): its decode memory counts here too.
    s = run_review(sys.argv[2], sys.argv[3], pipe,
                   ReviewConfig(max_pixels=int(sys.argv[4]), decode_timeout_s=None))
    stop.set()
    t.join()
    print(f"base {base / 2**20:.0f} peak {peak[0] / 2**20:.0f} tree {tree[0] / 2**20:.0f} "
          f"done {s.processed}")
""")


def test_peak_memory_of_a_review_stays_within_the_documented_budget(tmp_path, seg_bundle_path):
    """Peak RSS <= RSS with the models loaded + BYTES_PER_PIXEL * budget (docs/review.md).

    Six scans of 1600^2 px under a 3 Mpx budget: one scan per batch (measured +69 to +82 MiB).
    Without the budget the six are one batch of 15 Mpx (measured +241 MiB), far above the
    bound of +114 MiB.
    """
    import cv2

    from tests.conftest import synthetic_chest

    (tmp_path / "in").mkdir()
    side = 1600
    write_scans(tmp_path / "warm", 2)
    for i in range(6):
        img = cv2.resize(synthetic_chest(160, 160, seed=i), (side, side))
        cv2.imwrite(str(tmp_path / "in" / f"s{i}.png"), (img * 255).astype(np.uint8),
                    [cv2.IMWRITE_PNG_COMPRESSION, 1])
    budget = 3_000_000
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(seg_bundle_path), str(tmp_path / "in"),
         str(tmp_path / "out"), str(budget), str(tmp_path / "warm")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    base, peak, tree = (float(words[i]) for i in (1, 3, 5))
    bound = base + rv.BYTES_PER_PIXEL * budget / 2**20
    print(f"\nreview of 6 scans of {side}^2 px, budget {budget / 1e6:g} Mpx: RSS {base:.0f} MiB "
          f"before, peak {peak:.0f} MiB (bound {bound:.0f}); with the decoder {tree:.0f} MiB")
    assert words[-1] == "6"
    assert peak <= bound


# ------------------------------------------------------------------- one writer


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path, fake_pipeline,
                                                              monkeypatch):
    write_scans(tmp_path / "in", 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pcl_viewer.atomic import FolderLock; "
         "lock = FolderLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path / "out")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                         monkeypatch)
        assert time.monotonic() - t0 < 10  # refused at once, no waiting
        assert res.exit_code == 1
        assert _error_line(res).startswith(f"Error: {tmp_path / 'out'} is in use by process "
                                           f"{holder.pid}")
        assert not (tmp_path / "out" / rv.JOURNAL).exists()  # nothing was done twice
        with pytest.raises(atomic.LockedError, match=str(holder.pid)):
            rv.merge([tmp_path / "out"], tmp_path / "out")
    finally:
        holder.kill()
        holder.wait(10)
    # The kernel dropped the lock with its holder: no stale lock after a kill.
    assert run_review(tmp_path / "in", tmp_path / "out", fake_pipeline).processed == 2


# -------------------------------------------------------------------- full disk


def _disk_full_writer(monkeypatch):
    real = atomic.atomic_writer

    @contextlib.contextmanager
    def full(path, *a, **k):
        with real(path, *a, **k) as fh:
            fh.write("half a report")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        yield fh  # pragma: no cover

    monkeypatch.setattr(atomic, "atomic_writer", full)


def test_a_full_disk_is_one_line_leaves_no_temp_file_and_no_stale_report(
        tmp_path, fake_pipeline, monkeypatch):
    write_scans(tmp_path / "in", 2)
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                     monkeypatch)
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 4
    write_scans(tmp_path / "in", 4)  # two more scans: the old report covers too few
    _disk_full_writer(monkeypatch)
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                     monkeypatch)
    assert res.exit_code == 1
    line = _error_line(res)
    assert line.startswith("Error: disk full while writing") and "report.csv" in line
    assert "run the same command again" in line
    # No temporary file left, and no report that covers fewer scans than the journal.
    assert _listing(tmp_path / "out") == sorted([".lock", rv.JOURNAL])
    assert len(load_journal(tmp_path / "out")[1]) == 4
    monkeypatch.undo()
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                     monkeypatch)
    assert res.exit_code == 0 and "(4 already done;" in res.output
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 8


def test_a_full_disk_while_journalling_is_one_line(tmp_path, fake_pipeline, monkeypatch):
    write_scans(tmp_path / "in", 3)

    def full(out, item, sync=True):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / rv.JOURNAL))

    monkeypatch.setattr(rv, "append_journal", full)
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                     monkeypatch)
    assert res.exit_code == 1
    assert _error_line(res).startswith("Error: disk full while writing") and rv.JOURNAL in res.output


# ------------------------------------------------------------------ smaller cases


def test_a_csv_list_saved_by_excel_with_a_bom_is_accepted(tmp_path, fake_pipeline):
    write_scans(tmp_path / "s", 2)
    (tmp_path / "list.csv").write_text("path,note\r\ns/scan_001.png,x\r\ns/scan_000.png,y\r\n",
                                       encoding="utf-8-sig")
    assert (tmp_path / "list.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    found, errors = rv.discover(tmp_path / "list.csv")
    assert [Path(p).name for p in found] == ["scan_001.png", "scan_000.png"] and errors == []


@pytest.mark.timeout(60)
def test_a_fifo_and_a_link_to_a_device_are_error_rows_and_never_block(
        tmp_path, fake_pipeline, monkeypatch):
    write_scans(tmp_path / "in", 2)
    os.mkfifo(tmp_path / "in" / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "in" / "zero.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "in" / "broken.png")
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out")], fake_pipeline,
                     monkeypatch)
    assert res.exit_code == 0, res.output
    # The test's segmentation bundle is not a pinned shipped one: the CLI says so.
    assert "note: unverified bundle 'seg-smoke' (fingerprint " in res.output
    errors = {Path(e["path"]).name: e["error"] for e in read_csv(tmp_path / "out" / "errors.csv")}
    assert errors["pipe.png"].startswith("not a regular file (a FIFO")
    assert errors["zero.png"].startswith("not a regular file (a character device")
    assert errors["broken.png"] == "broken or looping symbolic link"
    assert len(read_csv(tmp_path / "out" / "report.csv")) == 4
    # Listed in a CSV, a FIFO is still refused without being opened.
    (tmp_path / "list.csv").write_text(f"path\n{tmp_path / 'in' / 'pipe.png'}\n")
    summary = run_review(tmp_path / "list.csv", tmp_path / "out2", fake_pipeline)
    assert summary.errors == 1
    assert "regular file" in read_csv(tmp_path / "out2" / "errors.csv")[0]["error"]


def test_a_resume_with_another_batch_size_or_budget_is_refused(tmp_path, fake_pipeline,
                                                               monkeypatch):
    write_scans(tmp_path / "in", 3)
    cut = iter([False, True])
    run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, ReviewConfig(batch_size=2),
               cancel=lambda: next(cut, True), bundles=_cli_bundles(fake_pipeline))
    header = json.loads((tmp_path / "out" / rv.JOURNAL).read_text().splitlines()[0])["header"]
    assert header["settings"] == {"batch_size": 2, "max_pixels": rv.DEFAULT_MAX_PIXELS,
                                  "interventions": ["scanner", "effusion"]}
    for option in (["--batch-size", "3"], ["--batch-size", "2", "--max-megapixels", "10"]):
        res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out"), *option],
                         fake_pipeline, monkeypatch)
        assert res.exit_code == 1
        line = _error_line(res)
        assert "made with --batch-size 2, --max-megapixels 64" in line and "--restart" in line
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--batch-size", "2"],
                     fake_pipeline, monkeypatch)
    assert res.exit_code == 0 and "(2 already done;" in res.output
    res = review_cli([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--batch-size", "3",
                      "--restart"], fake_pipeline, monkeypatch)
    assert res.exit_code == 0 and "reviewed 3 scans" in res.output


def test_csv_report_rows_are_plain_csv(tmp_path, fake_pipeline):
    """The CSV stays parseable by the csv module after neutralising (quotes, commas)."""
    paths = write_scans(tmp_path / "in", 1)
    paths[0].rename(paths[0].with_name('=a,"b".png'))
    run_review(tmp_path / "in", tmp_path / "out", fake_pipeline)
    with open(tmp_path / "out" / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["name"] for r in rows} == {"'=a,\"b\""}


def test_the_lock_file_names_its_holder_and_is_reusable(tmp_path):
    with atomic.FolderLock(tmp_path / "x") as lock:
        assert lock.path.read_text() == str(os.getpid())
        with pytest.raises(atomic.LockedError, match=f"process {os.getpid()}"):
            atomic.FolderLock(tmp_path / "x").acquire()
    with atomic.FolderLock(tmp_path / "x"):
        pass
