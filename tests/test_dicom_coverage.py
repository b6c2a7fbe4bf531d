"""Every single-frame 2-D image among pydicom's test files reads, or fails in one complete line."""

from __future__ import annotations

import numpy as np
import pytest
from data_factory import pydicom_file

from pcl_viewer.data import readers
from pcl_viewer.data.dicom_coverage import outcome, sample_images, table
from pcl_viewer.data.readers import read_scan

# Files no installed decoder can decode, or whose header is corrupt; each must give one line.
UNDECODABLE = {
    "JPEG-lossy.dcm": "libjpeg error",  # 12-bit JPEG Extended with a broken scan header
    "JPEG2000-embedded-sequence-delimiter.dcm": "failed to read the header",
    "MR_truncated.dcm": "less than expected",
    "badVR.dcm": "NumberOfFrames '1A' is not a number",
}


@pytest.fixture(scope="module")
def images():
    return [im for im in sample_images() if im.single_frame_2d]


def test_walk_every_test_image(images, monkeypatch):
    """With the minimum side lifted, everything reads except the truly undecodable files."""
    assert len(images) >= 80
    monkeypatch.setattr(readers, "MIN_SIDE", 1)
    refused = {}
    for im in images:
        ok, what = outcome(im.path)
        if not ok:
            refused[im.path.name] = what
            continue
        h, w = (int(v) for v in what.split(" x "))
        assert h >= 1 and w >= 1
    assert set(refused) == set(UNDECODABLE), refused
    for name, reason in refused.items():
        assert UNDECODABLE[name] in reason, (name, reason)
        assert "\n" not in reason and not reason.rstrip().endswith(":"), reason
        assert not reason.startswith("UNCAUGHT"), reason


def test_table_lists_transfer_syntax_photometric_and_outcome(images):
    text, ok, total = table(images[:6])
    lines = text.splitlines()
    assert lines[0] == "| file | transfer syntax | photometric | outcome |"
    assert len(lines) == 2 + total == 8
    assert 0 < ok <= total
    assert all(line.count("|") == 5 for line in lines)


def test_compressed_lossless_grey_equals_uncompressed():
    ref = read_scan(pydicom_file("MR_small.dcm")).image
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm"):
        np.testing.assert_array_equal(read_scan(pydicom_file(name)).image, ref, err_msg=name)


def test_jpeg_lossless_sv1_and_jpeg2000_colour_equal_rle():
    ref = read_scan(pydicom_file("SC_rgb_rle.dcm")).image
    for name in ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_gdcm_KY.dcm"):
        np.testing.assert_array_equal(read_scan(pydicom_file(name)).image, ref, err_msg=name)


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "SC_rgb_dcmtk_+eb+cy+s2.dcm"])
def test_ybr_colour_is_converted_once(name):
    """YBR files equal the lossless RGB original up to JPEG loss (converting twice is off by ~0.5)."""
    ref = read_scan(pydicom_file("SC_rgb_rle.dcm")).image
    scan = read_scan(pydicom_file(name))
    assert np.abs(scan.image - ref).max() < 0.02
    assert "converted to grey" in " ".join(scan.metadata["notices"])


def test_ybr_rct_jpeg2000_reads():
    scan = read_scan(pydicom_file("examples_jpeg2k.dcm"))
    assert scan.shape == (480, 640) and 0.05 < scan.image.mean() < 0.95


def test_jpeg_extended_12_bit_reads():
    scan = read_scan(pydicom_file("JPGExtended.dcm"))
    assert scan.image.std() > 0.01


def test_missing_decoder_names_the_packages(monkeypatch):
    """With the plugins unavailable, the one-line error names what to install."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    decoder = get_decoder(JPEGLSLossless)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-libjpeg")})
    with pytest.raises(readers.ScanReadError) as info:
        read_scan(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))
    reason = info.value.reason
    assert "\n" not in reason
    assert "install pylibjpeg and pylibjpeg-libjpeg" in reason
