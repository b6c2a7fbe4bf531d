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


# --- one Dice: dice_scores against the hand-written Dice functions it replaced ---------
#
# Frozen copies of the former implementations (metrics.dice_per_image /
# segmentation_scores' Dice, data/phantom/silver.py lung_dice, train/probe.py
# dice_per_class): dice_scores must reproduce each caller's numbers exactly.


def _old_monai_dice(pred: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """The former segmentation_scores / dice_per_image Dice, (N, 2) float64."""
    import warnings

    import torch
    from monai.metrics import DiceMetric

    def onehot(a):
        t = torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long)
        return torch.nn.functional.one_hot(t, 3).permute(0, 3, 1, 2).float()[:, 1:]

    p, g = onehot(pred), onehot(gold)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, g)
    dice = dice.numpy().astype(np.float64)
    p_empty = p.sum(dim=(2, 3)).numpy() == 0
    g_empty = g.sum(dim=(2, 3)).numpy() == 0
    dice[p_empty & g_empty] = 1.0
    dice[p_empty ^ g_empty] = 0.0
    return dice


def _old_lung_dice(a: np.ndarray, b: np.ndarray) -> float:
    """The former data/phantom/silver.py ``lung_dice`` (empty-empty = 1)."""
    out = []
    for c in (1, 2):
        x, y = a == c, b == c
        s = x.sum() + y.sum()
        out.append(1.0 if s == 0 else 2.0 * np.logical_and(x, y).sum() / s)
    return float(np.mean(out))


def _old_dice_per_class(pred, target, classes=(1, 2)):
    """The former train/probe.py ``dice_per_class`` (NaN where both are empty)."""
    import torch

    rows = []
    for c in classes:
        p = (pred == c).flatten(1).float()
        t = (target == c).flatten(1).float()
        denom = p.sum(1) + t.sum(1)
        d = 2 * (p * t).sum(1) / denom.clamp(min=1)
        rows.append(torch.where(denom > 0, d, torch.nan))
    return torch.stack(rows, dim=1)


def _random_label_maps(seed: int, n: int = 40, shape=(48, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Random 0/1/2 maps with every empty-mask case: a lung missing from the prediction,
    from the gold map, from both, all-background images, and blobs of any overlap."""
    rng = np.random.default_rng(seed)
    h, w = shape
    gold = np.zeros((n, h, w), np.uint8)
    pred = np.zeros((n, h, w), np.uint8)
    for i in range(n):
        for m in (gold, pred):
            kind = rng.integers(0, 3)
            if kind == 0:  # random blobs
                for c in (1, 2):
                    top, left = rng.integers(0, h), rng.integers(0, w)
                    m[i, top : top + rng.integers(1, h), left : left + rng.integers(1, w)] = c
            elif kind == 1:  # noise
                m[i] = rng.choice(3, size=(h, w), p=rng.dirichlet(np.ones(3)))
            else:  # half the image one lung, or sparse pixels
                m[i, :, : w // 2] = rng.integers(0, 3)
                m[i][rng.random((h, w)) < 0.01] = rng.integers(0, 3)
        case = i % 8
        if case == 1:
            pred[i][pred[i] == 1] = 0  # right lung missing from the prediction
        elif case == 2:
            gold[i][gold[i] == 2] = 0  # left lung missing from the gold map
        elif case == 3:
            pred[i][pred[i] == 2] = 0  # left lung missing from both
            gold[i][gold[i] == 2] = 0
        elif case == 4:
            pred[i], gold[i] = 0, 0  # nothing anywhere
        elif case == 5:
            pred[i] = gold[i]  # perfect
    return pred, gold


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_scores_equals_the_former_monai_dice_of_the_benchmark(seed):
    from pcl_viewer.evaluate.metrics import dice_scores

    pred, gold = _random_label_maps(seed)
    old = _old_monai_dice(pred, gold)
    assert np.array_equal(dice_scores(pred, gold).astype(np.float64), old)
    assert np.array_equal(dice_per_image(pred, gold), old.mean(1))
    assert np.array_equal(segmentation_scores(pred[:12], gold[:12]).dice, old[:12].mean(1))
    assert (old == 1.0).any() and (old == 0.0).any()  # both empty-mask cases were hit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_scores_equals_the_former_silver_lung_dice(seed):
    from pcl_viewer.evaluate.metrics import dice_scores

    pred, gold = _random_label_maps(seed)
    new = dice_scores(pred, gold, dtype="float64").mean(1)
    old = np.array([_old_lung_dice(p, g) for p, g in zip(pred, gold, strict=True)])
    assert new.dtype == np.float64 and np.array_equal(new, old)
    # one image at a time, as the silver report scores native-size masks
    assert all(float(dice_scores(p, g, dtype="float64").mean()) == _old_lung_dice(p, g)
               for p, g in zip(pred[:8], gold[:8], strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_scores_equals_the_former_probe_dice_per_class(seed):
    import torch

    from pcl_viewer.evaluate.metrics import dice_scores

    pred, gold = _random_label_maps(seed)
    p, g = torch.from_numpy(pred).long(), torch.from_numpy(gold).long()
    old = _old_dice_per_class(p, g)
    new = torch.from_numpy(dice_scores(p, g, both_empty=float("nan")))
    assert new.dtype == old.dtype == torch.float32
    torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)
    assert old.isnan().any()  # the both-empty case was hit
    for classes in [(1,), (2,), (2, 1)]:
        torch.testing.assert_close(
            torch.from_numpy(dice_scores(p, g, classes, both_empty=float("nan"))),
            _old_dice_per_class(p, g, classes), rtol=0, atol=0, equal_nan=True)


def test_dice_scores_rounding_on_large_masks():
    """float32 and float64 are each the correctly rounded ratio, on counts up to 2 x 512^2."""
    from pcl_viewer.evaluate.metrics import dice_scores

    rng = np.random.default_rng(5)
    pred = rng.choice(3, size=(3, 512, 512), p=[0.2, 0.5, 0.3]).astype(np.uint8)
    gold = rng.choice(3, size=(3, 512, 512), p=[0.3, 0.3, 0.4]).astype(np.uint8)
    assert np.array_equal(dice_scores(pred, gold).astype(np.float64), _old_monai_dice(pred, gold))
    assert np.array_equal(dice_scores(pred, gold, dtype="float64").mean(1),
                          [_old_lung_dice(p, g) for p, g in zip(pred, gold, strict=True)])


def test_dice_scores_shapes_and_errors():
    from pcl_viewer.evaluate.metrics import dice_scores

    gold = _two_lungs()
    assert dice_scores(np.roll(gold, 3, axis=1), gold).shape == (1, 2)
    assert dice_scores(gold, gold, classes=(2,)).tolist() == [[1.0]]
    with pytest.raises(ValueError, match="shape"):
        dice_scores(gold[:10], gold)
    with pytest.raises(ValueError, match="dtype"):
        dice_scores(gold, gold, dtype="float16")


def test_dice_scores_in_chunks_equals_one_call(monkeypatch):
    from pcl_viewer.evaluate import metrics

    pred, gold = _random_label_maps(7, n=20)
    whole = metrics.dice_scores(pred, gold, both_empty=float("nan"))
    monkeypatch.setattr(metrics, "_DICE_CHUNK", 3)
    chunked = metrics.dice_scores(pred, gold, both_empty=float("nan"))
    assert np.array_equal(whole, chunked, equal_nan=True) and chunked.shape == (20, 2)
    assert metrics.dice_scores(pred[:0], gold[:0]).shape == (0, 2)
