"""Rebuild ``resources/priors/`` from the data files shipped in torchxrayvision.

torchxrayvision is never imported (it needs torchvision): its package folder
is located with :func:`importlib.util.find_spec` or, failing that, by a glob
over the interpreter's site-packages.
"""

from __future__ import annotations

import importlib.util
import json
import site
import sys
from pathlib import Path

from pcl_viewer.data.phantom.priors import PADCHEST_CSV, build_tables, read_padchest_pa
from pcl_viewer.data.phantom.shape import MASKS_ZIP, build_shape_model


def find_txrv_data() -> Path:
    """The ``data`` folder of the installed torchxrayvision package (not imported)."""
    spec = importlib.util.find_spec("torchxrayvision")
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "data" for p in spec.submodule_search_locations]
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in roots:
        candidates += list(Path(root).glob("torchxrayvision/data"))
    for c in candidates:
        if (c / MASKS_ZIP).is_file() and (c / PADCHEST_CSV).is_file():
            return c
    raise FileNotFoundError(
        "torchxrayvision's data files were not found; install it with "
        "`pip install --no-deps torchxrayvision` (only needed to rebuild the priors)")


def build_all(out: Path | None = None, source: Path | None = None) -> dict:
    """Write ``lung_shape_model.json`` and ``padchest_tables.json``; return a summary."""
    from pcl_viewer.paths import priors_dir

    out = Path(out) if out else priors_dir()
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else find_txrv_data()
    ssm = build_shape_model(src / MASKS_ZIP)
    (out / "lung_shape_model.json").write_text(json.dumps(ssm.to_dict()))
    tables = build_tables(read_padchest_pa(src / PADCHEST_CSV))
    (out / "padchest_tables.json").write_text(json.dumps(tables, indent=1))
    return {
        "out": str(out),
        "shape_model": {"modes": ssm.n_modes, "variance_kept": ssm.meta["variance_kept"],
                        "n_used": ssm.meta["n_used"], "n_masks": ssm.meta["n_masks"],
                        "explained": [round(float(v), 4) for v in ssm.explained]},
        "observed": tables["observed"],
    }
