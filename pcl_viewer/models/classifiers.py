"""Attribute classifiers: anticausal predictors of the parents from the image.

One small CNN per binary parent (scanner, sex, effusion), each with its own
temperature for calibrated probabilities (temperature scaling on a validation
split, Guo et al. 2017). The viewer uses them to infer the parents of a scan;
evaluation uses them to measure counterfactual effectiveness.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pcl_viewer.parents import PARENT_NAMES
from pcl_viewer.presets import IMAGE_SIZE, check_preset


@dataclass
class ClassifierConfig:
    """Config of :class:`AttributeClassifiers`. Inputs are resized to ``input_size``."""

    image_size: int = 128
    input_size: int = 64
    widths: tuple[int, ...] = (8, 16, 32, 32)
    attributes: tuple[str, ...] = PARENT_NAMES

    @classmethod
    def for_preset(cls, name: str) -> ClassifierConfig:
        check_preset(name)
        size = IMAGE_SIZE[name]
        if name == "smoke":
            return cls(image_size=size, input_size=32, widths=(8, 16))
        if name == "cpu":
            return cls(image_size=size)
        return cls(image_size=size, input_size=size, widths=(32, 64, 128, 256, 256))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        d = dict(d)
        d["widths"] = tuple(d["widths"])
        d["attributes"] = tuple(d["attributes"])
        return cls(**d)


class SmallCNN(nn.Module):
    """Strided conv net: ``(B, 1, s, s)`` -> one logit ``(B,)`` (mean- and max-pooled features,
    so both global appearance and small local findings count)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for w in widths:
            layers += [nn.Conv2d(c_in, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.GELU(),
                       nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.GELU()]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(2 * c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        pooled = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
        logit: torch.Tensor = self.head(pooled)
        return logit.squeeze(1)


class AttributeClassifiers(nn.Module):
    """Three independent binary classifiers with temperatures.

    ``forward(x (B, 1, S, S) in [0, 1])`` -> calibrated logits ``(B, A)`` in ``attributes`` order;
    ``probs(x)`` -> ``(B, A)`` probability of value index 1 (philips, male, present).
    """

    temperature: torch.Tensor  # (A,) buffer, set by calibration

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nets = nn.ModuleDict({a: SmallCNN(cfg.widths) for a in cfg.attributes})
        self.register_buffer("temperature", torch.ones(len(cfg.attributes)))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, S, S)`` in [0, 1] -> ``(B, 1, s, s)`` centred network input."""
        if x.shape[-1] != self.cfg.input_size:
            x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="area")
        return 2 * x - 1

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Uncalibrated logits ``(B, A)``."""
        xi = self.prepare(x)
        return torch.stack([self.nets[a](xi) for a in self.cfg.attributes], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw_logits(x) / self.temperature

    @torch.no_grad()
    def probs(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(x))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 200) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``sigmoid(logits / T)`` on ``(N,)`` labels."""
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        t = log_t.clamp(-3.0, 3.0).exp()  # separable data would drive T to 0
        loss = F.binary_cross_entropy_with_logits(logits / t, labels.float())
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().clamp(-3.0, 3.0).exp())
    return t if np.isfinite(t) else 1.0


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """ECE of binary probabilities ``(N,)`` of class 1: confidence of the predicted class
    against its accuracy, in equal-width confidence bins."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    pred = probs >= 0.5
    conf = np.where(pred, probs, 1 - probs)
    correct = pred == (labels >= 0.5)
    edges = np.linspace(0.5, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf >= lo) & ((conf < hi) | (hi == 1.0))
        if sel.any():
            ece += sel.mean() * abs(conf[sel].mean() - correct[sel].mean())
    return float(ece)


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean of per-class recalls of binary predictions; classes absent from ``labels`` skipped."""
    pred, labels = np.asarray(pred).astype(bool), np.asarray(labels).astype(bool)
    recalls = [float((pred[labels == c] == c).mean()) for c in (False, True) if (labels == c).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def build_classifiers(preset_or_cfg: str | ClassifierConfig) -> AttributeClassifiers:
    cfg = (preset_or_cfg if isinstance(preset_or_cfg, ClassifierConfig)
           else ClassifierConfig.for_preset(preset_or_cfg))
    return AttributeClassifiers(cfg)


def build_from_config(config: dict[str, Any]) -> AttributeClassifiers:
    """Bundle builder: ``{"classifier": ClassifierConfig dict}``."""
    return AttributeClassifiers(ClassifierConfig.from_dict(config["classifier"]))
