"""napari writers: lung labels to PNG, NIfTI or DICOM SEG, CHRO-map (RGB) overlays to PNG.

The files are written atomically by :mod:`pcl_viewer.data.readers` and
:mod:`pcl_viewer.data.dicom_seg`; the layer's metadata goes to a
``<file>.json`` beside it, so an exported result says how it was made
(bundles, parents, intervention, strength). A ``.dcm`` labels file is a DICOM
SEG that references the source scan; the source is found in the layer
metadata (``dicom_source``, else ``scan_path`` as the pipeline sets it, else
``pcl_scan.path`` as the reader sets it) and must be a DICOM file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Labels layer -> ``.png`` (uint8), ``.nii``/``.nii.gz`` (spacing from the layer scale)
    or ``.dcm`` (DICOM SEG referencing the layer's source DICOM scan)."""
    from pcl_viewer.data.readers import write_labels as _write

    if str(path).lower().endswith(".dcm"):
        from pcl_viewer.data.dicom_seg import write_dicom_seg

        source = dicom_source(meta.get("metadata") or {})
        if source is None:
            raise ValueError(f"{path}: a DICOM SEG needs the labels' source DICOM scan, and this "
                             "labels layer has none; open the scan from a .dcm file and segment "
                             "it, or save the labels as .png or .nii.gz")
        out = write_dicom_seg(path, np.asarray(data), source)
        return [str(out), _sidecar(out, meta)]
    scale = meta.get("scale")
    spacing = tuple(float(s) for s in scale[-2:]) if scale is not None else None
    out = _write(path, np.asarray(data), spacing=spacing)
    return [str(out), _sidecar(out, meta)]


def dicom_source(metadata: dict) -> str | None:
    """The source DICOM path named in layer metadata, or None when it names none (or not DICOM)."""
    scan = metadata.get("pcl_scan") or {}
    for candidate in (metadata.get("dicom_source"), metadata.get("scan_path"), scan.get("path")):
        if candidate and _is_dicom(Path(str(candidate))):
            return str(candidate)
    return None


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def write_rgb(path: str, data: Any, meta: dict) -> list[str]:
    """RGB image layer (a CHRO-map) -> PNG."""
    from pcl_viewer.data.readers import write_rgb as _write

    arr = np.asarray(data)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"{path}: only RGB layers (CHRO-maps) are written as PNG here")
    if arr.dtype != np.uint8:
        arr = (np.clip(arr.astype(np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
    out = _write(path, np.ascontiguousarray(arr[..., :3]))
    return [str(out), _sidecar(out, meta)]


def write_grey(path: str, image: np.ndarray) -> str:
    """``(H, W)`` float [0, 1] -> 16-bit PNG (used by the export of scan and counterfactual layers)."""
    import cv2

    arr = (np.clip(np.asarray(image, dtype=np.float32), 0, 1) * 65535 + 0.5).astype(np.uint16)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"{path}: could not write PNG")
    return str(path)


def _sidecar(path: Path, meta: dict) -> str:
    side = Path(str(path) + ".json")
    side.write_text(json.dumps(meta.get("metadata", {}), indent=2, default=str))
    return str(side)
