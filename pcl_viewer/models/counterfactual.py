"""Counterfactual inference with the HVAE (docs/method.md §2): abduction, action, prediction.

1. abduct the latents once with the posterior means given ``(x, pa)``;
2. decode ``mu = mean(z, pa)`` and ``mu_cf = mean(z, pa*)`` for each intervention;
3. with a fixed output scale the pixel noise carries over unchanged, so
   ``x_cf = x + (mu_cf - mu)``: pixel-aligned with ``x`` and keeping its detail.

The residual ``mu_cf - mu`` at model size is also what makes a high-resolution
counterfactual cheap: upsample it and add it to the native scan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from pcl_viewer.data.preprocess import Geometry
from pcl_viewer.device import prepare_for_inference, resolve_device
from pcl_viewer.models.bundle import ModelBundle, find_bundle
from pcl_viewer.parents import PARENT_NAMES, PARENT_VALUES, Parents

if TYPE_CHECKING:
    from pcl_viewer.models.classifiers import AttributeClassifiers
    from pcl_viewer.models.hvae import HVAE

CF_KIND = "counterfactual"


@dataclass
class Abduction:
    """Everything interventions reuse: the image, its parents, latents and factual mean.

    ``x`` (B, 1, S, S) in [0, 1]; ``parents`` (B, 3) 0/1; ``mu`` (B, 1, S, S).
    """

    x: torch.Tensor
    parents: torch.Tensor
    # "z", "u": per latent block (B, c, h, w); "fluid": (B, fluid_dim); "xw": (B, 1, W, W), the
    # working-size image a multiscale fluid head or a tone re-mapping reads
    latents: dict[str, Any]
    mu: torch.Tensor


def parents_tensor(parents: Parents | list[Parents] | tuple[Parents, ...] | np.ndarray,
                   batch: int | None = None) -> torch.Tensor:
    """``Parents`` / list of ``Parents`` / array ``(B, 3)`` -> float tensor ``(B, 3)``."""
    if isinstance(parents, Parents):
        vec = torch.from_numpy(parents.to_vector())[None]
        return vec.expand(batch or 1, -1).clone()
    if isinstance(parents, (list, tuple)) and parents and isinstance(parents[0], Parents):
        return torch.from_numpy(np.stack([p.to_vector() for p in parents]))
    return torch.as_tensor(np.asarray(parents, dtype=np.float32))


def intervene(parents: torch.Tensor, do: dict[str, str]) -> torch.Tensor:
    """``(B, 3)`` parents with ``do`` applied to every row, e.g. ``{"scanner": "philips"}``."""
    out = parents.clone()
    for name, value in do.items():
        if name not in PARENT_VALUES:
            raise ValueError(f"cannot intervene on {name!r}; parents are {PARENT_NAMES}")
        if value in ("flip", "flipped"):
            out[:, PARENT_NAMES.index(name)] = 1 - out[:, PARENT_NAMES.index(name)]
            continue
        if value not in PARENT_VALUES[name]:
            raise ValueError(f"invalid value {value!r} for {name}; expected {PARENT_VALUES[name]}")
        out[:, PARENT_NAMES.index(name)] = float(PARENT_VALUES[name].index(value))
    return out


STANDARD_DOS: dict[str, dict[str, str]] = {
    "scanner": {"scanner": "flip"},
    "effusion": {"effusion": "flip"},
    "both": {"scanner": "flip", "effusion": "flip"},
}


class CounterfactualModel:
    """The trained HVAE and attribute classifiers of one bundle, ready for inference."""

    def __init__(self, hvae: torch.nn.Module, classifier: torch.nn.Module | None = None,
                 device: str | torch.device = "cpu", bundle: ModelBundle | None = None) -> None:
        self.device = resolve_device(device)
        # channels_last on every device: the HVAE's narrow convolutions then run without
        # layout reorders (precompute-cf 55 -> 85 images/s per core at 128 px; outputs
        # equal to 3e-6).
        self.hvae = cast("HVAE", prepare_for_inference(hvae, self.device, channels_last=True))
        self.classifier = (cast("AttributeClassifiers",
                                prepare_for_inference(classifier, self.device))
                           if classifier is not None else None)
        self.bundle = bundle

    @classmethod
    def from_bundle(cls, path: str | os.PathLike[str] | ModelBundle,
                    device: str | torch.device = "cpu") -> CounterfactualModel:
        """Load and verify a bundle (components ``hvae`` and, optionally, ``classifier``)."""
        bundle = path if isinstance(path, ModelBundle) else ModelBundle.load(find_bundle(path))
        hvae = bundle.build("hvae", str(device))
        clf = (bundle.build("classifier", str(device)) if "classifier" in bundle.components
               else None)
        return cls(hvae, clf, device, bundle)

    @property
    def image_size(self) -> int:
        return int(self.hvae.cfg.image_size)

    def _x(self, x: Any) -> torch.Tensor:
        t = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        if t.ndim == 2:
            t = t[None, None]
        if t.shape[-1] != self.image_size or t.shape[-2] != self.image_size:
            raise ValueError(f"expected (B, 1, {self.image_size}, {self.image_size}), "
                             f"got {tuple(t.shape)}")
        return t

    @torch.no_grad()
    def infer_parents(self, x: Any) -> dict[str, torch.Tensor]:
        """Calibrated ``{name: (B,) probability of value index 1}`` from the classifiers."""
        if self.classifier is None:
            raise ValueError("this bundle has no attribute classifier")
        probs = self.classifier.probs(self._x(x))
        return {name: probs[:, i] for i, name in enumerate(self.classifier.cfg.attributes)}

    @torch.no_grad()
    def abduct(self, x: Any, parents: Any) -> Abduction:
        """Posterior-mean latents and factual mean of ``x`` (B, 1, S, S) given its parents."""
        x = self._x(x)
        pa = parents_tensor(parents, x.shape[0]).to(self.device)
        latents = self.hvae.abduct(x, pa)
        mu = latents.pop("mu")
        return Abduction(x, pa, latents, mu)

    @torch.no_grad()
    def residual(self, abduction: Abduction, do: dict[str, str] | torch.Tensor,
                 strength: float = 1.0) -> torch.Tensor:
        """``strength * (mu_cf - mu)`` ``(B, 1, S, S)``; ``do`` is a dict or target parents (B, 3)."""
        pa_cf = do.to(self.device) if isinstance(do, torch.Tensor) else intervene(abduction.parents, do)
        mu_cf = self.hvae.decode(abduction.latents, pa_cf)
        return strength * (mu_cf - abduction.mu)

    @torch.no_grad()
    def counterfactual(self, x: Any, parents: Any, do: dict[str, str],
                       strength: float = 1.0) -> torch.Tensor:
        """``x_cf = clip(x + strength * (mu_cf - mu), 0, 1)``, ``(B, 1, S, S)``."""
        ab = self.abduct(x, parents)
        return (ab.x + self.residual(ab, do, strength)).clamp(0, 1)

    @torch.no_grad()
    def standard_views(self, x: Any, parents: Any) -> torch.Tensor:
        """The method's three views ``(B, 3, 1, S, S)``: flip scanner, flip effusion, both.

        One abduction; the three decodes run as one batch.
        """
        ab = self.abduct(x, parents)
        b = ab.x.shape[0]
        targets = torch.cat([intervene(ab.parents, do) for do in STANDARD_DOS.values()])
        latents = {k: (vs.repeat(3, *[1] * (vs.ndim - 1)) if isinstance(vs, torch.Tensor)
                       else [v.repeat(3, 1, 1, 1) for v in vs])
                   for k, vs in ab.latents.items()}
        mu_cf = self.hvae.decode(latents, targets).view(3, b, *ab.mu.shape[1:])
        views = (ab.x[None] + mu_cf - ab.mu[None]).clamp(0, 1)
        return views.transpose(0, 1).contiguous()


def apply_residual_native(native: np.ndarray, residual: np.ndarray, geometry: Geometry) -> np.ndarray:
    """High-resolution counterfactual: ``clip(native + upsample(residual), 0, 1)``.

    Args:
        native: ``(H, W)`` float32 [0, 1], the scan at its own size.
        residual: ``(S, S)`` residual at model size (``geometry.size``).
        geometry: how ``native`` was mapped to the model grid (:func:`to_model`).
    Returns:
        ``(H, W)`` float32 in [0, 1].
    """
    res = np.asarray(residual, dtype=np.float32)
    if res.ndim == 3:
        res = res[0]
    up = geometry.to_native(res)
    out: np.ndarray = np.clip(native.astype(np.float32) + up, 0.0, 1.0)
    return out
