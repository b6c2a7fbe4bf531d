"""Silver labels: AI-generated, realistic (not perfect), worse on effusion."""

from __future__ import annotations

import json

import numpy as np

from pcl_viewer.data.dataset import load_dataset
from pcl_viewer.data.phantom.generate import generate
from pcl_viewer.data.phantom.silver import make_silver


def test_silver_vs_gold_in_realistic_band(tmp_path):
    # the mechanism on the easy regime, where its quality band is known; on the realistic
    # regime the same 20-image, 150-step segmenter reaches about 0.78 at 64 px (see
    # docs/phantom.md), a quality the benchmark's silver rows have to be re-checked with
    out = tmp_path / "pool"
    generate(out, 160, size=64, seed=21, oversample=10.0, workers=1, regime="easy")
    report = make_silver(out, n_train=20, steps=150, seed=0, echo=lambda *_: None)
    dice = report["dice"]
    assert report["trained_on"]["n"] <= 20
    assert 0.80 <= dice["overall"]["mean"] <= 0.97, dice
    assert dice["effusion"]["mean"] < dice["normal"]["mean"] - 0.01, dice
    assert dice["scanner:philips"]["mean"] > dice["scanner:imagingdynamics"]["mean"], dice
    assert json.loads((out / "silver_report.json").read_text())["dice"] == dice
    ds = load_dataset(out)
    q = np.array([r.silver_quality for r in ds.records])
    assert np.all((q >= 0) & (q <= 1))
    s = ds.silver_mask(0)
    assert s.shape == (64, 64) and set(np.unique(s)) <= {0, 1, 2}
    arr = ds.arrays(64)
    assert arr["silver"].shape == (160, 64, 64) and arr["has_silver"].all()
