"""The shipped segmenter's recipe: MONAI strong augmentation and `pcl train-seg`."""

from __future__ import annotations

import json

import numpy as np
import torch

from pcl_viewer.train.finetune import monai_augment


def _lungs(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random images with the same two rectangular lungs labelled 1 and 2."""
    x = torch.rand(n, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, 64, 64, dtype=torch.long)
    y[:, 10:40, 8:28], y[:, 10:40, 36:56] = 1, 2
    return x, y


def _augment(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return monai_augment(*_lungs(), torch.Generator().manual_seed(seed))


def test_monai_augment_is_seeded():
    (xa, ya), (xb, yb) = _augment(3), _augment(3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(xa, _augment(4)[0])


def test_monai_augment_keeps_shapes_range_and_labels():
    x, y = _lungs()
    xa, ya = _augment(3)
    assert (xa.shape, xa.dtype, ya.shape) == (x.shape, torch.float32, y.shape)
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    assert set(ya.unique().tolist()) <= {0, 1, 2}


def test_monai_augment_moves_image_and_labels_together():
    """Both lungs survive the geometry in most samples."""
    _, ya = _augment(3)
    assert sum(int((ya[i] == 1).any() and (ya[i] == 2).any()) for i in range(6)) >= 4


def test_train_seg_writes_a_bundle_with_its_card(tmp_path, one_torch_thread):
    from click.testing import CliRunner

    from pcl_viewer.commands.trainseg import train_seg
    from pcl_viewer.models.bundle import ModelBundle

    out = tmp_path / "seg"
    res = CliRunner().invoke(train_seg, ["--out", str(out), "--cache", str(tmp_path / "c"),
                                         "--n", "8", "--easy-share", "0.25", "--epochs", "1",
                                         "--eval-n", "4", "--device", "cpu",
                                         "--effusion-oversample", "20"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "card.json").read_text()) if (out / "card.json").exists() else \
        ModelBundle.load(out, kind="segmentation").card
    fresh = card["metrics"]["fresh_phantom"]
    assert {r["regime"] for r in fresh} == {"realistic", "easy"}
    assert all(np.isfinite(r["dice"]) for r in fresh)
    assert card["training"]["finetune"]["augmentation"] == "monai"
    assert "effusion oversample 20" in card["training"]["data"]
    pool = json.loads((tmp_path / "c" / "ship-real-s201-n8-eo20" / "dataset.json").read_text())
    assert pool["effusion_oversample"] == 20.0  # its own pool, not the default one
    model = ModelBundle.load(out, kind="segmentation").build("unet")
    assert model(torch.rand(1, 1, 128, 128)).shape == (1, 3, 128, 128)
    # the resumable state is gone once the bundle is written: a rerun trains afresh
    assert not list((tmp_path / "c").glob("train-seg-*"))
