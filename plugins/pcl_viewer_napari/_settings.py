"""Settings remembered between sessions (last bundles, device, reducer).

A small JSON file under the platformdirs user config dir
(``$PCL_VIEWER_CONFIG_DIR`` overrides it, e.g. in tests).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from pcl_viewer.atomic import atomic_write_text
from pcl_viewer.pipeline import DEFAULT_CF_BUNDLE, DEFAULT_SEG_BUNDLE


def settings_path() -> Path:
    env = os.environ.get("PCL_VIEWER_CONFIG_DIR")
    if env:
        return Path(env) / "settings.json"
    from platformdirs import user_config_dir

    return Path(user_config_dir("pcl-viewer")) / "settings.json"


@dataclass
class Settings:
    cf_bundle: str = DEFAULT_CF_BUNDLE
    seg_bundle: str = DEFAULT_SEG_BUNDLE
    device: str = "auto"
    reducer: str = "pca"

    @classmethod
    def load(cls) -> Settings:
        """The saved settings; defaults for a missing or unreadable file (never raises)."""
        try:
            data = json.loads(settings_path().read_text())
        except (OSError, ValueError):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: str(v) for k, v in data.items() if k in known})

    def save(self) -> None:
        path = settings_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(asdict(self), indent=2))
        except OSError:
            pass  # a read-only home must not break the viewer
