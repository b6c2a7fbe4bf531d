"""The HTML review report: self-contained, and rendered by a real browser (headless Chromium)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pcl_viewer.review import ReviewConfig, run_review
from tests.data_factory import build_corpus
from tests.test_review import write_scans

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def report(tmp_path, fake_pipeline) -> Path:
    """A report over 6 readable scans and the bad-input corpus (flags and errors both present)."""
    write_scans(tmp_path / "in", 6)
    build_corpus(tmp_path / "in" / "bad")
    run_review(tmp_path / "in", tmp_path / "out", fake_pipeline, ReviewConfig(batch_size=4),
               bundles={"cf": "fake-cf@000", "seg": "seg-smoke@111"})
    return tmp_path / "out" / "report.html"


def test_report_is_self_contained_with_plots_thumbnails_and_every_error(report):
    text = report.read_text()
    # No network, no server: every src is a data URI; the only links are the sibling CSVs.
    srcs = re.findall(r'src="([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert set(re.findall(r'href="([^"]*)"', text)) == {"report.csv", "errors.csv"}
    assert "<script src" not in text and "<link" not in text
    assert 'alt="consistency box plots"' in text
    assert "Consistency by scanner and by effusion" in text
    # Every unreadable file is listed with its reason.
    errors = (report.parent / "errors.csv").read_text().splitlines()[1:]
    assert len(errors) >= 10
    for line in errors:
        name = Path(line.split(",")[0]).name
        assert name in text
    assert "empty file (0 bytes)" in text and "too many pixels" in text
    # The flagged table is sortable and shows factual + counterfactual thumbnails.
    assert 'table class=sortable id=flagged' in text
    assert text.count('alt="factual"') >= 1 and 'alt="effusion"' in text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           "--window-size=1280,1600", report.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), proc.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert img.shape[:2] == (1600, 1280)
    # Not blank: text, plot and thumbnails give many grey levels across the page.
    assert img.std() > 20
    assert len(np.unique(img.reshape(-1, 3)[::7], axis=0)) > 200
    top = img[:400]  # the title, the cards and the start of the plots are drawn
    assert (top.mean(axis=2) < 100).mean() > 0.005


def test_domain_columns_and_out_of_domain_section():
    from pcl_viewer.review_html import render_report, report_rows

    row = {"key": "scanner", "do": "do(scanner=philips)", "dice": 0.97, "dice_right": 0.97,
           "dice_left": 0.97, "area_right_change": 0.01, "area_left_change": 0.0}
    recs = [{"path": f"/d/{n}.png", "name": n, "status": "ok", "shape": [64, 64],
             "parents": {}, "probabilities": {}, "parents_source": "inferred", "rows": [row],
             "domain_score": score, "out_of_domain": ood}
            for n, score, ood in (("chest", 0.61, False), ("camera", 0.0, True),
                                  ("uncal", None, None))]
    cfg = ReviewConfig()
    rows = {r["name"]: r for r in report_rows(recs, cfg)}
    assert rows["chest"]["out_of_domain"] == 0 and rows["chest"]["domain_score"] == 0.61
    assert rows["camera"]["out_of_domain"] == 1
    assert rows["uncal"]["out_of_domain"] == "" and rows["uncal"]["domain_score"] is None
    html = render_report(recs, cfg, {})
    section = html.split("Scans outside the models' world (1)")[1].split("<h2>")[0]
    assert "/d/camera.png" in section and "/d/chest.png" not in section
