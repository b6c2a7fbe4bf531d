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


def _one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)  # a ClickException, not a traceback
    text = res.output.strip()
    assert text.startswith("Error: ") and "\n" not in text, text
    return text


def test_segment_user_errors_are_one_line(tmp_path):
    scan = tmp_path / "scan.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(scan)
    res = CliRunner().invoke(segment, [str(scan), "--out", str(tmp_path / "m.jpg")])
    assert "supported: .png, .nii, .nii.gz, .dcm" in _one_line_error(res)
    res = CliRunner().invoke(segment, [str(tmp_path / "missing.png"), "--out", str(tmp_path / "m.png")])
    assert "no such file" in _one_line_error(res)
    bad = tmp_path / "badbundle"
    bad.mkdir()
    (bad / "card.json").write_text("[1, 2")
    res = CliRunner().invoke(segment, [str(scan), "--bundle", str(bad), "--out", str(tmp_path / "m.png")])
    assert "cannot load the segmentation bundle" in _one_line_error(res)
    res = CliRunner().invoke(segment, [str(scan), "--out", str(tmp_path / "m.dcm")])
    assert "is not DICOM" in _one_line_error(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["badbundle", "scan.png"]


def test_segment_dicom_scan_to_dicom_seg(tmp_path):
    import pydicom
    from data_factory import pydicom_file

    from pcl_viewer.data.dicom_seg import SEG_SOP_CLASS, read_dicom_seg

    bundle = _bundle(tmp_path)
    src = pydicom_file("CT_small.dcm")
    out = tmp_path / "labels.dcm"
    res = CliRunner().invoke(segment, [str(src), "--bundle", str(bundle), "--out", str(out)])
    assert res.exit_code == 0, res.output
    seg = pydicom.dcmread(out)
    assert seg.SOPClassUID == SEG_SOP_CLASS
    ref = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert ref.ReferencedSOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID
    labels = read_dicom_seg(out)
    assert labels.shape == (128, 128) and set(np.unique(labels)) <= {0, 1, 2}
    png = tmp_path / "labels.png"
    res = CliRunner().invoke(segment, [str(src), "--bundle", str(bundle), "--out", str(png)])
    assert res.exit_code == 0, res.output
    np.testing.assert_array_equal(np.asarray(Image.open(png)), labels)  # same labels, both formats
