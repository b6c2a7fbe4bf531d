"""Fuzzing the readers: random bytes and mutated valid files give a Scan or a ScanReadError.

Bounded to a few hundred examples (about 10-30 s in all on 2 cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from data_factory import synthetic_cxr, write_dicom, write_nifti, write_png, write_tiff
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pcl_viewer.data.readers import read_scan
from pcl_viewer.data.scan import Scan, ScanReadError

EXTENSIONS = [".png", ".jpg", ".tif", ".dcm", ".nii", ".nii.gz", ""]
FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def _valid_files() -> dict[str, bytes]:
    """One small valid file per format, as bytes."""
    img = synthetic_cxr(24, 20)
    out: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        out[".png"] = write_png(root / "a.png", (img * 255).astype(np.uint8)).read_bytes()
        out[".tif"] = write_tiff(root / "a.tif", (img * 65535).astype(np.uint16)).read_bytes()
        out[".dcm"] = write_dicom(root / "a.dcm", (img * 4095).astype(np.uint16)).read_bytes()
        out[".nii"] = write_nifti(root / "a.nii", img.T).read_bytes()
        out[".nii.gz"] = write_nifti(root / "b.nii.gz", img.T).read_bytes()
        from PIL import Image

        Image.fromarray((img * 255).astype(np.uint8)).save(root / "a.jpg")
        out[".jpg"] = (root / "a.jpg").read_bytes()
    return out


VALID = _valid_files()


def _read_bytes(data: bytes, ext: str) -> None:
    """Write ``data`` as a file with ``ext`` and read it: only a good Scan or ScanReadError."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz{ext}"
        path.write_bytes(data)
        try:
            scan = read_scan(path)
        except ScanReadError as exc:
            assert exc.reason and str(path) in str(exc)
            return
        assert isinstance(scan, Scan) and scan.image.ndim == 2
        assert scan.image.dtype == np.float32 and np.isfinite(scan.image).all()
        assert scan.image.min() >= 0.0 and scan.image.max() <= 1.0


@pytest.mark.parametrize("ext", sorted(VALID))
def test_valid_seed_files_read(ext):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"seed{ext}"
        path.write_bytes(VALID[ext])
        assert read_scan(path).shape == (24, 20)


@FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from(EXTENSIONS))
def test_random_bytes_raise_only_scan_read_error(data, ext):
    _read_bytes(data, ext)


@FUZZ
@given(
    ext=st.sampled_from(sorted(VALID)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_valid_files_raise_only_scan_read_error(ext, flips, cut):
    buf = bytearray(VALID[ext])
    for where, byte in flips:
        buf[int(where * len(buf))] = byte
    if cut is not None:
        buf = buf[: int(cut * len(buf))]
    _read_bytes(bytes(buf), ext)


@FUZZ
@given(ext=st.sampled_from([".png", ".tif", ".dcm", ".nii"]),
       where=st.integers(0, 400), value=st.sampled_from([0, 1, 0x7F, 0x80, 0xFF]))
def test_header_bytes_mutations_raise_only_scan_read_error(ext, where, value):
    """Mutations concentrated on the header, where sizes and types live."""
    buf = bytearray(VALID[ext])
    for i in range(where, min(where + 4, len(buf))):
        buf[i] = value
    _read_bytes(bytes(buf), ext)


@pytest.mark.parametrize("content,name", [(c, n) for c in sorted(VALID) for n in EXTENSIONS
                                          if n and n != c])
def test_a_valid_file_under_another_extension_is_refused(content, name):
    """Each file is decoded only as its extension says: a valid file of another format is
    refused, never read through that other decoder."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"swapped{name}"
        path.write_bytes(VALID[content])
        with pytest.raises(ScanReadError):
            read_scan(path)


def test_time_limited_reads_of_fuzzed_files_raise_only_scan_read_error():
    """The helper process answers hostile bytes like the in-process reader."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for i, ext in enumerate(sorted(VALID) * 3):
            buf = bytearray(VALID[ext])
            for _ in range(4):
                buf[int(rng.integers(0, len(buf)))] = int(rng.integers(0, 256))
            path = Path(d) / f"m{i}{ext}"
            path.write_bytes(bytes(buf))
            try:
                here = read_scan(path)
            except ScanReadError as exc:
                with pytest.raises(ScanReadError) as info:
                    read_scan(path, timeout_s=60)
                assert info.value.reason == exc.reason
                continue
            np.testing.assert_array_equal(read_scan(path, timeout_s=60).image, here.image)
