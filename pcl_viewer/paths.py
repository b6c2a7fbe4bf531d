"""Where shipped resources, caches and user bundles live."""

from __future__ import annotations

import os
import sys
from pathlib import Path

_REPO_RESOURCES = Path(__file__).resolve().parents[1] / "resources"


def resources_dir() -> Path:
    """The shipped resources folder (priors, default bundles, samples).

    Order: ``$PCL_VIEWER_RESOURCES``, the source tree (editable installs), then
    ``<prefix>/share/pcl-viewer/resources`` for a wheel install.
    """
    env = os.environ.get("PCL_VIEWER_RESOURCES")
    if env:
        return Path(env)
    if _REPO_RESOURCES.is_dir():
        return _REPO_RESOURCES
    return Path(sys.prefix) / "share" / "pcl-viewer" / "resources"


def priors_dir() -> Path:
    return resources_dir() / "priors"


def models_dir() -> Path:
    return resources_dir() / "models"


def samples_dir() -> Path:
    return resources_dir() / "samples"


def cache_dir() -> Path:
    """Datasets, precomputed views and run folders: ``$PCL_VIEWER_CACHE`` or the
    platform cache dir. Never committed."""
    env = os.environ.get("PCL_VIEWER_CACHE")
    if env:
        path = Path(env)
    else:
        from platformdirs import user_cache_dir

        path = Path(user_cache_dir("pcl-viewer"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def user_models_dir() -> Path:
    """Bundles a user installed or trained (platformdirs user data dir)."""
    from platformdirs import user_data_dir

    return Path(os.environ.get("PCL_VIEWER_USER_MODELS", user_data_dir("pcl-viewer"))) / "models"
