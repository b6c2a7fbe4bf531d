"""Read 2-D grey scans from PNG, JPEG, TIFF, DICOM and NIfTI; write labels and RGB.

Every failure of :func:`read_scan` is a :class:`ScanReadError` naming the file
and the reason in one line; no other exception type escapes. Decisions:

- **One decoder per extension.** ``.png`` is decoded only as PNG, ``.jpg``/``.jpeg``
  only as JPEG, ``.tif``/``.tiff`` only as TIFF (Pillow is always called with
  ``formats=[...]``, so EPS/PostScript, BMP, GIF ... are never tried), ``.dcm``/
  ``.dicom`` as DICOM, ``.nii``/``.nii.gz`` as NIfTI. A file whose content is
  another format is refused, naming what it looks like. A name without an
  extension, or with a purely numeric one (PACS exports named by UID), is read
  only as DICOM and only when it has the ``DICM`` preamble. Any other extension
  is refused.
- **Only regular files** are opened: a FIFO, a device (also through a symlink,
  e.g. to ``/dev/zero``) or a folder is refused before any read, so nothing blocks.
- **Pixel budget** (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS` samples =
  width x height x channels as the header states them) and side limits are
  checked on the header, before any pixel is decoded; the error gives the size.
  Decoding then needs at most about the decoded samples plus one float32 image
  (normalisation runs in row chunks, never a whole-image float64 copy).
- **Time limit**: with ``timeout_s`` the decode runs in a helper process (started
  once and reused; one per thread reading at the same time); one that takes longer is killed and the read fails with a
  :class:`ScanReadError` saying so. A decoder that crashes the helper gives a
  ScanReadError too.
- Colour is converted to grey (ITU-R 601 luma) once, alpha is ignored; both leave a
  line in ``metadata["notices"]``. 16-bit colour and grey+alpha PNGs keep 16 bits
  (decoded by OpenCV; Pillow reduces them to 8 bits). 3-D data is refused.
- Intensities become float32 in [0, 1]. Unsigned integers are divided by the
  range of their bit depth: 8-bit by 255; wider integers by ``2**b - 1`` with
  ``b`` the smallest of 10, 12, 14, 16 bits holding the maximum. Floats, signed
  integers and NIfTI are min-max scaled (without overflow, also for +-1e308).
  A constant image becomes 0 with a notice. NaN and -inf become the smallest
  finite value, +inf the largest (with a notice); no finite value: refused.
- DICOM, in the radiology order: modality LUT (rescale or LUT sequence), VOI LUT
  sequence or else the first window (an absent, zero or invalid width means the
  full range), scaled by the VOI output range, then the polarity: inverted once
  when the photometric interpretation is MONOCHROME1 or PresentationLUTShape is
  INVERSE, so bone is bright. Colour (RGB, YBR_* incl. JPEG 2000 YBR_RCT/ICT,
  palette) is converted to RGB once by pydicom, then to grey. Spacing from
  PixelSpacing, else ImagerPixelSpacing divided by
  EstimatedRadiographicMagnificationFactor when present, else ImagerPixelSpacing
  (detector, not patient spacing); ``metadata["spacing_source"]`` says which.
- NIfTI: the data array is ``(x, y)``, read as ``image = data.T`` (rows = y),
  without flips, as ITK and SimpleITK write 2-D images; :func:`write_labels`
  writes the same way, so labels round-trip.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pcl_viewer.atomic import atomic_save
from pcl_viewer.data.scan import Scan, ScanReadError

#: Default pixel budget of one read, in samples (width x height x channels): 2**26,
#: e.g. 8192 x 8192 grey or 4096 x 4096 RGBA.
DEFAULT_MAX_PIXELS = 2**26
MAX_SIDE = 20_000
MIN_SIDE = 16
EXTENSIONS: dict[str, str] = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff",
    ".dcm": "dicom", ".dicom": "dicom", ".nii": "nifti", ".nii.gz": "nifti",
}
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
_LUMA = (0.299, 0.587, 0.114)
_CHUNK = 1 << 20  # elements per normalisation chunk (8 MB of float64 temporaries)
# DICOM tags safe to keep: acquisition facts, no names, identifiers or dates.
_SAFE_TAGS = (
    "Modality", "Manufacturer", "ManufacturerModelName", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns", "ViewPosition",
    "BodyPartExamined", "PatientSex", "PatientAge", "RescaleSlope", "RescaleIntercept",
    "WindowCenter", "WindowWidth", "PixelSpacing", "ImagerPixelSpacing",
    "EstimatedRadiographicMagnificationFactor", "PresentationLUTShape", "VOILUTFunction",
)
# What to install for a compressed transfer syntax that no decoder could handle.
_INSTALL_HINT = {
    "JPEG 2000": "pylibjpeg and pylibjpeg-openjpeg",
    "High-Throughput JPEG 2000": "pylibjpeg and pylibjpeg-openjpeg",
    "JPEG-LS": "pylibjpeg and pylibjpeg-libjpeg",
    "JPEG": "pylibjpeg and pylibjpeg-libjpeg",
    "RLE": "pylibjpeg and pylibjpeg-rle",
}


# ------------------------------------------------------------ file kinds ---


def _sniff(head: bytes) -> str:
    """What ``head`` (the first 132 bytes) looks like, for error messages only."""
    signatures = (
        (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"), (b"II+\x00", "BigTIFF"), (b"MM\x00+", "BigTIFF"),
        (b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
        (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "RIFF/WebP"), (b"\x1f\x8b", "gzip"),
        (b"PK\x03\x04", "ZIP"), (b"\x0a", "PCX"), (b"<", "text/XML/HTML"),
    )
    if head[128:132] == b"DICM":
        return "DICOM"
    for magic, name in signatures:
        if head.startswith(magic):
            return name
    if len(head) >= 4 and int.from_bytes(head[:4], "little") == 348:
        return "NIfTI"
    return "unknown content"


def _kind(path: Path) -> str:
    """The decoder of ``path``, from its extension only (see the module docstring)."""
    name = path.name.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if name.endswith(ext):
            return EXTENSIONS[ext]
    suffix = path.suffix
    if not suffix or re.fullmatch(r"\.\d+", suffix):
        with open(path, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            return "dicom"
        raise ScanReadError(path, f"no image extension and no DICOM preamble (content looks like "
                                  f"{_sniff(head)}); only DICOM files are read without an "
                                  f"extension; name other scans {' '.join(sorted(EXTENSIONS))}")
    supported = " ".join(sorted(EXTENSIONS))
    raise ScanReadError(path, f"unsupported file type {suffix!r}; supported: {supported}")


def _check_regular(p: Path) -> None:
    """Refuse anything but an existing, non-empty regular file, without opening it."""
    try:
        st = p.stat()  # follows symlinks
    except FileNotFoundError:
        broken = p.is_symlink()
        raise ScanReadError(p, "symlink to a missing file" if broken else "no such file") from None
    except OSError as exc:  # e.g. ELOOP, permission
        raise ScanReadError(p, f"cannot stat: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        what = ("folder" if stat.S_ISDIR(st.st_mode) else "FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "character device" if stat.S_ISCHR(st.st_mode)
                else "block device" if stat.S_ISBLK(st.st_mode)
                else "socket" if stat.S_ISSOCK(st.st_mode) else "special file")
        via = f" (symlink to {os.path.realpath(p)})" if p.is_symlink() else ""
        raise ScanReadError(p, f"not a regular file: {what}{via}")
    if st.st_size == 0:
        raise ScanReadError(p, "empty file (0 bytes)")


# ------------------------------------------------------------ the reader ---


def read_scan(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
              timeout_s: float | None = None) -> Scan:
    """Read one 2-D scan -> :class:`Scan` with an ``(H, W)`` float32 [0, 1] image.

    Args:
        path: the file; its extension chooses the decoder.
        max_pixels: budget in samples (width x height x channels from the header);
            larger images are refused before decoding. None: only the side limits.
        timeout_s: when given, decode in a helper process that is killed after
            this many seconds (wall clock); None decodes in this process.

    Raises:
        ScanReadError: for every file that cannot be read (one line saying why).
    """
    p = Path(path)
    if timeout_s is not None:
        _check_regular(p)  # cheap, and a FIFO is never handed to the helper
        return _WORKER.read(p, max_pixels, float(timeout_s))
    return _read_here(p, max_pixels)


def _read_here(p: Path, max_pixels: int | None) -> Scan:
    """:func:`read_scan` in this process."""
    try:
        _check_regular(p)
        kind = _kind(p)
        notices: list[str] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image, spacing, meta = _READERS[kind](p, notices, max_pixels)
        meta.setdefault("spacing_source", None)
        meta.update(format=kind, notices=notices)
        name = p.name[: -len(".nii.gz")] if p.name.lower().endswith(".nii.gz") else p.stem
        return Scan(image=image, spacing=spacing, name=name, path=str(p), metadata=meta)
    except ScanReadError:
        raise
    except MemoryError:
        raise ScanReadError(p, "out of memory while decoding") from None
    except Exception as exc:  # every decoder error becomes a ScanReadError
        raise ScanReadError(p, f"cannot decode: {type(exc).__name__}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """An exception's whole message on one line (lines joined by '; ')."""
    parts = [s.strip() for s in str(exc).splitlines() if s.strip()]
    text = "; ".join(parts).replace(":;", ":")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- checks ---


def _check_shape(path: Path, shape: tuple[int, ...], max_pixels: int | None,
                 channels: int = 1, what: str = "image") -> tuple[int, int]:
    """Refuse a header shape that is 3-D, over the budget or too small.

    Singleton dimensions are ignored; returns the two remaining sizes (rows, cols).
    """
    dims = tuple(int(s) for s in shape)
    core = [s for s in dims if s != 1]
    if len(core) > 2:
        raise ScanReadError(path, f"{what} is 3-D (shape {dims}); only 2-D scans are supported")
    if len(dims) < 2:
        raise ScanReadError(path, f"{what} is not 2-D (shape {dims})")
    a, b = core if len(core) == 2 else dims[:2]
    if a > MAX_SIDE or b > MAX_SIDE:
        raise ScanReadError(path, f"header claims {a} x {b} pixels; refusing more than "
                                  f"{MAX_SIDE} px per side")
    samples = a * b * max(int(channels), 1)
    if max_pixels is not None and samples > max_pixels:
        ch = f" x {channels} channels" if channels > 1 else ""
        raise ScanReadError(path, f"header claims {a} x {b} pixels{ch} = {samples:,} samples: "
                                  f"too many pixels for the budget of {max_pixels:,}; "
                                  f"refused before decoding")
    if a < MIN_SIDE or b < MIN_SIDE:
        raise ScanReadError(path, f"{a} x {b} pixels is too small for a scan "
                                  f"(at least {MIN_SIDE} px per side)")
    return a, b


def _to_grey(path: Path, arr: np.ndarray, notices: list[str], alpha: bool) -> np.ndarray:
    """``(H, W, S)`` samples -> ``(H, W)`` grey; S = 1, 2 (grey + alpha), 3 (RGB), 4 (RGBA).

    Unsigned input stays unsigned (rounded luma) so normalisation uses the bit depth.
    Computed in row chunks (numpy has no chunked weighted channel sum), so the only
    full-size allocation is the ``(H, W)`` result.
    """
    s = arr.shape[-1]
    if s in (2, 4) and alpha:
        notices.append("alpha channel ignored")
        s -= 1
    if s == 1:
        return arr[..., 0]
    if s != 3:
        raise ScanReadError(path, f"{s} samples per pixel; expected grey, RGB or RGBA")
    notices.append("colour image converted to grey (ITU-R 601 luma)")
    ftype = np.float64 if arr.dtype.itemsize >= 4 else np.float32  # 32-bit samples need 53 bits
    out = np.empty(arr.shape[:2], arr.dtype if arr.dtype.kind == "u" else np.float32)
    rows = max(1, _CHUNK // max(1, arr.shape[1]))
    weights = np.asarray(_LUMA, ftype)
    for i in range(0, arr.shape[0], rows):
        luma = arr[i: i + rows, :, :3].astype(ftype) @ weights
        if arr.dtype.kind == "u":
            np.rint(luma, out=luma)
            np.clip(luma, 0, np.iinfo(arr.dtype).max, out=luma)
        out[i: i + rows] = luma
    return out


def _rescale(arr: np.ndarray, lo: float, hi: float, out: np.ndarray | None = None) -> np.ndarray:
    """``(arr - lo) / (hi - lo)`` clipped to [0, 1] as float32, in row chunks.

    Computed on halves in float64 (exact for normal numbers), so +-1e308 does not
    overflow; NaN/-inf map to 0 and +inf to 1. The numpy work is chunked by hand
    to bound temporaries (about 8 MB) whatever the image size.
    """
    out = np.empty(arr.shape, np.float32) if out is None else out
    half_lo, span = lo / 2.0, hi / 2.0 - lo / 2.0
    rows = max(1, _CHUNK // max(1, arr.shape[1]))
    for i in range(0, arr.shape[0], rows):
        c = arr[i: i + rows].astype(np.float64)
        c = np.nan_to_num(c, nan=lo, posinf=hi, neginf=lo)
        c /= 2.0
        c -= half_lo
        c /= span
        np.clip(c, 0.0, 1.0, out=c)
        out[i: i + rows] = c
    return out


def _finite_range(arr: np.ndarray) -> tuple[float, float, int]:
    """``(min, max, number of non-finite values)`` over the finite values of ``arr``."""
    if arr.dtype.kind != "f":
        return float(arr.min()), float(arr.max()), 0
    finite = np.isfinite(arr)
    bad = int(arr.size - np.count_nonzero(finite))
    if bad == arr.size:
        return float("nan"), float("nan"), bad
    lo = float(np.min(arr, where=finite, initial=np.inf))
    hi = float(np.max(arr, where=finite, initial=-np.inf))
    return lo, hi, bad


def _normalise(path: Path, arr: np.ndarray, notices: list[str], minmax: bool,
               max_pixels: int | None) -> tuple[np.ndarray, str]:
    """Any 2-D array -> float32 [0, 1] and a description of how."""
    if arr.ndim != 2:
        raise ScanReadError(path, f"decoded to shape {arr.shape}, not a 2-D image")
    _check_shape(path, arr.shape, max_pixels)
    if arr.dtype == np.bool_:
        return arr.astype(np.float32), "binary"
    if arr.dtype.kind not in "uif":
        raise ScanReadError(path, f"unsupported pixel type {arr.dtype}")
    if arr.dtype.kind == "u" and not minmax:
        top = int(arr.max(initial=0))
        bits = 8 if arr.dtype.itemsize == 1 else next(b for b in (10, 12, 14, 16, 32, 64) if top < 2**b)
        return (_rescale(arr, 0.0, float(2**bits - 1)),
                f"integer range 0..{2**bits - 1} ({bits} bits)")
    lo, hi, bad = _finite_range(arr)
    if bad:
        if bad == arr.size:
            raise ScanReadError(path, "no finite pixel value (all NaN or inf)")
        notices.append(f"{bad} NaN/inf pixels replaced by the finite min/max")
    if not hi > lo:
        notices.append("constant image")
        return np.zeros(arr.shape, np.float32), "min-max (constant image -> 0)"
    return _rescale(arr, lo, hi), f"min-max {lo:g}..{hi:g}"


# --------------------------------------------------------------- readers ---

Reader = Callable[[Path, list, "int | None"],
                  tuple[np.ndarray, tuple[float, float] | None, dict[str, Any]]]


def _open_pil(path: Path, kind: str):
    """Open with Pillow's decoder for ``kind`` only; refuse other content in one line."""
    from PIL import Image, UnidentifiedImageError

    fmt = _PIL_FORMAT[kind]
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget applies
    try:
        return Image.open(path, formats=[fmt])
    except UnidentifiedImageError:
        with open(path, "rb") as fh:
            head = fh.read(132)
        raise ScanReadError(path, f"cannot decode as {fmt}: the content looks like {_sniff(head)}; "
                                  "a file is decoded only as its extension says") from None
    except Image.DecompressionBombError as exc:
        raise ScanReadError(path, f"too many pixels: {_one_line(exc)}") from None


def _png_ihdr(path: Path) -> tuple[int, int]:
    """``(bit depth, colour type)`` from a PNG's IHDR (bytes 24, 25; Pillow has validated
    the signature). Hand-written: Pillow does not expose the 16-bit depth of colour PNGs."""
    with open(path, "rb") as fh:
        head = fh.read(26)
    return head[24], head[25]


def _read_pil(path: Path, notices: list[str], max_pixels: int | None, kind: str):
    """PNG / JPEG / TIFF (``kind``) through Pillow restricted to that one format."""
    im = _open_pil(path, kind)
    with im:
        w, h = im.size
        mode = im.mode
        bands = len(im.getbands())
        if mode == "P":
            bands = 4 if "transparency" in im.info else 3
        _check_shape(path, (h, w), max_pixels, channels=bands)
        if getattr(im, "n_frames", 1) > 1:
            raise ScanReadError(path, f"{im.n_frames} frames (3-D); only 2-D scans are supported")
        depth, colour = _png_ihdr(path) if kind == "png" else (8, 0)
        if kind == "png" and depth == 16 and colour in (2, 4, 6):
            arr = _read_png16_colour(path)
            mode = {2: "RGB;16", 4: "LA;16", 6: "RGBA;16"}[colour]
        else:
            if mode == "P":
                im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                im = im.convert("RGB")
            elif mode in ("RGBa", "La", "PA"):
                im = im.convert("RGBA" if mode != "La" else "LA")
            arr = np.asarray(im)
    if mode.startswith("I") and arr.size and arr.min() >= 0 and arr.max() < 2**16:
        arr = arr.astype(np.uint16)  # 16-bit PNG decoded as int32 by some Pillow versions
    if arr.ndim == 3:
        arr = _to_grey(path, arr, notices, alpha=True)
    image, norm = _normalise(path, arr, notices, minmax=False, max_pixels=max_pixels)
    return image, None, {"mode": mode, "original_dtype": str(arr.dtype), "normalisation": norm}


def _read_png16_colour(path: Path) -> np.ndarray:
    """16-bit RGB / grey+alpha / RGBA PNG -> ``(H, W, 3|4)`` uint16 RGB(A), 16 bits kept.

    OpenCV's PNG decoder keeps 16 bits (Pillow does not); it returns BGR(A) and
    expands grey+alpha to BGRA.
    """
    import cv2

    data = np.fromfile(path, np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    del data
    if arr is None or arr.ndim != 3 or arr.dtype != np.uint16:
        raise ScanReadError(path, "16-bit colour PNG could not be decoded")
    order = [2, 1, 0] + ([3] if arr.shape[2] == 4 else [])
    return arr[..., order]


def _read_tiff(path: Path, notices: list[str], max_pixels: int | None):
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except tifffile.TiffFileError:
        with open(path, "rb") as fh:
            head = fh.read(132)
        raise ScanReadError(path, f"cannot decode as TIFF: the content looks like {_sniff(head)}; "
                                  "a file is decoded only as its extension says") from None
    with tif:
        series = tif.series[0]
        shape, axes = tuple(series.shape), series.axes
        extra = [(a, s) for a, s in zip(axes, shape) if a not in "YXS" and s > 1]
        if extra:
            raise ScanReadError(path, f"TIFF is 3-D or multi-frame (axes {axes}, shape {shape}); "
                                      "only 2-D scans are supported")
        dims = dict(zip(axes, shape))
        _check_shape(path, (dims.get("Y", 1), dims.get("X", 1)), max_pixels,
                     channels=dims.get("S", 1))
        try:
            arr = series.asarray()
        except Exception:  # e.g. LZW/JPEG compression without imagecodecs: Pillow decodes it
            return _read_pil(path, notices, max_pixels, kind="tiff")
    keep = [axes.index(a) for a in "YXS" if a in axes]
    arr = np.transpose(arr, keep + [i for i in range(arr.ndim) if i not in keep])
    arr = arr.reshape(arr.shape[: len(keep)])  # (Y, X) or (Y, X, S)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3:
        arr = _to_grey(path, arr, notices, alpha=True)
    image, norm = _normalise(path, arr, notices, minmax=False, max_pixels=max_pixels)
    return image, None, {"axes": axes, "original_dtype": str(arr.dtype), "normalisation": norm}


# ----------------------------------------------------------------- DICOM ---


def _dicom_pixels(path: Path, ds) -> tuple[np.ndarray, str]:
    """Decode the one frame of ``ds`` -> (array, photometric interpretation of the array).

    Colour comes back as RGB, converted once by pydicom (YBR_FULL/_422 and the
    JPEG 2000 YBR_RCT/ICT included); grey as stored values.
    """
    from pydicom.pixels import get_decoder

    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if syntax is None:
        raise ScanReadError(path, "DICOM without a transfer syntax (file meta 0002,0010 missing)")
    name = getattr(syntax, "name", str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ScanReadError(path, f"no pixel data decoder for transfer syntax {name} "
                                  f"({syntax}) in pydicom") from None
    try:
        arr, info = decoder.as_array(ds, index=0, as_rgb=True)  # the one frame
    except Exception as exc:
        text = _one_line(exc)
        hint = next((v for k, v in _INSTALL_HINT.items() if k in name), None)
        if "missing dependencies" in text and hint:
            text += f"; install {hint} (pip install {hint.replace(' and ', ' ')})"
        raise ScanReadError(path, f"DICOM pixel data cannot be decoded ({name}): {text}") from None
    pi = str(info.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))
    return arr, pi.upper()


def _voi_window(ds) -> tuple[float, float] | None:
    """The first ``(center, width)`` window, or None when absent, zero or invalid."""
    from pydicom.multival import MultiValue

    if str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if not (np.isfinite(center) and np.isfinite(width)) or width <= 0:
        return None
    if func == "LINEAR" and width < 1:  # PS3.3 C.11.2.1.2.1
        return None
    return center, width


def _read_dicom(path: Path, notices: list[str], max_pixels: int | None):
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path, force=True, defer_size="64 KB")
    except Exception as exc:
        raise ScanReadError(path, f"not a readable DICOM file: {_one_line(exc, 200)}") from None
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ScanReadError(path, "DICOM without pixel data (e.g. a plan, report or structure set)")
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError):
        raise ScanReadError(path, "DICOM with an invalid Rows/Columns/SamplesPerPixel") from None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise ScanReadError(path, f"DICOM NumberOfFrames {ds['NumberOfFrames'].value!r} "
                                  "is not a number") from None
    if frames > 1:
        raise ScanReadError(path, f"DICOM has {frames} frames (3-D); only 2-D scans are supported")
    if rows <= 0 or cols <= 0:
        raise ScanReadError(path, "DICOM pixel data without Rows/Columns")
    _check_shape(path, (rows, cols), max_pixels, channels=samples)
    arr, pi = _dicom_pixels(path, ds)
    meta: dict[str, Any] = {"dicom": _safe_tags(ds), "original_dtype": str(arr.dtype)}
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        notices.append("palette colour mapped to RGB")
    if arr.ndim == 3:
        grey = _to_grey(path, arr, notices, alpha=False)
        if pi == "PALETTE COLOR":  # LUT entries are 8 or 16 bits
            top = 255.0 if arr.dtype == np.uint8 else 65535.0
        else:
            top = float(2 ** int(ds.get("BitsStored", 8 * arr.dtype.itemsize) or 8) - 1)
        image = _rescale(grey, 0.0, top)
        meta.update(normalisation=f"colour range 0..{top:g}")
        spacing, source = _dicom_spacing(ds, notices)
        meta["spacing_source"] = source
        return image, spacing, meta
    image, norm = _dicom_grey(path, arr, ds, notices, apply_modality_lut, apply_voi_lut)
    meta["normalisation"] = norm
    shape = str(ds.get("PresentationLUTShape", "") or "").upper()
    invert = pi == "MONOCHROME1" or shape == "INVERSE"
    if invert:
        np.subtract(1.0, image, out=image)  # polarity last, once
        why = " and ".join(w for w, on in (("MONOCHROME1", pi == "MONOCHROME1"),
                                             ("PresentationLUTShape INVERSE", shape == "INVERSE")) if on)
        notices.append(f"{why} inverted so that bone is bright")
    meta["inverted"] = invert
    spacing, source = _dicom_spacing(ds, notices)
    meta["spacing_source"] = source
    return image, spacing, meta


def _dicom_grey(path: Path, arr: np.ndarray, ds, notices: list[str], modality_lut, voi_lut):
    """Stored values -> float32 [0, 1]: modality LUT, then VOI LUT / window / full range.

    pydicom's LUT functions work pixel by pixel, so they are applied in row chunks
    into one float32 output (no whole-image float64 copies).
    """
    if arr.ndim != 2:
        raise ScanReadError(path, f"decoded to shape {arr.shape}, not a 2-D image")
    rows = max(1, _CHUNK // max(1, arr.shape[1]))
    chunks = [slice(i, i + rows) for i in range(0, arr.shape[0], rows)]

    def modality(c: np.ndarray) -> np.ndarray:
        return np.asarray(modality_lut(c, ds), dtype=np.float64)

    voi_seq = bool(ds.get("VOILUTSequence"))
    window = None if voi_seq else _voi_window(ds)
    if voi_seq:
        # the LUT's output range: every input it maps, through pydicom's own LUT decoding
        entries, first = (int(v) for v in ds.VOILUTSequence[0].LUTDescriptor[:2])
        probe = np.arange(first, first + (entries or 65536), dtype=np.float64)
        lut = np.asarray(voi_lut(probe, ds), dtype=np.float64)
        lo, hi = float(lut.min()), float(lut.max())
        how = f"VOI LUT sequence, output {lo:g}..{hi:g}"

        def apply(c: np.ndarray) -> np.ndarray:
            return np.asarray(voi_lut(modality(c), ds), dtype=np.float64)
    elif window is not None:
        from pydicom.pixels import apply_windowing

        probe = apply_windowing(np.array([-1e300, 1e300]), ds)  # the window's output range
        lo, hi = float(probe[0]), float(probe[1])
        how = f"window center {window[0]:g} width {window[1]:g}, output {lo:g}..{hi:g}"

        def apply(c: np.ndarray) -> np.ndarray:
            return np.asarray(apply_windowing(modality(c), ds), dtype=np.float64)
    else:
        if ds.get("WindowWidth") is not None:
            notices.append(f"VOI window width {ds.get('WindowWidth')!s} is not usable: "
                           "full range shown")
        lo, hi = np.inf, -np.inf
        for s in chunks:
            m = modality(arr[s])
            lo, hi = min(lo, float(np.nanmin(m))), max(hi, float(np.nanmax(m)))
        how = f"full range {lo:g}..{hi:g} (no VOI window)"
        apply = modality
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ScanReadError(path, "no finite pixel value after the modality LUT")
    out = np.empty(arr.shape, np.float32)
    if not hi > lo:
        notices.append("constant image")
        out[:] = 0.0
        return out, how + " (constant image -> 0)"
    for s in chunks:
        _rescale(apply(arr[s]), lo, hi, out=out[s])
    return out, how


def _safe_tags(ds) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in _SAFE_TAGS:
        try:
            value = ds.get(tag)
        except Exception:  # an unparsable value (bad VR) is left out
            continue
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


def _pair(ds, tag: str) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in ds.get(tag) or ())
    except (TypeError, ValueError):
        return None
    if all(np.isfinite((row, col))) and row > 0 and col > 0:
        return row, col
    return None


def _dicom_spacing(ds, notices: list[str]) -> tuple[tuple[float, float] | None, str | None]:
    """``((row, col) mm, source)``: PixelSpacing, else ImagerPixelSpacing / ERMF, else
    ImagerPixelSpacing (detector plane, larger than the patient by the magnification)."""
    spacing = _pair(ds, "PixelSpacing")
    if spacing:
        return spacing, "PixelSpacing"
    imager = _pair(ds, "ImagerPixelSpacing")
    if not imager:
        return None, None
    try:
        ermf = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
    except (TypeError, ValueError):
        ermf = 0.0
    if np.isfinite(ermf) and ermf > 0:
        return (imager[0] / ermf, imager[1] / ermf), "ImagerPixelSpacing/ERMF"
    notices.append("spacing is the detector's ImagerPixelSpacing (no magnification "
                   "factor): distances in the patient are smaller")
    return imager, "ImagerPixelSpacing"


# ----------------------------------------------------------------- NIfTI ---


def _read_nifti(path: Path, notices: list[str], max_pixels: int | None):
    import nibabel as nib

    try:
        img = nib.load(path)
    except Exception as exc:
        with open(path, "rb") as fh:
            head = fh.read(132)
        raise ScanReadError(path, f"not a NIfTI file ({_one_line(exc, 160)}; content looks like "
                                  f"{_sniff(head)})") from None
    shape = tuple(int(s) for s in img.shape)
    rc = _check_shape(path, shape, max_pixels, what="NIfTI volume")  # before any voxel is read
    data = np.asanyarray(img.dataobj).reshape(rc)
    zooms = [float(z) for z in img.header.get_zooms()[:2]] if len(shape) >= 2 else [0.0, 0.0]
    good = all(z > 0 and np.isfinite(z) for z in zooms)
    spacing = (zooms[1], zooms[0]) if good else None
    units = img.header.get_xyzt_units()[0] or "unknown"
    arr = np.asarray(data).T
    image, norm = _normalise(path, arr, notices, minmax=True, max_pixels=max_pixels)
    return image, spacing, {"nifti_units": units, "original_dtype": str(arr.dtype),
                            "normalisation": norm, "spacing_source": "pixdim" if good else None}


_READERS: dict[str, Reader] = {
    "png": lambda p, n, m: _read_pil(p, n, m, kind="png"),
    "jpeg": lambda p, n, m: _read_pil(p, n, m, kind="jpeg"),
    "tiff": _read_tiff, "dicom": _read_dicom, "nifti": _read_nifti,
}


# --------------------------------------------------- the time-limited decode ---


class _DecodeWorker:
    """One helper process that runs :func:`_read_here`; killed and restarted on a timeout.

    Requests and answers are JSON headers plus raw float32 bytes over a
    multiprocessing pipe (no pickled data). The standard library has no
    "call with a hard time limit" for code that may never return, hence this class.
    """

    START_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def _start(self) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=True)
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                           name="pcl-scan-decoder")
        proc.start()
        child.close()
        if not parent.poll(self.START_TIMEOUT_S) or parent.recv_bytes() != b"ready":
            proc.kill()
            raise RuntimeError("the decoder process did not start")
        self._proc, self._conn = proc, parent

    def stop(self) -> None:
        """Kill the helper (it restarts on the next timed read)."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def read(self, p: Path, max_pixels: int | None, timeout_s: float) -> Scan:
        with self._lock:
            if self._proc is None or not self._proc.is_alive():
                self.stop()
                try:
                    self._start()
                except Exception as exc:
                    raise ScanReadError(p, f"cannot start the decoder process: {exc}") from None
            conn = self._conn
            try:
                conn.send_bytes(json.dumps({"path": str(p), "max_pixels": max_pixels}).encode())
                if not conn.poll(max(timeout_s, 0.0)):
                    self.stop()
                    raise ScanReadError(p, f"decoding took longer than the time limit of "
                                           f"{timeout_s:g} s; stopped")
                head = json.loads(conn.recv_bytes())
                h, w = head["shape"] if head["ok"] else (0, 0)
                buf = bytearray(h * w * 4)
                if h * w:
                    conn.recv_bytes_into(buf)
            except (EOFError, OSError):
                if self._proc is not None:
                    self._proc.join(1)
                code = self._proc.exitcode if self._proc is not None else None
                self.stop()
                raise ScanReadError(p, f"the decoder process died while decoding "
                                       f"(exit code {code})") from None
        if not head["ok"]:
            raise ScanReadError(p, head["reason"])
        image = np.frombuffer(buf, np.float32).reshape(h, w)
        spacing = tuple(head["spacing"]) if head["spacing"] else None
        return Scan(image=image, spacing=spacing, name=head["name"], path=str(p),
                    metadata=head["metadata"])


def _worker_main(conn) -> None:
    """Helper process: answer read requests until the pipe closes."""
    conn.send_bytes(b"ready")
    while True:
        try:
            req = json.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            scan = _read_here(Path(req["path"]), req["max_pixels"])
        except ScanReadError as exc:
            conn.send_bytes(json.dumps({"ok": False, "reason": exc.reason}).encode())
            continue
        except BaseException as exc:  # never let the helper die on one file
            conn.send_bytes(json.dumps({"ok": False, "reason": f"cannot decode: "
                                        f"{type(exc).__name__}: {_one_line(exc)}"}).encode())
            continue
        img = np.ascontiguousarray(scan.image, dtype=np.float32)
        conn.send_bytes(json.dumps({
            "ok": True, "shape": list(img.shape), "name": scan.name,
            "spacing": list(scan.spacing) if scan.spacing else None,
            "metadata": scan.metadata}, default=str).encode())
        if img.size:
            conn.send_bytes(memoryview(img).cast("B"))


class _DecodePool:
    """Helpers for concurrent timed reads: each caller thread borrows an idle helper or
    starts one, so N threads reading at once use N processes (and no more)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[_DecodeWorker] = []
        self._all: list[_DecodeWorker] = []

    def read(self, p: Path, max_pixels: int | None, timeout_s: float) -> Scan:
        with self._lock:
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _DecodeWorker()
                self._all.append(worker)
        try:
            return worker.read(p, max_pixels, timeout_s)
        finally:
            with self._lock:
                self._idle.append(worker)

    def pids(self) -> list[int | None]:
        """Process ids of the helpers (None: killed, restarts on its next read)."""
        return [w.pid for w in self._all]

    def stop(self) -> None:
        """Kill every helper (each restarts on demand)."""
        for w in self._all:
            w.stop()


_WORKER = _DecodePool()


# --------------------------------------------------------------- writers ---


def write_labels(path: str | os.PathLike, labels: np.ndarray,
                 spacing: tuple[float, float] | None = None) -> Path:
    """Write ``(H, W)`` integer labels (0..255) as uint8 PNG or NIfTI (``.nii``/``.nii.gz``).

    ``spacing`` (row, col) in mm is stored in the NIfTI header. Atomic. DICOM SEG
    (which needs the source image) is :func:`pcl_viewer.data.dicom_seg.write_dicom_seg`.
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

        return atomic_save(p, lambda t: Image.fromarray(lab).save(t, format="PNG"))
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        affine = np.diag([spacing[1], spacing[0], 1.0, 1.0]) if spacing else np.eye(4)
        img = nib.Nifti1Image(np.ascontiguousarray(lab.T), affine)
        img.header.set_xyzt_units("mm")
        return atomic_save(p, lambda t: nib.save(img, t))
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

    return atomic_save(p, lambda t: Image.fromarray(arr, "RGB").save(t, format="PNG"))
