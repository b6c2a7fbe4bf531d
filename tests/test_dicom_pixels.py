"""DICOM pixel semantics in the radiology order, and spacing, on real pydicom files and
files derived from them (tags changed with pydicom, saved to tmp_path)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from data_factory import synthetic_cxr, write_dicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from pcl_viewer.data.readers import read_scan

CR = "dicomdirtests/77654033/CR1/6154"  # a real CR: MONOCHROME1, rescale, window, ImagerPixelSpacing


def _cr() -> str:
    from pathlib import Path

    path = Path(pydicom.__file__).parent / "data" / "test_files" / CR
    assert path.is_file(), path
    return str(path)


def _derive(tmp_path, src: str, name: str, **tags) -> str:
    """Copy ``src`` with tags set (value None deletes the tag)."""
    ds = pydicom.dcmread(src)
    for key, value in tags.items():
        if value is None:
            if key in ds:
                delattr(ds, key)
        else:
            setattr(ds, key, value)
    out = tmp_path / name
    ds.save_as(out)
    return str(out)


def test_real_cr_monochrome1_is_inverted_and_window_applied():
    scan = read_scan(_cr())
    assert scan.metadata["inverted"] is True
    assert "MONOCHROME1 inverted so that bone is bright" in scan.metadata["notices"]
    assert "window center 1600 width 2800" in scan.metadata["normalisation"]
    # below the window (modality value <= c - 0.5 - (w - 1) / 2) is black before, white after inversion
    ds = pydicom.dcmread(_cr())
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    below = hu <= 1600 - 0.5 - (2800 - 1) / 2
    np.testing.assert_array_equal(scan.image[below], 1.0)
    assert 0.0 <= scan.image.min() and scan.image.max() <= 1.0


def test_monochrome2_of_the_same_pixels_is_the_inverse(tmp_path):
    mono1 = read_scan(_cr()).image
    mono2 = read_scan(_derive(tmp_path, _cr(), "m2.dcm", PhotometricInterpretation="MONOCHROME2"))
    np.testing.assert_allclose(mono2.image, 1.0 - mono1, atol=1e-6)
    assert mono2.metadata["inverted"] is False


def test_presentation_lut_shape_inverse_is_honoured_once(tmp_path):
    mono1 = read_scan(_cr()).image
    both = read_scan(_derive(tmp_path, _cr(), "b.dcm", PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(both.image, mono1)  # MONOCHROME1 + INVERSE: one inversion
    inv2 = read_scan(_derive(tmp_path, _cr(), "i.dcm", PhotometricInterpretation="MONOCHROME2",
                             PresentationLUTShape="INVERSE"))
    np.testing.assert_array_equal(inv2.image, mono1)
    assert "PresentationLUTShape INVERSE inverted" in " ".join(inv2.metadata["notices"])
    ident = read_scan(_derive(tmp_path, _cr(), "d.dcm", PhotometricInterpretation="MONOCHROME2",
                              PresentationLUTShape="IDENTITY"))
    np.testing.assert_allclose(ident.image, 1.0 - mono1, atol=1e-6)


@pytest.mark.parametrize("width", [0, "0", -5, None])
def test_zero_negative_or_absent_window_width_means_full_range(tmp_path, width):
    path = _derive(tmp_path, _cr(), "w.dcm", WindowWidth=width,
                   WindowCenter=None if width is None else 1600)
    scan = read_scan(path)
    ds = pydicom.dcmread(_cr())
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = 1.0 - (hu - hu.min()) / (hu.max() - hu.min())  # full range, then MONOCHROME1
    np.testing.assert_allclose(scan.image, expected, atol=1e-6)
    assert "full range" in scan.metadata["normalisation"]


def test_window_follows_the_modality_lut(tmp_path):
    """Shifting the rescale intercept and the window center together changes nothing."""
    ref = read_scan(_cr()).image
    ds = pydicom.dcmread(_cr())
    shifted = _derive(tmp_path, _cr(), "s.dcm", RescaleIntercept=float(ds.RescaleIntercept) + 500,
                      WindowCenter=float(ds.WindowCenter) + 500)
    np.testing.assert_allclose(read_scan(shifted).image, ref, atol=1e-6)
    only_window = _derive(tmp_path, _cr(), "o.dcm", WindowCenter=float(ds.WindowCenter) + 500)
    assert np.abs(read_scan(only_window).image - ref).max() > 0.05


def _grey_dicom(tmp_path, name="g.dcm"):
    img = (synthetic_cxr(48, 40) * 4095).astype(np.uint16)
    return img, write_dicom(tmp_path / name, img)


def _reversing_lut(**fields) -> Dataset:
    """A 12-bit LUT item mapping v to 4095 - v (LUTData), with ``fields`` added."""
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    for key, value in fields.items():
        setattr(item, key, value)
    item.add_new(0x00283006, "US", [4095 - i for i in range(4096)])  # LUTData
    return item


def test_voi_lut_sequence_takes_precedence_over_the_window(tmp_path):
    img, path = _grey_dicom(tmp_path)
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = [_reversing_lut()]
    ds.WindowCenter, ds.WindowWidth = 100, 10  # would clip almost everything
    ds.save_as(path)
    scan = read_scan(path)
    np.testing.assert_allclose(scan.image, 1.0 - img / 4095.0, atol=1e-6)
    assert "VOI LUT sequence" in scan.metadata["normalisation"]


def test_modality_lut_sequence_comes_before_the_full_range(tmp_path):
    img, path = _grey_dicom(tmp_path)
    ds = pydicom.dcmread(path)
    ds.ModalityLUTSequence = [_reversing_lut(ModalityLUTType="US")]
    ds.save_as(path)
    expected = 1.0 - (img - img.min()) / float(img.max() - img.min())
    np.testing.assert_allclose(read_scan(path).image, expected, atol=1e-6)


def test_a_cr_is_measured_at_the_detector(tmp_path):
    cr = read_scan(_cr())
    assert (cr.spacing, cr.metadata["spacing_source"]) == (
        pytest.approx((0.1, 0.1)), "ImagerPixelSpacing")
    assert any("detector" in n for n in cr.metadata["notices"])


def test_the_magnification_factor_corrects_the_detector_spacing(tmp_path):
    ermf = read_scan(_derive(tmp_path, _cr(), "e.dcm", EstimatedRadiographicMagnificationFactor=1.25))
    assert (ermf.spacing, ermf.metadata["spacing_source"]) == (
        pytest.approx((0.08, 0.08)), "ImagerPixelSpacing/ERMF")


def test_pixel_spacing_comes_before_the_detector_spacing(tmp_path):
    both = read_scan(_derive(tmp_path, _cr(), "p.dcm", PixelSpacing=[0.09, 0.07],
                             EstimatedRadiographicMagnificationFactor=1.25))
    assert (both.spacing, both.metadata["spacing_source"]) == (
        pytest.approx((0.09, 0.07)), "PixelSpacing")


def test_no_spacing_attribute_gives_no_spacing(tmp_path):
    none = read_scan(_derive(tmp_path, _cr(), "n.dcm", ImagerPixelSpacing=None))
    assert (none.spacing, none.metadata["spacing_source"]) == (None, None)


def test_a_ct_slice_uses_its_pixel_spacing():
    ct = read_scan(get_testdata_file("CT_small.dcm"))
    assert ct.metadata["spacing_source"] == "PixelSpacing"
