"""The napari reader, writers and sample data of the plugin (no viewer needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pcl_viewer_napari._reader import napari_get_reader  # noqa: E402
from pcl_viewer_napari._sample_data import SAMPLES, sample_layers  # noqa: E402
from pcl_viewer_napari._writer import write_labels, write_rgb  # noqa: E402

from pcl_viewer.data.scan import ScanReadError  # noqa: E402


def _read(path):
    reader = napari_get_reader(str(path))
    assert reader is not None
    (layer,) = reader(str(path))
    return layer


def test_reader_claims_only_scan_suffixes():
    assert napari_get_reader("a.dcm") and napari_get_reader("b.nii.gz")
    assert napari_get_reader(["a.png", "b.tif"])
    for other in ("a.csv", "b.zarr", "c.npy", "d.nii.zip", ["a.png", "b.txt"]):
        assert napari_get_reader(other) is None


def test_dicom_spacing_becomes_the_layer_scale_and_metadata_is_kept():
    data, kwargs, kind = _read(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert kind == "image" and data.shape == (128, 128) and data.dtype == np.float32
    assert 0.0 <= data.min() and data.max() <= 1.0
    assert kwargs["scale"] == pytest.approx((0.661468, 0.661468))
    assert kwargs["metadata"]["pcl_scan"]["spacing"] == pytest.approx([0.661468, 0.661468])
    assert kwargs["metadata"]["format"] == "dicom"
    json.dumps(kwargs["metadata"])  # layer metadata must stay exportable


def test_monochrome1_dicom_is_inverted_so_bone_stays_bright(tmp_path):
    src = pydicom.data.get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(src)
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = tmp_path / "mono1.dcm"
    ds.save_as(mono1)
    normal, _, _ = _read(src)
    inverted, kwargs, _ = _read(mono1)
    np.testing.assert_allclose(inverted, 1.0 - normal, atol=1e-5)
    assert kwargs["scale"] == pytest.approx((0.3125, 0.3125))


def test_16_bit_png_keeps_its_precision(tmp_path):
    import cv2

    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (64, 1))
    cv2.imwrite(str(tmp_path / "ramp.png"), ramp)
    data, kwargs, _ = _read(tmp_path / "ramp.png")
    assert len(np.unique(data)) == 256 and "scale" not in kwargs


def test_broken_file_raises_the_readers_clear_error(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"DICM" * 10)
    with pytest.raises(ScanReadError, match="broken.dcm"):
        napari_get_reader(str(bad))(str(bad))


def test_labels_writer_round_trips_png_and_nifti(tmp_path):
    from pcl_viewer.data.readers import read_scan

    lab = np.zeros((40, 30), np.uint8)
    lab[5:20, 3:12], lab[5:20, 18:27] = 1, 2
    meta = {"scale": (0.5, 0.25), "metadata": {"view": "factual"}}
    png, side = write_labels(str(tmp_path / "lungs.png"), lab, meta)
    nii, _ = write_labels(str(tmp_path / "lungs.nii.gz"), lab, meta)
    import nibabel as nib
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png)), lab)
    img = nib.load(nii)
    np.testing.assert_array_equal(np.asarray(img.dataobj).T, lab)
    assert img.header.get_zooms()[:2] == pytest.approx((0.25, 0.5))
    assert json.loads(open(side).read()) == {"view": "factual"}
    assert read_scan(png).image.shape == lab.shape


def test_rgb_writer_writes_chromap_png_and_refuses_grey(tmp_path):
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 255, (20, 16, 3), dtype=np.uint8)
    png, _ = write_rgb(str(tmp_path / "map.png"), rgb, {"metadata": {}})
    np.testing.assert_array_equal(np.asarray(Image.open(png)), rgb)
    with pytest.raises(ValueError, match="RGB"):
        write_rgb(str(tmp_path / "grey.png"), rgb[..., 0], {"metadata": {}})


@pytest.mark.parametrize("key", list(SAMPLES))
def test_every_sample_is_a_grey_scan_with_known_parents(key):
    ((data, kwargs, kind),) = sample_layers(key)
    assert kind == "image" and data.ndim == 2 and min(data.shape) >= 256
    assert 0.0 <= data.min() and data.max() <= 1.0 and data.std() > 0.02
    parents = kwargs["metadata"]["true_parents"]
    style, effusion = SAMPLES[key]
    assert parents["style"] == style
    assert parents["effusion"] == ("present" if effusion else "absent")


def test_labels_of_a_dicom_scan_are_written_as_dicom_seg(tmp_path):
    from pcl_viewer.data.dicom_seg import SEG_SOP_CLASS, read_dicom_seg

    src = pydicom.data.get_testdata_file("CT_small.dcm")
    _, kwargs, _ = _read(src)
    assert kwargs["metadata"]["pcl_scan"]["path"] == str(src)
    assert kwargs["metadata"]["pcl_scan"]["spacing_source"] == "PixelSpacing"
    lab = np.zeros((128, 128), np.uint8)
    lab[20:100, 10:50], lab[20:100, 70:120] = 1, 2
    # as the pipeline's labels layers carry it: scan_path
    meta = {"scale": kwargs["scale"], "metadata": {"view": "factual", "scan_path": str(src)}}
    out, side = write_labels(str(tmp_path / "lungs.dcm"), lab, meta)
    assert pydicom.dcmread(out).SOPClassUID == SEG_SOP_CLASS
    np.testing.assert_array_equal(read_dicom_seg(out), lab)
    assert json.loads(open(side).read())["view"] == "factual"
    # as the reader's own layer metadata carries it: pcl_scan.path
    out2, _ = write_labels(str(tmp_path / "again.dcm"), lab, {"metadata": kwargs["metadata"]})
    np.testing.assert_array_equal(read_dicom_seg(out2), lab)


def test_labels_without_a_dicom_source_refuse_dicom_seg_in_one_line(tmp_path):
    png = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 30), np.uint8)).save(png)
    lab = np.zeros((40, 30), np.uint8)
    for metadata in ({}, {"scan_path": str(png)}, {"pcl_scan": {"path": None}}):
        with pytest.raises(ValueError, match="needs the labels' source DICOM scan") as info:
            write_labels(str(tmp_path / "lungs.dcm"), lab, {"metadata": metadata})
        assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.png"]


def test_layer_metadata_says_which_spacing_was_used(tmp_path):
    src = pydicom.data.get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(src)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.4, 0.4]
    ds.EstimatedRadiographicMagnificationFactor = 1.25
    ds.save_as(tmp_path / "dx.dcm")
    _, kwargs, _ = _read(tmp_path / "dx.dcm")
    assert kwargs["scale"] == pytest.approx((0.32, 0.32))
    assert kwargs["metadata"]["pcl_scan"]["spacing_source"] == "ImagerPixelSpacing/ERMF"
    assert kwargs["metadata"]["spacing_source"] == "ImagerPixelSpacing/ERMF"
