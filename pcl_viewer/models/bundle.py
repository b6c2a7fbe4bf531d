"""Model bundles: a folder with ``card.json`` and safetensors weight files.

The card names the architecture of every component, its config, the parent
encodings, input size and intensity convention, training data and command,
metrics, and the sha256 of every weight file. Loading verifies every hash and
refuses pickles: nothing is ever unpickled.

Layout::

    BUNDLE/
      card.json
      <component>.safetensors     (one per component, e.g. unet, hvae, classifier)

Card schema (``format: pcl-bundle/1``)::

    {"format": "pcl-bundle/1", "name": str, "version": str, "kind": str,
     "components": {"unet": {"architecture": "dense-unet", "config": {...},
                             "file": "unet.safetensors", "sha256": "..."}},
     "parents": {...}, "input": {"size": 128, "intensity": "float32 [0, 1]"},
     "training": {"command": str, "seed": int, "data": str}, "metrics": {...}}
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "pcl-bundle/1"
CARD = "card.json"
# Extensions that may hold pickles. Their mere presence refuses the bundle:
# a tampered folder is not silently "cleaned" by ignoring files.
PICKLE_SUFFIXES = {".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib", ".npy", ".npz"}

# architecture name -> "module:builder"; builder(config: dict) -> torch.nn.Module.
# Modules are imported lazily so the registry costs nothing at start-up.
ARCHITECTURES: dict[str, str] = {
    "dense-unet": "pcl_viewer.models.unet:build_from_config",
    "hvae": "pcl_viewer.models.hvae:build_from_config",
    "attribute-classifier": "pcl_viewer.models.classifiers:build_from_config",
}


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the bundle and the problem."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_architecture(name: str, target: str) -> None:
    """Register ``module:function`` as the builder of ``name``."""
    ARCHITECTURES[name] = target


def _builder(name: str, where: Path) -> Callable[[dict], Any]:
    if name not in ARCHITECTURES:
        raise BundleError(
            f"{where}: unknown architecture {name!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    module, func = ARCHITECTURES[name].split(":")
    return getattr(importlib.import_module(module), func)


@dataclass
class ModelBundle:
    """A verified bundle on disk. Build networks with :meth:`build`."""

    path: Path
    card: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        return str(self.card.get("name", self.path.name))

    @property
    def components(self) -> dict[str, dict[str, Any]]:
        return self.card["components"]

    @property
    def fingerprint(self) -> str:
        """Short hash over the weight hashes: identifies the exact weights in layer metadata."""
        joined = "".join(c["sha256"] for _, c in sorted(self.components.items()))
        return hashlib.sha256(joined.encode()).hexdigest()[:12]

    @classmethod
    def load(cls, path: str | os.PathLike, kind: str | None = None) -> ModelBundle:
        """Open and verify a bundle folder (card schema, no pickles, every sha256)."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"{path}: not a bundle folder (expected a folder with {CARD})")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise BundleError(
                f"{path}: refusing a bundle that contains pickle-capable files {pickles}; "
                "bundles hold safetensors only"
            )
        card_path = path / CARD
        if not card_path.is_file():
            raise BundleError(f"{path}: missing {CARD}")
        try:
            card = json.loads(card_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{card_path}: not valid JSON ({exc})") from exc
        if card.get("format") != FORMAT:
            raise BundleError(f"{card_path}: format {card.get('format')!r}, expected {FORMAT!r}")
        if kind is not None and card.get("kind") != kind:
            raise BundleError(f"{path}: a {card.get('kind')!r} bundle, expected {kind!r}")
        comps = card.get("components")
        if not isinstance(comps, dict) or not comps:
            raise BundleError(f"{card_path}: no components")
        for cname, comp in comps.items():
            _builder(comp.get("architecture", "<missing>"), path)
            fpath = path / comp.get("file", "")
            if fpath.suffix != ".safetensors" or not fpath.is_file():
                raise BundleError(f"{path}: component {cname!r} file {comp.get('file')!r} missing")
            digest = sha256_file(fpath)
            if digest != comp.get("sha256"):
                raise BundleError(
                    f"{fpath}: sha256 {digest[:16]}... does not match the card "
                    f"({str(comp.get('sha256'))[:16]}...); the weights were changed or corrupted"
                )
        return cls(path=path, card=card)

    def state_dict(self, component: str) -> dict[str, Any]:
        from safetensors.torch import load_file

        comp = self._component(component)
        return load_file(str(self.path / comp["file"]))

    def config(self, component: str) -> dict[str, Any]:
        return dict(self._component(component).get("config", {}))

    def build(self, component: str, device: str = "cpu"):
        """Rebuild the network of ``component`` from its card config and load its weights.

        Weights of the wrong shape or with missing/unexpected keys raise BundleError.
        """
        comp = self._component(component)
        model = _builder(comp["architecture"], self.path)(comp.get("config", {}))
        state = self.state_dict(component)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise BundleError(
                f"{self.path}: weights of {component!r} do not fit architecture "
                f"{comp['architecture']!r}: {' '.join(first[:3])}"
            ) from exc
        return model.to(device).eval()

    def _component(self, component: str) -> dict[str, Any]:
        if component not in self.components:
            raise BundleError(
                f"{self.path}: no component {component!r} (has {', '.join(self.components)})"
            )
        return self.components[component]


def save_bundle(
    path: str | os.PathLike,
    card: dict[str, Any],
    components: dict[str, tuple[str, dict[str, Any], Any]],
) -> ModelBundle:
    """Write a bundle atomically.

    Args:
        path: destination folder (replaced if it exists).
        card: card fields (name, version, kind, parents, input, training, metrics ...).
        components: ``{name: (architecture, config_dict, module_or_state_dict)}``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        out = dict(card)
        out["format"] = FORMAT
        out["components"] = {}
        for cname, (arch, config, weights) in components.items():
            state = weights.state_dict() if hasattr(weights, "state_dict") else weights
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            fname = f"{cname}.safetensors"
            save_file(state, str(tmp / fname))
            out["components"][cname] = {
                "architecture": arch,
                "config": config,
                "file": fname,
                "sha256": sha256_file(tmp / fname),
            }
        (tmp / CARD).write_text(json.dumps(out, indent=2, sort_keys=False, default=str) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelBundle.load(path)


def find_bundle(name_or_path: str | os.PathLike) -> Path:
    """Resolve a bundle given as a path, or a name under resources/models or the user dir."""
    from pcl_viewer.paths import models_dir, user_models_dir

    p = Path(name_or_path)
    if p.is_dir():
        return p
    for root in (models_dir(), user_models_dir()):
        if (root / str(name_or_path)).is_dir():
            return root / str(name_or_path)
    raise BundleError(f"no bundle {str(name_or_path)!r} (not a folder, not in {models_dir()})")
