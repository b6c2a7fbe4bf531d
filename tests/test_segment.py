"""`pcl segment`: any scan size in, labels at the scan's native size out."""

import numpy as np
from click.testing import CliRunner
from PIL import Image

from pcl_viewer.commands.segment import segment
from pcl_viewer.evaluate.phantom_eval import segment_image
from pcl_viewer.models.unet import build_unet
from pcl_viewer.train.finetune import save_segmentation_bundle


def _bundle(tmp_path):
    model = build_unet("smoke")
    return save_segmentation_bundle(tmp_path / "seg", model, {"name": "toy-seg", "version": "0"})


def test_segment_image_returns_labels_at_native_non_square_size():
    model = build_unet("smoke").eval()
    image = np.random.default_rng(0).random((90, 150)).astype(np.float32)
    labels = segment_image(image, model, 64)
    assert labels.shape == (90, 150) and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_segment_command_writes_native_size_png(tmp_path):
    bundle = _bundle(tmp_path)
    scan = tmp_path / "scan.png"
    arr = (np.random.default_rng(1).random((130, 97)) * 65535).astype(np.uint16)
    Image.fromarray(arr).save(scan)
    out = tmp_path / "mask.png"
    res = CliRunner().invoke(segment, [str(scan), "--bundle", str(bundle), "--out", str(out)])
    assert res.exit_code == 0, res.output
    mask = np.asarray(Image.open(out))
    assert mask.shape == (130, 97)
    assert set(np.unique(mask)) <= {0, 1, 2}
    assert "97x130 px" in res.output


def test_segment_refuses_a_bundle_of_another_kind(tmp_path):
    from pcl_viewer.models.bundle import save_bundle

    model = build_unet("smoke")
    cfg = {"unet": model.cfg.to_dict(), "heads": ["seg"]}
    bad = tmp_path / "pre"
    save_bundle(bad, {"name": "p", "kind": "pretrained"}, {"unet": ("dense-unet", cfg, model)})
    scan = tmp_path / "scan.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(scan)
    res = CliRunner().invoke(segment, [str(scan), "--bundle", str(bad), "--out",
                                       str(tmp_path / "m.png")])
    assert res.exit_code != 0
    assert "expected 'segmentation'" in str(res.exception) + res.output
