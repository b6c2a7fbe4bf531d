"""Scan readers and writers: every format, every awkward input, one error type."""

from __future__ import annotations

import time

import numpy as np
import pytest
from data_factory import (
    build_corpus,
    huge_png_header,
    pydicom_file,
    synthetic_cxr,
    write_dicom,
    write_nifti,
    write_png,
    write_tiff,
)

from pcl_viewer.data.readers import MIN_SIDE, read_scan, write_labels, write_rgb
from pcl_viewer.data.scan import ScanReadError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_corpus_each_case_is_read_or_refused_as_specified(corpus):
    assert len(corpus) >= 18
    for name, case in corpus.items():
        if case.readable:
            scan = read_scan(case.path)
            assert scan.image.dtype == np.float32, name
            assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0, name
            assert np.isfinite(scan.image).all(), name
            joined = " ".join(scan.metadata["notices"]) + scan.metadata["normalisation"]
            assert case.expect in joined, (name, joined)
        else:
            with pytest.raises(ScanReadError) as info:
                read_scan(case.path)
            assert case.expect in info.value.reason, (name, info.value.reason)
            assert str(case.path) in str(info.value)


def test_png_8bit_is_scaled_by_255(tmp_path):
    img = (synthetic_cxr(48, 40) * 255).astype(np.uint8)
    scan = read_scan(write_png(tmp_path / "a.png", img))
    assert scan.shape == (48, 40)
    np.testing.assert_allclose(scan.image, img / 255.0, atol=1e-6)
    assert scan.name == "a" and scan.spacing is None


def test_png_16bit_full_range_keeps_precision(tmp_path):
    img = (synthetic_cxr(48, 40) * 65535).astype(np.uint16)
    scan = read_scan(write_png(tmp_path / "a.png", img))
    np.testing.assert_allclose(scan.image, img / 65535.0, atol=1e-6)
    assert "16 bits" in scan.metadata["normalisation"]


def test_png_16bit_12bit_data_scaled_by_4095(tmp_path):
    img = (synthetic_cxr(32, 32) * 4095).astype(np.uint16)
    scan = read_scan(write_png(tmp_path / "a.png", img))
    np.testing.assert_allclose(scan.image, img / 4095.0, atol=1e-6)


def test_rgb_is_luma_of_channels_with_notice(tmp_path):
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 200
    scan = read_scan(write_png(tmp_path / "r.png", rgb))
    np.testing.assert_allclose(scan.image, round(0.299 * 200) / 255, atol=1e-6)
    assert any("grey" in n for n in scan.metadata["notices"])


def test_rgba_ignores_alpha(tmp_path):
    rgb = (np.random.default_rng(0).random((24, 24, 3)) * 255).astype(np.uint8)
    a = read_scan(write_png(tmp_path / "rgb.png", rgb)).image
    rgba = np.concatenate([rgb, np.zeros((24, 24, 1), np.uint8)], -1)
    b = read_scan(write_png(tmp_path / "rgba.png", rgba))
    np.testing.assert_array_equal(a, b.image)
    assert "alpha channel ignored" in b.metadata["notices"]


def test_jpeg_reads_grey(tmp_path):
    from PIL import Image

    img = (synthetic_cxr(40, 56) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    scan = read_scan(tmp_path / "a.jpg")
    assert scan.shape == (40, 56)
    assert np.abs(scan.image - img / 255.0).mean() < 0.02


def test_tiff_16bit_and_rgb(tmp_path):
    img = (synthetic_cxr(30, 50) * 65535).astype(np.uint16)
    np.testing.assert_allclose(read_scan(write_tiff(tmp_path / "a.tif", img)).image, img / 65535, atol=1e-6)
    rgb = np.stack([img, img, img], -1)
    scan = read_scan(write_tiff(tmp_path / "c.tiff", rgb))
    np.testing.assert_allclose(scan.image, img / 65535, atol=1e-4)
    assert scan.shape == (30, 50)


def test_dicom_spacing_tags_and_no_identifiers(tmp_path):
    img = (synthetic_cxr(40, 30) * 4095).astype(np.uint16)
    scan = read_scan(write_dicom(tmp_path / "a.dcm", img, spacing=(0.2, 0.25)))
    assert scan.spacing == (0.2, 0.25)
    tags = scan.metadata["dicom"]
    assert tags["Modality"] == "DX" and tags["PatientSex"] == "F"
    assert "PatientName" not in tags and "PatientID" not in tags
    assert "SECRET" not in repr(scan.metadata)
    # No VOI window, no rescale: min-max of the stored values.
    expected = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_allclose(scan.image, expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(tmp_path):
    img = (synthetic_cxr(40, 30) * 4095).astype(np.uint16)
    mono2 = read_scan(write_dicom(tmp_path / "m2.dcm", img)).image
    mono1 = read_scan(write_dicom(tmp_path / "m1.dcm", 4095 - img, photometric="MONOCHROME1")).image
    np.testing.assert_allclose(mono1, mono2, atol=1e-6)


def test_dicom_window_is_applied(tmp_path):
    import pydicom

    img = (synthetic_cxr(40, 30) * 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "w.dcm", img)
    ds = pydicom.dcmread(path)
    ds.WindowCenter, ds.WindowWidth = 1000, 400  # clips most of the body
    ds.save_as(path)
    scan = read_scan(path).image
    assert (scan == 1.0).mean() > 0.3 and (scan == 0.0).any()


def test_pydicom_ct_small_has_spacing_and_hu_range():
    scan = read_scan(pydicom_file("CT_small.dcm"))
    assert scan.shape == (128, 128)
    assert scan.spacing == pytest.approx((0.661468, 0.661468))
    assert scan.metadata["dicom"]["Modality"] == "CT"


@pytest.mark.parametrize("name", ["rtplan.dcm", "rtstruct.dcm", "waveform_ecg.dcm", "MR_truncated.dcm",
                                  "rtdose.dcm", "SC_rgb_small_odd.dcm"])
def test_pydicom_unusable_files_raise_scan_read_error(name):
    with pytest.raises(ScanReadError):
        read_scan(pydicom_file(name))


def test_nifti_2d_orientation_spacing_and_singletons(tmp_path):
    img = synthetic_cxr(40, 30)
    scan = read_scan(write_nifti(tmp_path / "a.nii.gz", img.T[:, :, None], zooms=(0.3, 0.2, 1.0)))
    assert scan.shape == (40, 30) and scan.name == "a"
    assert scan.spacing == pytest.approx((0.2, 0.3))
    expected = (img - img.min()) / (img.max() - img.min())
    np.testing.assert_allclose(scan.image, expected, atol=1e-6)


def test_huge_header_refused_fast_before_decoding(tmp_path):
    path = huge_png_header(tmp_path / "bomb.png", 60000, 60000)
    t0 = time.perf_counter()
    with pytest.raises(ScanReadError, match="too many pixels"):
        read_scan(path)
    assert time.perf_counter() - t0 < 1.0


def test_long_thin_header_refused_by_side_limit(tmp_path):
    path = huge_png_header(tmp_path / "thin.png", 30000, 100)
    with pytest.raises(ScanReadError, match="px per side"):
        read_scan(path)


def test_minimum_side(tmp_path):
    ok = read_scan(write_png(tmp_path / "ok.png", np.zeros((MIN_SIDE, MIN_SIDE), np.uint8)))
    assert ok.shape == (MIN_SIDE, MIN_SIDE)
    with pytest.raises(ScanReadError, match="too small"):
        read_scan(write_png(tmp_path / "small.png", np.zeros((MIN_SIDE - 1, 64), np.uint8)))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ScanReadError, match="no such file"):
        read_scan(tmp_path / "nope.png")
    with pytest.raises(ScanReadError, match="not a regular file"):
        read_scan(tmp_path)


def test_extension_mismatch_is_refused(tmp_path):
    dcm = write_dicom(tmp_path / "a.dcm", np.zeros((20, 20), np.uint16))
    fake = tmp_path / "a.png"
    fake.write_bytes(dcm.read_bytes())
    with pytest.raises(ScanReadError, match="cannot decode as PNG: the content looks like DICOM"):
        read_scan(fake)


def test_no_extension_is_sniffed(tmp_path):
    img = (synthetic_cxr(20, 20) * 4095).astype(np.uint16)
    dcm = write_dicom(tmp_path / "a.dcm", img)
    bare = tmp_path / "IM0001"
    bare.write_bytes(dcm.read_bytes())
    assert read_scan(bare).metadata["format"] == "dicom"


def test_write_labels_png_and_nifti_round_trip(tmp_path):
    labels = np.zeros((40, 30), np.uint8)
    labels[5:20, 3:10], labels[5:20, 15:25] = 1, 2
    write_labels(tmp_path / "m.png", labels)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "m.png")), labels)
    write_labels(tmp_path / "m.nii.gz", labels, spacing=(0.2, 0.3))
    import nibabel as nib

    back = np.asarray(nib.load(tmp_path / "m.nii.gz").dataobj).T
    np.testing.assert_array_equal(back, labels)
    assert read_scan(tmp_path / "m.nii.gz").spacing == pytest.approx((0.2, 0.3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz", "m.png"]  # no temp files left


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        write_labels(tmp_path / "m.png", np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError):
        write_labels(tmp_path / "m.png", np.full((4, 4), 300))
    with pytest.raises(ValueError):
        write_labels(tmp_path / "m.jpg", np.zeros((4, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_write_rgb_atomic_replace(tmp_path):
    rgb = np.zeros((10, 12, 3), np.uint8)
    rgb[..., 1] = 99
    out = tmp_path / "o.png"
    out.write_bytes(b"old")
    write_rgb(out, rgb)
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(out)), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]
    with pytest.raises(ValueError):
        write_rgb(tmp_path / "x.png", rgb.astype(np.float32))


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    from PIL import Image

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError):
        write_rgb(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []



def test_lzw_tiff_written_by_pillow(tmp_path):
    from PIL import Image

    img = (synthetic_cxr(40, 30) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "l.tif", compression="tiff_lzw")
    np.testing.assert_allclose(read_scan(tmp_path / "l.tif").image, img / 255.0, atol=1e-6)
