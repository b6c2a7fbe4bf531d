"""RLE (CheXmask convention) and the dataset loader on both layouts."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pcl_viewer.data import rle
from pcl_viewer.data.dataset import load_dataset
from pcl_viewer.data.phantom.generate import generate
from pcl_viewer.parents import VIEW_KINDS

FIXTURE = Path(__file__).parent / "fixtures" / "padchest_small"


def test_rle_runs_are_one_indexed_start_length_pairs_over_row_major_pixels():
    m = np.zeros((3, 4), np.uint8)
    m[0, 1:3] = 1  # flat indices 1, 2 -> 1-indexed start 2
    m[1, 3] = 1
    m[2, 0] = 1  # flat 7, 8 contiguous with previous row end
    assert rle.encode(m) == "2 2 8 2"
    np.testing.assert_array_equal(rle.decode("2 2 8 2", 3, 4), m)


def test_rle_lung_pair_round_trips():
    lab = np.random.default_rng(0).integers(0, 3, (17, 23)).astype(np.uint8)
    np.testing.assert_array_equal(rle.decode_lungs(*rle.encode_lungs(lab), 17, 23), lab)


def test_a_missing_rle_is_an_empty_mask():
    assert rle.decode(float("nan"), 2, 2).sum() == 0


def test_an_rle_beyond_the_image_is_refused():
    with pytest.raises(ValueError):
        rle.decode("5 10", 2, 2)


# ---------------------------------------------------------------- PadChest layout --


@pytest.fixture(scope="module")
def padchest(tmp_path_factory):
    """The two-row PadChest + CheXmask fixture (copied: arrays() caches under its root)."""
    root = tmp_path_factory.mktemp("padchest") / "padchest"
    shutil.copytree(FIXTURE, root)
    return load_dataset(root)


def test_padchest_keeps_the_pa_rows(padchest):
    assert (padchest.kind, len(padchest)) == ("padchest", 2)  # the AP row is dropped


def test_padchest_records_carry_parents_age_and_silver_quality(padchest):
    r0, r1 = padchest.records
    assert (r0.style, r0.sex, r0.effusion) == ("imagingdynamics", "female", False)
    assert r1.parents.to_vector().tolist() == [1.0, 1.0, 1.0]
    assert (r0.age, r0.silver_quality) == (pytest.approx(84.0), pytest.approx(0.88))


def test_padchest_images_are_float32_at_their_own_size(padchest):
    img = padchest.image(0)
    assert (img.shape, img.dtype) == ((8, 10), np.float32)


def test_padchest_silver_masks_decode_the_chexmask_lungs(padchest):
    s = padchest.silver_mask(0)
    assert ((s == 1).sum(), (s == 2).sum()) == (12, 12)
    assert np.nonzero(s == 1)[1].max() < np.nonzero(s == 2)[1].min()  # right lung image-left
    assert (s[2, 1], s[2, 0], s[5, 8]) == (1, 0, 2)


def test_an_empty_lung_rle_gives_no_pixels(padchest):
    assert (padchest.silver_mask(1) == 1).sum() == 0


def test_padchest_has_no_gold_masks_nor_true_counterfactuals(padchest):
    assert (padchest.gold_mask(0), padchest.true_counterfactual(0, "scanner")) == (None, None)


def test_padchest_arrays_are_padded_square_then_resized(padchest):
    arr = padchest.arrays(20)  # 8x10 scans padded to 10x10, then resized
    assert arr["image"].shape == (2, 1, 20, 20)
    assert arr["silver"].shape == (2, 20, 20)
    assert arr["silver"][0, :2].sum() == 0  # the padding rows
    assert ((arr["silver"][0] == 1).sum(), (arr["silver"][0] == 2).sum()) == (48, 48)
    np.testing.assert_allclose(arr["silver_quality"], [0.88, 0.65])
    assert "gold" not in arr


# ----------------------------------------------------------------- phantom layout --


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantom") / "ph"
    summary = generate(out, 12, size=64, seed=4, counterfactuals=True, oversample=20.0)
    return summary, load_dataset(out)


def test_phantom_generation_reports_its_speed(phantom):
    summary, _ = phantom
    assert summary["images_per_second"] > 0


def test_a_generated_phantom_loads_as_a_phantom_data_set(phantom):
    _, ds = phantom
    assert (ds.kind, len(ds)) == ("phantom", 12)


def test_phantom_patient_ids_carry_the_seed(phantom):
    _, ds = phantom
    assert all(r.patient_id.startswith("s4-") for r in ds.records)


def test_phantom_labels_follow_effusion(phantom):
    _, ds = phantom
    for rec in ds.records:
        assert rec.labels == (["pleural effusion"] if rec.effusion else ["normal"])


def test_patients_never_straddle_splits(phantom):
    _, ds = phantom
    by_patient: dict[str, set[str]] = {}
    for r in ds.records:
        by_patient.setdefault(r.patient_id, set()).add(r.split)
    assert {r.split for r in ds.records} <= {"train", "val", "test"}
    assert all(len(v) == 1 for v in by_patient.values())


def test_phantom_gold_masks_are_lung_labels(phantom):
    _, ds = phantom
    for i in range(len(ds)):
        g = ds.gold_mask(i)
        assert g.shape == (64, 64) and set(np.unique(g)) <= {0, 1, 2}


def test_the_scanner_counterfactual_keeps_the_gold_mask(phantom):
    _, ds = phantom
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.true_counterfactual(i, "scanner")[1], ds.gold_mask(i))


def test_phantom_arrays_hold_images_gold_parents_and_true_counterfactuals(phantom):
    _, ds = phantom
    arr = ds.arrays(32)
    assert (arr["image"].shape, arr["image"].dtype) == ((12, 1, 32, 32), np.float32)
    assert (arr["gold"].shape, arr["gold"].dtype) == ((12, 32, 32), np.uint8)
    assert arr["parents"].shape == (12, 3)
    assert arr["true_cf"].shape == (12, len(VIEW_KINDS), 1, 32, 32)


def test_arrays_are_cached_and_read_back_the_same(phantom):
    _, ds = phantom
    first = ds.arrays(32)
    assert list(ds.cache_dir.glob("arrays_32_*.npz"))
    np.testing.assert_array_equal(ds.arrays(32)["image"], first["image"])


def test_a_subset_keeps_the_chosen_images(phantom):
    _, ds = phantom
    sub = ds.subset([0, 2])
    assert (len(sub), sub.arrays(32)["image"].shape[0]) == (2, 2)
