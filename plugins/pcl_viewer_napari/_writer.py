"""napari writers: lung labels to PNG or NIfTI, CHRO-map (RGB) overlays to PNG.

The files are written atomically by :mod:`pcl_viewer.data.readers`; the
layer's metadata goes to a ``<file>.json`` beside it, so an exported result
says how it was made (bundles, parents, intervention, strength).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Labels layer -> ``.png`` (uint8) or ``.nii``/``.nii.gz`` (spacing from the layer scale)."""
    from pcl_viewer.data.readers import write_labels as _write

    scale = meta.get("scale")
    spacing = tuple(float(s) for s in scale[-2:]) if scale is not None else None
    out = _write(path, np.asarray(data), spacing=spacing)
    return [str(out), _sidecar(out, meta)]


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
