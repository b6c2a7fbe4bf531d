"""RLE (CheXmask convention) and the dataset loader on both layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pcl_viewer.data import rle
from pcl_viewer.data.dataset import load_dataset
from pcl_viewer.data.phantom.generate import generate

FIXTURE = Path(__file__).parent / "fixtures" / "padchest_small"


def test_rle_convention_and_roundtrip():
    m = np.zeros((3, 4), np.uint8)
    m[0, 1:3] = 1  # flat indices 1, 2 -> 1-indexed start 2
    m[1, 3] = 1
    m[2, 0] = 1  # flat 7, 8 contiguous with previous row end
    assert rle.encode(m) == "2 2 8 2"
    np.testing.assert_array_equal(rle.decode("2 2 8 2", 3, 4), m)
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 3, (17, 23)).astype(np.uint8)
    np.testing.assert_array_equal(rle.decode_lungs(*rle.encode_lungs(lab), 17, 23), lab)
    assert rle.decode(float("nan"), 2, 2).sum() == 0
    with pytest.raises(ValueError):
        rle.decode("5 10", 2, 2)


def test_real_padchest_chexmask_fixture(tmp_path):
    root = tmp_path / "padchest"
    shutil.copytree(FIXTURE, root)  # arrays() writes its cache under root/.cache
    ds = load_dataset(root)
    assert ds.kind == "padchest"
    assert len(ds) == 2  # the AP row is dropped
    r0, r1 = ds.records
    assert r0.style == "imagingdynamics" and r0.sex == "female" and not r0.effusion
    assert r1.parents.to_vector().tolist() == [1.0, 1.0, 1.0]
    assert r0.age == pytest.approx(84.0)
    assert r0.silver_quality == pytest.approx(0.88)
    img = ds.image(0)
    assert img.shape == (8, 10) and img.dtype == np.float32
    s = ds.silver_mask(0)
    assert (s == 1).sum() == 12 and (s == 2).sum() == 12
    assert np.nonzero(s == 1)[1].max() < np.nonzero(s == 2)[1].min()
    assert s[2, 1] == 1 and s[2, 0] == 0 and s[5, 8] == 2
    assert (ds.silver_mask(1) == 1).sum() == 0  # empty right lung RLE
    assert ds.gold_mask(0) is None
    assert ds.true_counterfactual(0, "scanner") is None
    arr = ds.arrays(20)  # 8x10 scans padded to 10x10, then resized
    assert arr["image"].shape == (2, 1, 20, 20) and "gold" not in arr
    assert arr["silver"].shape == (2, 20, 20) and arr["silver"][0, :2].sum() == 0
    np.testing.assert_allclose(arr["silver_quality"], [0.88, 0.65])
    assert (arr["silver"][0] == 1).sum() == 48 and (arr["silver"][0] == 2).sum() == 48


def test_phantom_roundtrip(tmp_path):
    out = tmp_path / "ph"
    summary = generate(out, 12, size=64, seed=4, counterfactuals=True, oversample=20.0)
    assert summary["images_per_second"] > 0
    ds = load_dataset(out)
    assert ds.kind == "phantom" and len(ds) == 12
    pids = {r.patient_id for r in ds.records}
    assert all(p.startswith("s4-") for p in pids)
    for i, rec in enumerate(ds.records):
        assert rec.split in ("train", "val", "test")
        assert rec.labels == (["pleural effusion"] if rec.effusion else ["normal"])
        g = ds.gold_mask(i)
        assert g.shape == (64, 64) and set(np.unique(g)) <= {0, 1, 2}
        img_cf, mask_cf = ds.true_counterfactual(i, "scanner")
        np.testing.assert_array_equal(mask_cf, g)
    # patients never straddle splits
    by_patient = {}
    for r in ds.records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(v) == 1 for v in by_patient.values())
    arr = ds.arrays(32)
    assert arr["image"].shape == (12, 1, 32, 32) and arr["image"].dtype == np.float32
    assert arr["gold"].shape == (12, 32, 32) and arr["gold"].dtype == np.uint8
    assert arr["parents"].shape == (12, 3)
    assert arr["true_cf"].shape == (12, 3, 1, 32, 32)
    assert list(ds.cache_dir.glob("arrays_32_*.npz"))
    again = ds.arrays(32)
    np.testing.assert_array_equal(again["image"], arr["image"])
    sub = ds.subset([0, 2])
    assert len(sub) == 2 and sub.arrays(32)["image"].shape[0] == 2
