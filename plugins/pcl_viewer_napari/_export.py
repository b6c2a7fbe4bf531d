"""Export of one scan's results: consistency CSV, every layer, provenance JSON."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pcl_viewer.pipeline import PipelineResult


def export_scan(folder: str | Path, scan_layer, layers: list,
                result: PipelineResult | None) -> list[Path]:
    """Write ``consistency.csv`` (when segmented), the scan and ``layers`` (images as 16-bit
    PNG, labels as PNG and NIfTI with the spacing, CHRO-maps as PNG) and ``provenance.json``
    (every file's layer metadata) into ``folder``; returns the paths written."""
    from pcl_viewer.data.readers import write_labels, write_rgb
    from pcl_viewer.pipeline import rows_to_csv
    from pcl_viewer_napari._writer import write_grey

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    spacing = tuple(float(s) for s in scan_layer.scale[-2:])
    if result is not None and result.consistency:
        written.append(rows_to_csv(result.consistency, folder / "consistency.csv",
                                   scan=scan_layer.name))
    provenance = {}
    for ly in [scan_layer, *layers]:
        stem = _safe(ly.name)
        kind = ly.metadata.get("kind", "scan")
        if kind in ("captions", "linked"):  # display aids, not results
            continue
        if kind == "labels":
            written += [write_labels(folder / f"{stem}.png", ly.data),
                        write_labels(folder / f"{stem}.nii.gz", ly.data, spacing=spacing)]
        elif kind == "chromap":
            written.append(write_rgb(folder / f"{stem}.png", ly.data))
        elif kind == "difference":  # [-1, 1] -> [0, 1]
            written.append(Path(write_grey(folder / f"{stem}.png", (ly.data + 1) / 2)))
        else:
            written.append(Path(write_grey(folder / f"{stem}.png", ly.data)))
        provenance[written[-1].name] = {"layer": ly.name, "kind": kind, **ly.metadata}
    prov = folder / "provenance.json"
    prov.write_text(json.dumps(provenance, indent=2, default=str))
    written.append(prov)
    return written


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", name).strip("_") or "layer"
