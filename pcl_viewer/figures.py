"""Report figures: matplotlib on the Agg backend (no display), saved atomically."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from pcl_viewer.atomic import atomic_save


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend, imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """``fig.savefig(path, **savefig)`` atomically (the folder is created), then close ``fig``;
    returns ``path``. The format comes from the extension unless ``format=`` is given."""
    import matplotlib.pyplot as plt

    try:
        return atomic_save(path, lambda t: fig.savefig(t, **savefig))
    finally:
        plt.close(fig)
