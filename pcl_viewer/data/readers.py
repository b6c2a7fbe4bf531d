"""Read 2-D grey scans from PNG, JPEG, TIFF, DICOM and NIfTI; write labels and RGB.

Every failure of :func:`read_scan` is a :class:`ScanReadError` naming the file
and the reason; no other exception type escapes. Decisions:

- The reader is chosen by extension (``.png .jpg .jpeg .tif .tiff .dcm .dicom
  .nii .nii.gz``); a file with another or no extension is sniffed by its magic
  bytes. A file that does not decode as its extension claims is refused.
- Size limits are checked on the header, before any pixel is decoded:
  at most ``MAX_SIDE`` px per side and ``MAX_PIXELS`` pixels; at least
  ``MIN_SIDE`` px per side (smaller is not a radiograph).
- Colour is converted to grey (ITU-R 601 luma), alpha is ignored; both leave a
  line in ``metadata["notices"]``. 3-D data (multi-frame TIFF or DICOM, NIfTI
  volumes) is refused.
- Intensities become float32 in [0, 1]. Unsigned integers are divided by the
  range of their bit depth: 8-bit by 255; wider integers by ``2**b - 1`` with
  ``b`` the smallest of 10, 12, 14, 16 bits holding the maximum (a 12-bit
  detector in a 16-bit PNG is not left four times too dark). Floats, signed
  integers, DICOM after its LUTs and NIfTI are min-max scaled. A constant image
  becomes 0 with a notice.
- NaN and inf are sanitised with a notice: NaN and -inf become the smallest
  finite value, +inf the largest. An image without a finite value is refused.
- DICOM: modality LUT, then VOI LUT (window), MONOCHROME1 inverted so bone is
  bright; spacing from PixelSpacing, else ImagerPixelSpacing (mm, row x col).
- NIfTI: the data array is ``(x, y)``, read as ``image = data.T`` (rows = y),
  without flips, as ITK and SimpleITK write 2-D images; :func:`write_labels`
  writes the same way, so labels round-trip.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pcl_viewer.data.scan import Scan, ScanReadError

MAX_SIDE = 20_000
MAX_PIXELS = 100_000_000
MIN_SIDE = 16
EXTENSIONS: dict[str, str] = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
    ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
}
_LUMA = np.array([0.299, 0.587, 0.114])
# DICOM tags safe to keep: acquisition facts, no names, identifiers or dates.
_SAFE_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns", "ViewPosition",
    "BodyPartExamined", "PatientSex", "PatientAge", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "PixelSpacing", "ImagerPixelSpacing",
)


def _kind(path: Path) -> str:
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == 348:
        return "nifti"
    supported = " ".join(sorted(EXTENSIONS))
    raise ScanReadError(path, f"unsupported file type {path.suffix or '(no extension)'!r}; "
                              f"supported: {supported}")


def read_scan(path: str | os.PathLike) -> Scan:
    """Read one 2-D grey scan -> :class:`Scan` with an ``(H, W)`` float32 [0, 1] image.

    Raises:
        ScanReadError: for every file that cannot be read (message says why).
    """
    p = Path(path)
    try:
        if not p.is_file():
            raise ScanReadError(p, "no such file" if not p.exists() else "not a regular file")
        if p.stat().st_size == 0:
            raise ScanReadError(p, "empty file (0 bytes)")
        kind = _kind(p)
        notices: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array, spacing, meta = _READERS[kind](p, notices)
        image, norm = _normalise(p, array, notices, minmax=kind in ("dicom", "nifti"))
        if meta.pop("_invert", False):
            image = 1.0 - image
        meta.update(format=kind, original_dtype=str(array.dtype), normalisation=norm,
                    notices=notices)
        name = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
        return Scan(image=image, spacing=spacing, name=name, path=str(p), metadata=meta)
    except ScanReadError:
        raise
    except MemoryError:
        raise ScanReadError(p, "out of memory while decoding") from None
    except Exception as exc:  # every decoder error becomes a ScanReadError
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ScanReadError(p, f"cannot decode: {type(exc).__name__}: {msg}") from exc


# ---------------------------------------------------------------- checks ---


def _check_shape(path: Path, shape: tuple[int, ...], what: str = "image") -> tuple[int, int]:
    """Refuse a header shape that is 3-D, too large or too small.

    Singleton dimensions are ignored; returns the two remaining sizes in order.
    """
    dims = tuple(int(s) for s in shape)
    core = [s for s in dims if s != 1]
    if len(core) > 2:
        raise ScanReadError(path, f"{what} is 3-D (shape {dims}); only 2-D scans are supported")
    if len(dims) < 2:
        raise ScanReadError(path, f"{what} is not 2-D (shape {dims})")
    a, b = core if len(core) == 2 else dims[:2]
    if a > MAX_SIDE or b > MAX_SIDE or a * b > MAX_PIXELS:
        raise ScanReadError(path, f"header claims {a} x {b} pixels; refusing more than "
                                  f"{MAX_SIDE} px per side or {MAX_PIXELS:.0e} pixels")
    if a < MIN_SIDE or b < MIN_SIDE:
        raise ScanReadError(path, f"{a} x {b} pixels is too small for a scan "
                                  f"(at least {MIN_SIDE} px per side)")
    return a, b


def _to_grey(path: Path, arr: np.ndarray, notices: list[str], alpha: bool) -> np.ndarray:
    """``(H, W, S)`` samples -> ``(H, W)`` grey; S = 1, 2 (grey + alpha), 3 (RGB), 4 (RGBA)."""
    s = arr.shape[-1]
    if s in (2, 4) and alpha:
        notices.append("alpha channel ignored")
        arr = arr[..., : s - 1]
        s -= 1
    if s == 1:
        return arr[..., 0]
    if s != 3:
        raise ScanReadError(path, f"{s} samples per pixel; expected grey, RGB or RGBA")
    notices.append("colour image converted to grey (ITU-R 601 luma)")
    luma = arr.astype(np.float64) @ _LUMA
    # Unsigned samples stay in their integer range, so normalisation uses the bit depth.
    return np.rint(luma).astype(arr.dtype) if arr.dtype.kind == "u" else luma.astype(np.float32)


def _normalise(path: Path, arr: np.ndarray, notices: list[str], minmax: bool) -> tuple[np.ndarray, str]:
    """Any 2-D array -> float32 [0, 1] and a description of how."""
    if arr.ndim != 2:
        raise ScanReadError(path, f"decoded to shape {arr.shape}, not a 2-D image")
    _check_shape(path, arr.shape)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), "binary"
    if arr.dtype.kind == "u" and not minmax:
        top = int(arr.max(initial=0))
        bits = 8 if arr.dtype.itemsize == 1 else next(b for b in (10, 12, 14, 16, 32, 64) if top < 2**b)
        scale = float(2**bits - 1)
        return (arr / scale).astype(np.float32), f"integer range 0..{2**bits - 1} ({bits} bits)"
    if arr.dtype.kind not in "uif":
        raise ScanReadError(path, f"unsupported pixel type {arr.dtype}")
    a = arr.astype(np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        if not finite.any():
            raise ScanReadError(path, "no finite pixel value (all NaN or inf)")
        lo, hi = a[finite].min(), a[finite].max()
        notices.append(f"{int((~finite).sum())} NaN/inf pixels replaced by the finite min/max")
        a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    lo, hi = float(a.min()), float(a.max())
    if hi - lo <= 0:
        notices.append("constant image")
        return np.zeros(a.shape, np.float32), "min-max (constant image -> 0)"
    return ((a - lo) / (hi - lo)).astype(np.float32), f"min-max {lo:g}..{hi:g}"


# --------------------------------------------------------------- readers ---

Reader = Callable[[Path, list], tuple[np.ndarray, tuple[float, float] | None, dict[str, Any]]]


def _read_pil(path: Path, notices: list[str]):
    from PIL import Image

    # Pillow's own bomb check (on open) at our limit, as an error rather than a warning.
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
        im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        detail = str(exc).split(",")[0]
        raise ScanReadError(path, f"header claims too many pixels (more than {MAX_PIXELS:.0e}); "
                                  f"refused before decoding [{detail}]") from None
    with im:
        w, h = im.size
        _check_shape(path, (h, w))
        if getattr(im, "n_frames", 1) > 1:
            raise ScanReadError(path, f"{im.n_frames} frames (3-D); only 2-D scans are supported")
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            im = im.convert("RGB")
        elif mode in ("RGBa", "La", "PA"):
            im = im.convert("RGBA" if mode != "La" else "LA")
        arr = np.asarray(im)
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() < 2**16:
        arr = arr.astype(np.uint16)  # 16-bit PNG decoded as int32 by some Pillow versions
    if arr.ndim == 3:
        arr = _to_grey(path, arr, notices, alpha=True)
    return arr, None, {"mode": mode}


def _read_tiff(path: Path, notices: list[str]):
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        extra = [(a, s) for a, s in zip(axes, shape) if a not in "YXS" and s > 1]
        if extra:
            raise ScanReadError(path, f"TIFF is 3-D or multi-frame (axes {axes}, shape {shape}); "
                                      "only 2-D scans are supported")
        dims = dict(zip(axes, shape))
        _check_shape(path, (dims.get("Y", 1), dims.get("X", 1)))
        try:
            arr = series.asarray()
        except Exception:  # e.g. LZW/JPEG compression without imagecodecs: Pillow decodes it
            return _read_pil(path, notices)
    keep = [axes.index(a) for a in "YXS" if a in axes]
    arr = np.transpose(arr, keep + [i for i in range(arr.ndim) if i not in keep])
    arr = arr.reshape(arr.shape[: len(keep)])  # (Y, X) or (Y, X, S)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        arr = _to_grey(path, arr, notices, alpha=True)
    return arr, None, {"axes": axes}


def _read_dicom(path: Path, notices: list[str]):
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space

    ds = pydicom.dcmread(path, force=True, defer_size="64 KB")
    if "PixelData" not in ds:
        raise ScanReadError(path, "DICOM without pixel data (e.g. a plan, report or structure set)")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ScanReadError(path, f"DICOM has {frames} frames (3-D); only 2-D scans are supported")
    if rows <= 0 or cols <= 0:
        raise ScanReadError(path, "DICOM pixel data without Rows/Columns")
    _check_shape(path, (rows, cols))
    try:
        arr = ds.pixel_array
    except Exception as exc:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ScanReadError(path, f"DICOM pixel data cannot be decoded (transfer syntax "
                                  f"{getattr(syntax, 'name', syntax)}): {first}") from exc
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:
        if pi.startswith("YBR"):
            arr = convert_color_space(arr, pi, "RGB")
        arr = _to_grey(path, arr, notices, alpha=False)
    elif pi == "PALETTE COLOR":
        raise ScanReadError(path, "palette-colour DICOM is not a grey radiograph")
    else:
        arr = apply_voi_lut(apply_modality_lut(arr, ds), ds)
    meta: dict[str, Any] = {"dicom": _safe_tags(ds), "_invert": pi == "MONOCHROME1"}
    if pi == "MONOCHROME1":
        notices.append("MONOCHROME1 inverted so that bone is bright")
    return np.asarray(arr), _dicom_spacing(ds), meta


def _safe_tags(ds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in _SAFE_TAGS:
        value = ds.get(tag)
        if value is None or value == "":
            continue
        if isinstance(value, str | int | float):
            out[tag] = value if isinstance(value, int | float) else str(value)
        else:
            try:
                out[tag] = [float(v) for v in value]
            except (TypeError, ValueError):
                out[tag] = str(value)
    return out


def _dicom_spacing(ds) -> tuple[float, float] | None:
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            row, col = (float(v) for v in ds.get(tag) or ())
        except (TypeError, ValueError):
            continue
        if all(np.isfinite((row, col))) and row > 0 and col > 0:
            return row, col
    return None


def _read_nifti(path: Path, notices: list[str]):
    import nibabel as nib

    img = nib.load(path)
    shape = tuple(int(s) for s in img.shape)
    _check_shape(path, shape, what="NIfTI volume")  # before any voxel is read
    data = np.asanyarray(img.dataobj).reshape(_check_shape(path, shape))
    zooms = [float(z) for z in img.header.get_zooms()[:2]] if len(shape) >= 2 else [0.0, 0.0]
    spacing = (zooms[1], zooms[0]) if all(z > 0 and np.isfinite(z) for z in zooms) else None
    units = img.header.get_xyzt_units()[0] or "unknown"
    return np.asarray(data).T, spacing, {"nifti_units": units}


_READERS: dict[str, Reader] = {
    "png": _read_pil, "jpeg": _read_pil, "tiff": _read_tiff, "dicom": _read_dicom,
    "nifti": _read_nifti,
}


# --------------------------------------------------------------- writers ---


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_labels(path: str | os.PathLike, labels: np.ndarray,
                 spacing: tuple[float, float] | None = None) -> Path:
    """Write ``(H, W)`` integer labels (0..255) as uint8 PNG or NIfTI (``.nii``/``.nii.gz``).

    ``spacing`` (row, col) in mm is stored in the NIfTI header. Atomic.
    """
    p = Path(path)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D (H, W), got shape {lab.shape}")
    if lab.dtype.kind not in "biu" or (lab.size and (lab.min() < 0 or lab.max() > 255)):
        raise ValueError(f"labels must be integers in 0..255, got dtype {lab.dtype}")
    lab = lab.astype(np.uint8)
    name = p.name.lower()
    if name.endswith(".png"):
        from PIL import Image

        return _atomic_write(p, lambda t: Image.fromarray(lab).save(t, format="PNG"))
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = np.diag([spacing[1], spacing[0], 1.0, 1.0]) if spacing else np.eye(4)
        img = nib.Nifti1Image(np.ascontiguousarray(lab.T), affine)
        img.header.set_xyzt_units("mm")
        return _atomic_write(p, lambda t: nib.save(img, t))
    raise ValueError(f"{p}: labels are written as .png, .nii or .nii.gz")


def write_rgb(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """Write an ``(H, W, 3)`` uint8 RGB image as PNG. Atomic."""
    p = Path(path)
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {arr.shape} {arr.dtype}")
    if not p.name.lower().endswith(".png"):
        raise ValueError(f"{p}: RGB images are written as .png")
    from PIL import Image

    return _atomic_write(p, lambda t: Image.fromarray(arr, "RGB").save(t, format="PNG"))
