"""Benchmark metrics (MONAI Dice / HD95 / ASD over the two lungs) on masks with known answers."""

import numpy as np
import pytest

from pcl_viewer.evaluate.metrics import dice_per_image, segmentation_scores


def _two_lungs(h: int = 64, w: int = 64) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[10:50, 5:25] = 1  # right lung, 20 px wide
    m[10:50, 35:55] = 2  # left lung, 20 px wide
    return m


def test_shift_of_three_pixels_gives_known_dice_and_hd95():
    gold = _two_lungs()
    pred = np.roll(gold, 3, axis=1)  # each 20-px-wide lung moved sideways by 3 px
    s = segmentation_scores(pred, gold)
    assert s.dice[0] == pytest.approx(17 / 20, abs=1e-6)  # overlap 17 of 20 columns
    assert s.hd95[0] == pytest.approx(3.0, abs=1e-6)
    assert 0 < s.asd[0] < 3.0
    assert dice_per_image(pred, gold)[0] == pytest.approx(0.85, abs=1e-6)


def test_spacing_scales_distances_not_dice():
    gold = _two_lungs()
    pred = np.roll(gold, 3, axis=1)
    s = segmentation_scores(pred, gold, spacing=0.5)
    assert s.hd95[0] == pytest.approx(1.5, abs=1e-6)
    assert s.dice[0] == pytest.approx(0.85, abs=1e-6)


def test_perfect_prediction_scores_one_and_zero_distance():
    gold = np.stack([_two_lungs(), _two_lungs()])
    s = segmentation_scores(gold, gold)
    assert np.allclose(s.dice, 1.0) and np.allclose(s.hd95, 0.0) and np.allclose(s.asd, 0.0)


def test_missed_lung_scores_zero_dice_and_worst_case_distance():
    gold = _two_lungs()
    pred = gold.copy()
    pred[pred == 2] = 0  # left lung missed entirely
    s = segmentation_scores(pred, gold)
    diagonal = np.hypot(64, 64)
    assert s.dice[0] == pytest.approx(0.5)  # (1 + 0) / 2 lungs
    assert s.hd95[0] == pytest.approx(diagonal / 2)  # (0 + diagonal) / 2
    assert np.isfinite(s.asd[0])


def test_both_empty_is_a_correct_empty_answer():
    empty = np.zeros((1, 32, 32), np.uint8)
    s = segmentation_scores(empty, empty)
    assert s.dice[0] == 1.0 and s.hd95[0] == 0.0 and s.asd[0] == 0.0


def test_subgroup_mean_and_shape_mismatch():
    gold = np.stack([_two_lungs(), _two_lungs()])
    pred = gold.copy()
    pred[1] = np.roll(gold[1], 3, axis=1)
    s = segmentation_scores(pred, gold)
    assert s.mean(np.array([True, False]))["dice"] == pytest.approx(1.0)
    assert s.mean()["dice"] == pytest.approx((1 + 0.85) / 2)
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(pred[:, :10], gold)


def test_distances_equal_monai_metric_classes():
    import warnings

    import torch
    from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric

    rng = np.random.default_rng(1)
    gold = np.stack([_two_lungs()] * 3)
    pred = np.stack([np.roll(gold[i], tuple(rng.integers(-5, 6, 2)), (0, 1)) for i in range(3)])
    pred[2, 20:30, 26:40] = 1  # a stray blob
    s = segmentation_scores(pred, gold, spacing=(0.7, 1.3))

    def onehot(a):
        return torch.nn.functional.one_hot(torch.as_tensor(a).long(), 3).permute(0, 3, 1, 2)[:, 1:]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
            onehot(pred), onehot(gold), spacing=(0.7, 1.3))
        asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(
            onehot(pred), onehot(gold), spacing=(0.7, 1.3))
    assert np.allclose(s.hd95, hd.numpy().mean(1), atol=1e-4)
    assert np.allclose(s.asd, asd.numpy().mean(1), atol=1e-4)
