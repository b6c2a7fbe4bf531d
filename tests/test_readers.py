"""Scan readers and writers: every format, every awkward input, one error type."""

from __future__ import annotations

import time
from pathlib import Path

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


def _copy_as(src: Path, dst: Path) -> Path:
    """``src``'s bytes under another name (another extension, or none)."""
    dst.write_bytes(src.read_bytes())
    return dst


@pytest.fixture
def dicom_file(tmp_path) -> Path:
    return write_dicom(tmp_path / "a.dcm", (synthetic_cxr(20, 20) * 4095).astype(np.uint16))


def test_extension_mismatch_is_refused(tmp_path, dicom_file):
    fake = _copy_as(dicom_file, tmp_path / "a.png")
    with pytest.raises(ScanReadError, match="cannot decode as PNG: the content looks like DICOM"):
        read_scan(fake)


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


# ------------------------------------------------------------ hardening ---

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n"
       b"/f (MARKER) (w) file def f (pwned) writestring f closefile\n{ } loop\nshowpage\n")


def _png16(path, array: np.ndarray, colour_type: int):
    """A 16-bit PNG written byte by byte (Pillow cannot write 16-bit colour / grey+alpha)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w = array.shape[:2]
    raw = b"".join(b"\x00" + array[i].astype(">u2").tobytes() for i in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def test_eps_named_png_is_refused_without_running_ghostscript(tmp_path, monkeypatch):
    import subprocess

    marker = tmp_path / "gs_ran"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "gs").write_text(f"#!/bin/sh\ntouch {marker}\n")
    (fake / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    spawned = []
    real = subprocess.Popen

    def record(*args, **kwargs):
        spawned.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", record)
    monkeypatch.chdir(tmp_path)
    for name in ("scan001.png", "hang.png", "x.jpg", "x.tif"):
        (tmp_path / name).write_bytes(EPS)
        t0 = time.perf_counter()
        with pytest.raises(ScanReadError, match="looks like PostScript/EPS") as info:
            read_scan(tmp_path / name)
        assert time.perf_counter() - t0 < 2.0
        assert "\n" not in info.value.reason
    assert spawned == [] and not marker.exists()
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("fmt,ext,looks", [("BMP", ".png", "BMP"), ("GIF", ".png", "GIF"),
                                           ("PNG", ".jpg", "PNG"), ("JPEG", ".tif", "JPEG"),
                                           ("TIFF", ".png", "TIFF"), ("WEBP", ".jpg", "RIFF")])
def test_other_formats_under_a_scan_extension_are_refused(tmp_path, fmt, ext, looks):
    from PIL import Image

    path = tmp_path / f"a{ext}"
    Image.fromarray((synthetic_cxr(32, 32) * 255).astype(np.uint8)).convert(
        "RGB" if fmt == "WEBP" else "L").save(path, format=fmt)
    with pytest.raises(ScanReadError, match=f"looks like {looks}"):
        read_scan(path)


@pytest.mark.parametrize("name", ["IM0001", "1.2.840.113619.2.55.3.604688119"])
def test_a_dicom_file_without_an_extension_is_sniffed(tmp_path, dicom_file, name):
    assert read_scan(_copy_as(dicom_file, tmp_path / name)).metadata["format"] == "dicom"


def test_other_formats_are_not_read_without_an_extension(tmp_path):
    png = write_png(tmp_path / "p.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(ScanReadError, match="only DICOM files are read without an extension"):
        read_scan(_copy_as(png, tmp_path / "IMG0001"))


def test_an_unsupported_extension_is_refused(tmp_path, dicom_file):
    with pytest.raises(ScanReadError, match="unsupported file type '.bmp'"):
        read_scan(_copy_as(dicom_file, tmp_path / "scan.bmp"))


def test_pixel_budget_counts_channels_and_gives_the_size(tmp_path):
    from pcl_viewer.data.readers import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == 2**26
    path = huge_png_header(tmp_path / "big.png", 9000, 9000)
    t0 = time.perf_counter()
    with pytest.raises(ScanReadError, match="9000 x 9000 pixels = 81,000,000 samples: too many"):
        read_scan(path)
    assert time.perf_counter() - t0 < 1.0
    rgba = np.zeros((40, 30, 4), np.uint8)
    p = write_png(tmp_path / "rgba.png", rgba)
    with pytest.raises(ScanReadError, match="x 4 channels = 4,800 samples"):
        read_scan(p, max_pixels=4000)
    assert read_scan(p, max_pixels=4800).shape == (40, 30)
    with pytest.raises(ScanReadError) as info:  # no budget: the header passes, the data is short
        read_scan(path, max_pixels=None)
    assert "too many" not in info.value.reason and "cannot decode" in info.value.reason


def test_float64_tiff_with_extreme_values_has_no_nan(tmp_path):
    img = np.zeros((32, 32), np.float64)
    img[:16], img[16:, :8] = 1e308, -1e308
    scan = read_scan(write_tiff(tmp_path / "f.tif", img))
    assert np.isfinite(scan.image).all()
    assert scan.image.max() == 1.0 and scan.image.min() == 0.0
    np.testing.assert_allclose(scan.image[20, 20], 0.5, atol=1e-6)  # 0 is midway


@pytest.mark.parametrize("colour_type,channels", [(2, 3), (4, 2), (6, 4)])
def test_16_bit_colour_and_grey_alpha_png_keep_16_bits(tmp_path, colour_type, channels):
    grey = (np.linspace(0, 65535, 40 * 32).reshape(40, 32)).astype(np.uint16)
    arr = np.stack([grey] * channels, -1)
    if channels in (2, 4):
        arr[..., -1] = 65535 - grey  # alpha, ignored
    scan = read_scan(_png16(tmp_path / "c.png", arr, colour_type))
    np.testing.assert_allclose(scan.image, grey / 65535.0, atol=1e-6)
    assert len(np.unique(scan.image)) == grey.size  # 8 bits would leave at most 256 levels


def test_fifo_and_device_symlink_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    link = tmp_path / "zero.png"
    link.symlink_to("/dev/zero")
    for timeout in (None, 10.0):
        t0 = time.perf_counter()
        with pytest.raises(ScanReadError, match="not a regular file: FIFO"):
            read_scan(fifo, timeout_s=timeout)
        with pytest.raises(ScanReadError,
                           match=r"not a regular file: character device \(symlink to /dev/zero\)"):
            read_scan(link, timeout_s=timeout)
        assert time.perf_counter() - t0 < 5.0
    dangling = tmp_path / "gone.png"
    dangling.symlink_to(tmp_path / "nothing.png")
    with pytest.raises(ScanReadError, match="symlink to a missing file"):
        read_scan(dangling)


def test_time_limited_read_equals_the_plain_read_and_kills_a_slow_decode(tmp_path):
    from pcl_viewer.data import readers

    small = write_dicom(tmp_path / "a.dcm", (synthetic_cxr(40, 30) * 4095).astype(np.uint16),
                        photometric="MONOCHROME1")
    plain = read_scan(small)
    timed = read_scan(small, timeout_s=60)
    np.testing.assert_array_equal(timed.image, plain.image)
    assert timed.spacing == plain.spacing and timed.metadata == plain.metadata
    assert timed.image.flags.writeable
    with pytest.raises(ScanReadError, match="too small"):
        read_scan(write_png(tmp_path / "t.png", np.zeros((4, 4), np.uint8)), timeout_s=60)
    # a decode that needs far longer than the limit: noise does not compress
    noise = np.random.default_rng(0).integers(0, 65535, (3000, 3000), dtype=np.uint16)
    big = write_png(tmp_path / "noise.png", noise)
    readers._WORKER.stop()
    read_scan(small, timeout_s=60)
    (pid,) = [p for p in readers._WORKER.pids() if p is not None]
    t0 = time.perf_counter()
    with pytest.raises(ScanReadError, match="longer than the time limit of 0.001 s"):
        read_scan(big, timeout_s=0.001)
    assert time.perf_counter() - t0 < 10.0
    assert pid not in readers._WORKER.pids()  # the helper was killed
    np.testing.assert_array_equal(read_scan(small, timeout_s=60).image, plain.image)  # restarted


def test_a_dead_helper_is_replaced_on_the_next_timed_read(tmp_path):
    import os
    import signal

    from pcl_viewer.data import readers

    path = write_png(tmp_path / "a.png", (synthetic_cxr(32, 32) * 255).astype(np.uint8))
    first = read_scan(path, timeout_s=60)
    for pid in readers._WORKER.pids():
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    np.testing.assert_array_equal(read_scan(path, timeout_s=60).image, first.image)


def test_concurrent_timed_reads_use_one_helper_each(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from pcl_viewer.data import readers

    readers._WORKER.stop()
    paths = [write_png(tmp_path / f"{i}.png", (synthetic_cxr(64, 48, seed=i) * 255).astype(np.uint8))
             for i in range(6)]
    with ThreadPoolExecutor(2) as pool:
        scans = list(pool.map(lambda p: read_scan(p, timeout_s=60), paths))
    for p, scan in zip(paths, scans):
        np.testing.assert_array_equal(scan.image, read_scan(p).image)
    assert 1 <= len([p for p in readers._WORKER.pids() if p is not None]) <= 2
