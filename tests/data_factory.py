"""Builders of test scans in every supported format, and the bad-input corpus.

Importable by any test (``from data_factory import build_corpus``): reader
tests, fuzzing, and batch-review tests that need a folder of awkward files.
Everything is written under a caller-given (tmp) folder; nothing is downloaded.
"""

from __future__ import annotations

import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def synthetic_cxr(height: int = 96, width: int = 80, seed: int = 0) -> np.ndarray:
    """A smooth chest-like ``(H, W)`` float32 image in [0, 1]: two dark lung fields, bright body."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    img = 0.75 - 0.1 * yy
    for cx in (0.3, 0.7):
        lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1
        img = np.where(lung, 0.25 + 0.05 * np.sin(20 * yy), img)
    img = img + 0.02 * rng.standard_normal((height, width))
    return np.clip(img, 0, 1).astype(np.float32)


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write a uint8/uint16 grey ``(H, W)`` or uint8 ``(H, W, 3|4)`` array as PNG."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
    return Path(path)


def write_tiff(path: Path, array: np.ndarray, photometric: str | None = None) -> Path:
    """Write a 2-D, ``(H, W, 3)`` colour, or ``(F, H, W)`` stack (photometric="minisblack") TIFF."""
    import tifffile

    tifffile.imwrite(path, np.ascontiguousarray(array), photometric=photometric)
    return Path(path)


def write_nifti(path: Path, array: np.ndarray, zooms: tuple[float, ...] | None = None) -> Path:
    """Write an ``(x, y[, z])`` array as NIfTI-1 (``.nii`` or ``.nii.gz``)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array), np.eye(4))
    if zooms:
        img.header.set_zooms(zooms)
    nib.save(img, str(path))
    return Path(path)


def write_dicom(path: Path, array: np.ndarray, photometric: str = "MONOCHROME2",
                spacing: tuple[float, float] | None = (0.2, 0.25), bits_stored: int = 12) -> Path:
    """Write a grey ``(H, W)`` uint16 array as an uncompressed DX DICOM file."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(array, dtype=np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Phantom^Test"
    ds.PatientID = "SECRET-ID"
    ds.PatientSex = "F"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if spacing:
        ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.PixelData = arr.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def huge_png_header(path: Path, width: int = 60000, height: int = 60000) -> Path:
    """A tiny PNG whose IHDR claims ``width x height`` 8-bit grey pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024)) + chunk(b"IEND", b"")
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return Path(path)


def pydicom_file(name: str) -> Path:
    """A test file bundled with pydicom (local only, never downloaded)."""
    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


@dataclass(frozen=True)
class BadInput:
    """One corpus file and what reading it must do.

    readable: True if :func:`read_scan` returns a Scan, False if it must raise ScanReadError.
    expect: substring of the error reason (refused) or of a notice / note (readable).
    """

    name: str
    path: Path
    readable: bool
    expect: str


def _grey16(h: int = 64, w: int = 48) -> np.ndarray:
    return (synthetic_cxr(h, w) * 4095).astype(np.uint16)


def build_corpus(root: Path) -> dict[str, BadInput]:
    """Write the bad-input corpus into ``root`` and describe each case."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img8 = (synthetic_cxr(64, 48) * 255).astype(np.uint8)
    cases: list[BadInput] = []

    def add(name: str, path: Path, readable: bool, expect: str) -> None:
        cases.append(BadInput(name, Path(path), readable, expect))

    (root / "empty.png").write_bytes(b"")
    add("empty file", root / "empty.png", False, "empty file")
    good = write_png(root / "good.png", img8).read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    add("truncated PNG", root / "truncated.png", False, "cannot decode")
    ct = pydicom_file("CT_small.dcm").read_bytes()
    (root / "truncated.dcm").write_bytes(ct[: len(ct) - 5000])
    add("truncated DICOM", root / "truncated.dcm", False, "pixel data cannot be decoded")
    shutil.copy(pydicom_file("rtplan.dcm"), root / "rtplan.dcm")
    add("DICOM without pixel data", root / "rtplan.dcm", False, "without pixel data")
    (root / "notes.png").write_text("this is a text file, not an image\n" * 20)
    add("text file named .png", root / "notes.png", False, "cannot decode")
    write_nifti(root / "volume.nii.gz", np.zeros((32, 32, 8), np.float32))
    add("3-D NIfTI volume", root / "volume.nii.gz", False, "3-D")
    write_tiff(root / "stack.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    add("multi-frame TIFF", root / "stack.tif", False, "3-D")
    rgb = np.stack([img8, img8 // 2, 255 - img8], -1)
    write_png(root / "rgb.png", rgb)
    add("RGB PNG", root / "rgb.png", True, "converted to grey")
    write_png(root / "rgba.png", np.concatenate([rgb, np.full(img8.shape + (1,), 7, np.uint8)], -1))
    add("RGBA PNG", root / "rgba.png", True, "alpha channel ignored")
    write_png(root / "grey16.png", _grey16())
    add("16-bit PNG (12-bit data)", root / "grey16.png", True, "12 bits")
    write_dicom(root / "mono1.dcm", 4095 - _grey16(), photometric="MONOCHROME1")
    add("MONOCHROME1 DICOM", root / "mono1.dcm", True, "MONOCHROME1 inverted")
    write_png(root / "one_pixel.png", np.zeros((1, 1), np.uint8))
    add("1x1 image", root / "one_pixel.png", False, "too small")
    huge_png_header(root / "huge.png")
    add("PNG header claiming 60000x60000", root / "huge.png", False, "too many pixels")
    nan = synthetic_cxr(40, 40).astype(np.float32)
    nan[0, :5], nan[1, :3], nan[2, :2] = np.nan, np.inf, -np.inf
    write_tiff(root / "nan.tif", nan)
    add("float TIFF with NaN/inf", root / "nan.tif", True, "NaN/inf pixels replaced")
    write_nifti(root / "nan.nii", nan.T)
    add("float NIfTI with NaN/inf", root / "nan.nii", True, "NaN/inf pixels replaced")
    write_tiff(root / "allnan.tif", np.full((32, 32), np.nan, np.float32))
    add("float TIFF all NaN", root / "allnan.tif", False, "no finite pixel")
    (root / "scan.xyz").write_bytes(b"\x00" * 200)
    add("unknown extension", root / "scan.xyz", False, "unsupported file type")
    shutil.copy(pydicom_file("CT_small.dcm"), root / "CT_small.dcm")
    add("pydicom CT_small.dcm", root / "CT_small.dcm", True, "")
    shutil.copy(pydicom_file("MR_small.dcm"), root / "MR_small.dcm")
    add("pydicom MR_small.dcm", root / "MR_small.dcm", True, "")
    shutil.copy(pydicom_file("rtdose.dcm"), root / "rtdose.dcm")
    add("pydicom rtdose.dcm (15 frames)", root / "rtdose.dcm", False, "frames (3-D)")
    return {case.name: case for case in cases}
