"""Sample scans: the phantom radiographs shipped in resources/samples (known parents).

``pcl phantom samples`` writes 16-bit PNGs and ``samples.json`` there. Without
them (a bare checkout) a phantom scan is rendered on the fly, and as a last
resort a simple synthetic chest, so the app always shows something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pcl_viewer.data.scan import Scan

# key -> (style, effusion) of the phantom scan it shows
SAMPLES: dict[str, tuple[str, bool]] = {
    "imagingdynamics-normal": ("imagingdynamics", False),
    "philips-normal": ("philips", False),
    "imagingdynamics-effusion": ("imagingdynamics", True),
    "philips-effusion": ("philips", True),
    "portable": ("portable", False),
}


def sample_scan(key: str = "imagingdynamics-normal") -> Scan:
    """The sample ``key`` as a Scan; its known parents are in ``metadata["true_parents"]``."""
    if key not in SAMPLES:
        raise ValueError(f"unknown sample {key!r}; choose one of {', '.join(SAMPLES)}")
    return _from_resources(key) or _rendered(key) or _synthetic(key)


def sample_layers(key: str) -> list[tuple[Any, dict, str]]:
    from pcl_viewer_napari._reader import scan_layer_data

    scan = sample_scan(key)
    return [scan_layer_data(scan, sample=key)]


def imagingdynamics_normal():
    return sample_layers("imagingdynamics-normal")


def philips_normal():
    return sample_layers("philips-normal")


def imagingdynamics_effusion():
    return sample_layers("imagingdynamics-effusion")


def philips_effusion():
    return sample_layers("philips-effusion")


def portable():
    return sample_layers("portable")


def _entries(root: Path) -> list[dict]:
    try:
        data = json.loads((root / "samples.json").read_text())
    except (OSError, ValueError):
        return []
    items = data.get("samples", data) if isinstance(data, dict) else data
    if isinstance(items, dict):  # {name: entry}
        items = [{"name": k, **v} for k, v in items.items() if isinstance(v, dict)]
    return [e for e in items if isinstance(e, dict)] if isinstance(items, list) else []


def _matches(entry: dict, style: str, effusion: bool) -> bool:
    parents = entry.get("parents") if isinstance(entry.get("parents"), dict) else {}
    e_style = (entry.get("style") or parents.get("style") or parents.get("scanner")
               or entry.get("scanner"))
    e_eff = entry.get("effusion", parents.get("effusion"))
    e_eff = e_eff in (True, 1, "present", "true", "yes") if e_eff is not None else False
    return e_style == style and (style == "portable" or e_eff == effusion)


def _from_resources(key: str, root: Path | None = None) -> Scan | None:
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError
    from pcl_viewer.paths import samples_dir

    root = root or samples_dir()
    style, effusion = SAMPLES[key]
    for entry in _entries(root):
        if not _matches(entry, style, effusion):
            continue
        fname = entry.get("file") or entry.get("path") or entry.get("image")
        if not fname:
            continue
        try:
            scan = read_scan(root / fname)
        except ScanReadError:
            return None
        scan.name = key
        scan.metadata["true_parents"] = _true_parents(entry)
        scan.metadata["sample_source"] = str(root)
        return scan
    return None


def _true_parents(entry: dict) -> dict:
    """The phantom's parents in the viewer's words: scanner (= acquisition style), sex,
    effusion present/absent; other phantom facts (age, care ...) are kept as they are."""
    raw = dict(entry.get("parents") or entry)
    style = raw.get("style") or raw.get("scanner")
    eff = raw.get("effusion")
    if isinstance(eff, bool) or eff in (0, 1):
        eff = "present" if eff else "absent"
    keep = {k: v for k, v in raw.items() if isinstance(v, str | int | float | bool)}
    return {**keep, "scanner": style, "effusion": eff}


def _rendered(key: str) -> Scan | None:
    """The phantom samples rendered once into the cache (``pcl phantom samples``); None if
    the phantom cannot render here (no priors)."""
    from pcl_viewer.paths import cache_dir

    root = cache_dir() / "samples"
    if not (root / "samples.json").is_file():
        try:
            from pcl_viewer.data.phantom.montage import write_samples

            write_samples(root)
        except Exception:  # missing priors or modules: the synthetic chest will do
            return None
    return _from_resources(key, root)


def _synthetic(key: str, h: int = 1024, w: int = 896) -> Scan:
    """A smooth synthetic chest (thorax, two lungs, spine, ribs): enough to try the app."""
    style, effusion = SAMPLES[key]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, cy = w / 2, h * 0.52
    img = 0.25 + 0.5 * np.exp(-(((xx - cx) / (0.42 * w)) ** 4 + ((yy - cy) / (0.62 * h)) ** 4))
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        d = ((xx - cx - side * 0.19 * w) / (0.14 * w)) ** 2 + ((yy - cy + 0.02 * h) / (0.3 * h)) ** 2
        lungs = np.maximum(lungs, np.clip(1.2 - d, 0, 1))
    ribs = 0.05 * (np.sin(yy / h * 60 + np.abs(xx - cx) / w * 8) > 0.6)
    img = img - 0.42 * lungs + ribs * lungs
    img += 0.25 * np.exp(-((xx - cx) / (0.045 * w)) ** 2)  # spine / mediastinum
    if effusion:
        img += 0.3 * lungs * np.clip((yy - cy - 0.12 * h) / (0.15 * h), 0, 1) * (xx > cx)
    if style == "philips":
        img = 0.08 + 0.9 * img ** 0.8
    elif style == "portable":
        img = 0.15 + 0.7 * img + 0.1 * (xx / w)
    img += np.random.default_rng(0).normal(0, 0.01, img.shape).astype(np.float32)
    parents = {"scanner": style, "effusion": "present" if effusion else "absent"}
    return Scan(np.clip(img, 0, 1).astype(np.float32), name=key,
                metadata={"true_parents": parents, "sample_source": "synthetic fallback"})
