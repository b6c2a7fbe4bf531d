"""The shipped segmenter's recipe: MONAI strong augmentation and `pcl train-seg`."""

from __future__ import annotations

import json

import numpy as np
import torch

from pcl_viewer.train.finetune import monai_augment


def test_monai_augment_is_seeded_and_keeps_labels():
    x = torch.rand(6, 1, 64, 64)
    y = torch.zeros(6, 64, 64, dtype=torch.long)
    y[:, 10:40, 8:28], y[:, 10:40, 36:56] = 1, 2
    a = monai_augment(x, y, torch.Generator().manual_seed(3))
    b = monai_augment(x, y, torch.Generator().manual_seed(3))
    c = monai_augment(x, y, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    xa, ya = a
    assert xa.shape == x.shape and xa.dtype == torch.float32 and ya.shape == y.shape
    assert 0.0 <= float(xa.min()) and float(xa.max()) <= 1.0
    assert set(ya.unique().tolist()) <= {0, 1, 2}
    # geometry moves image and labels together: both lungs survive in most samples
    assert sum(int((ya[i] == 1).any() and (ya[i] == 2).any()) for i in range(6)) >= 4


def test_train_seg_writes_a_bundle_with_its_card(tmp_path, one_torch_thread):
    from click.testing import CliRunner

    from pcl_viewer.commands.trainseg import train_seg
    from pcl_viewer.models.bundle import ModelBundle

    out = tmp_path / "seg"
    res = CliRunner().invoke(train_seg, ["--out", str(out), "--cache", str(tmp_path / "c"),
                                         "--n", "8", "--easy-share", "0.25", "--epochs", "1",
                                         "--eval-n", "4", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    card = json.loads((out / "card.json").read_text()) if (out / "card.json").exists() else \
        ModelBundle.load(out, kind="segmentation").card
    fresh = card["metrics"]["fresh_phantom"]
    assert {r["regime"] for r in fresh} == {"realistic", "easy"}
    assert all(np.isfinite(r["dice"]) for r in fresh)
    assert card["training"]["finetune"]["augmentation"] == "monai"
    model = ModelBundle.load(out, kind="segmentation").build("unet")
    assert model(torch.rand(1, 1, 128, 128)).shape == (1, 3, 128, 128)
