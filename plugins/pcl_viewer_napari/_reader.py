"""napari reader: chest radiographs (DICOM, PNG/JPEG/TIFF 8/16-bit, 2-D NIfTI) -> one image layer.

Reading is :func:`pcl_viewer.data.readers.read_scan`; this module only maps a
:class:`Scan` to napari layer data: pixel spacing -> layer scale (mm), the
reader's metadata kept, notices (colour converted to grey ...) shown to the user.
``metadata["pcl_scan"]`` holds the source path (the labels writer uses it to
reference a DICOM source in a SEG) and ``spacing_source`` (PixelSpacing,
ImagerPixelSpacing, ImagerPixelSpacing/ERMF, pixdim or None): detector spacing
is not patient spacing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcl_viewer.data.scan import Scan

SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz")


def napari_get_reader(path: str | list[str]):
    """Return :func:`read_layers` when every path has a supported suffix, else None."""
    paths = [path] if isinstance(path, str) else list(path)
    if not paths or not all(str(p).lower().endswith(SUFFIXES) for p in paths):
        return None
    return read_layers


def read_layers(path: str | list[str]) -> list[tuple[Any, dict, str]]:
    """Read each path; raises ScanReadError (a readable message) for a broken file."""
    from pcl_viewer.data.readers import read_scan

    paths = [path] if isinstance(path, str) else list(path)
    out = []
    for p in paths:
        scan = read_scan(p)
        _notify(scan)
        out.append(scan_layer_data(scan))
    return out


def scan_layer_data(scan: Scan, **extra_meta: Any) -> tuple[Any, dict, str]:
    """``(data, kwargs, "image")`` of a scan: grey, contrast [0, 1], scale = spacing in mm."""
    meta = {"pcl_scan": {"name": scan.name, "path": scan.path,
                         "format": scan.metadata.get("format"),
                         "spacing": list(scan.spacing) if scan.spacing else None,
                         "spacing_source": scan.metadata.get("spacing_source")},
            **_json_safe(scan.metadata), **extra_meta}
    kwargs = {"name": scan.name, "metadata": meta, "colormap": "gray",
              "contrast_limits": (0.0, 1.0)}
    if scan.spacing:
        kwargs["scale"] = tuple(float(s) for s in scan.spacing)
    return scan.image, kwargs, "image"


def _notify(scan: Scan) -> None:
    notices = scan.metadata.get("notices") or []
    if notices:
        from napari.utils.notifications import show_info

        show_info(f"{Path(scan.path or scan.name).name}: " + "; ".join(map(str, notices)))


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
