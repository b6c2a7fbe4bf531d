"""Domain check: how typical a scan is for the loaded counterfactual model.

The statistic is the HVAE's negative ELBO of the scan at model size, in bits per
pixel (``bpd``): reconstruction NLL plus the KL of the latents, with the parents the
classifiers read from the scan. The HVAE was trained on the phantom's training
styles, so its ELBO is the most direct "have I seen images like this" measure we
have. A fixed seed draws the latent sample, so a scan always gets the same value.

Calibration (:func:`calibrate`, ``pcl domain calibrate``) renders held-out phantom
scans of the training styles (a seed no model was trained on), computes their
``bpd`` and stores the median, a robust spread (IQR / 1.349), the sorted robust
z-scores ``|bpd - median| / spread`` and a threshold: the ``1 - flag_rate``
quantile of those z-scores (about ``flag_rate`` of in-domain scans are flagged).
Both tails count: a scan far *more* likely than the phantom (a flat field) is as
untypical as one far less likely (a photo, noise). Then, for a new scan:

    domain_score = fraction of held-out scans whose z is >= the scan's z  (0..1, 1 = typical)
    out_of_domain = z > threshold

A second, model-free statistic guards what the ELBO misses: the realistic phantom is
diverse enough that the HVAE gives some photos and noise fields an ordinary ELBO. The
scan's correlation with the mean held-out radiograph at 32 px (dark lung fields either
side of a bright mediastinum), standardised the same way, is calibrated one-sided (low
is untypical). Each statistic flags about half the flag rate of held-out scans; a scan
is out of domain when either flags it, and its score is the smaller of the two.

The calibration records the fingerprint of the counterfactual bundle it was made
with; a pipeline with another bundle reports "domain check uncalibrated for these
models" instead of a score. The classifiers' mean binary entropy (bits) is
reported beside the score but does not decide: on the phantom it is heavy-tailed
(uncertain effusions reach 0.33 bits, as high as a photo's), so it separated
nothing the ELBO did not.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DOMAIN_FILE = "domain.json"
FORMAT = "pcl-domain-check"
FLAG_RATE = 0.01
UNCALIBRATED = "domain check uncalibrated for these models"
_SEED = 0  # the latent sample of the ELBO


@dataclass(frozen=True)
class DomainResult:
    """The domain check of one scan.

    Attributes:
        bpd: negative ELBO in bits per pixel at the model's working size, or None.
        z: robust z-score ``|bpd - median| / spread`` of the calibration, or None.
        score: held-out quantile, 0..1 (1 = as typical as the most typical held-out
            scan), or None when uncalibrated.
        out_of_domain: True / False, or None when uncalibrated.
        parent_entropy: the classifiers' mean binary entropy (bits, 0..1), or None.
        message: one line for people ("typical for the models (score 0.62)", ...).
    """

    bpd: float | None
    z: float | None
    score: float | None
    out_of_domain: bool | None
    parent_entropy: float | None
    message: str
    layout: float | None = None  # correlation with the held-out mean radiograph (-1..1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Calibration:
    """What ``pcl domain calibrate`` stores (JSON); see the module docstring."""

    median: float
    spread: float
    threshold: float
    z_sorted: list[float]
    fingerprints: dict[str, str]
    flag_rate: float = FLAG_RATE
    statistic: str = "bpd"
    info: dict[str, Any] = field(default_factory=dict)
    # the layout statistic: correlation of the scan (LAYOUT_SIZE px, standardised) with
    # the mean held-out radiograph; low values are untypical (one-sided)
    template: list[list[float]] | None = None
    layout_median: float | None = None
    layout_spread: float | None = None
    layout_threshold: float | None = None
    layout_sorted: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a domain calibration (format {data.get('format')!r})")
        keys = ("median", "spread", "threshold", "z_sorted", "fingerprints", "flag_rate",
                "statistic", "info", "template", "layout_median", "layout_spread",
                "layout_threshold", "layout_sorted")
        return cls(**{k: data[k] for k in keys if k in data})

    def z(self, bpd: float) -> float:
        return abs(float(bpd) - self.median) / self.spread

    def score(self, z: float) -> float:
        """Fraction of held-out scans at least as far from the median as ``z``."""
        return _upper_share(self.z_sorted, z)

    @property
    def has_layout(self) -> bool:
        return self.template is not None and self.layout_sorted is not None

    def layout_z(self, corr: float) -> float:
        """One-sided robust z of a layout correlation (below the median is untypical)."""
        return max(0.0, (float(self.layout_median) - corr) / float(self.layout_spread))


LAYOUT_SIZE = 32


def _upper_share(sorted_values: list[float], z: float) -> float:
    zs = np.asarray(sorted_values)
    return float((len(zs) - np.searchsorted(zs, z, side="left")) / max(len(zs), 1))


def _standardised_small(images: np.ndarray) -> np.ndarray:
    """``(B, S, S)`` -> ``(B, LAYOUT_SIZE**2)`` zero-mean, unit-norm rows."""
    import cv2

    small = np.stack([cv2.resize(np.asarray(im, np.float32), (LAYOUT_SIZE, LAYOUT_SIZE),
                                 interpolation=cv2.INTER_AREA).ravel() for im in images])
    small = small - small.mean(1, keepdims=True)
    return small / np.maximum(np.linalg.norm(small, axis=1, keepdims=True), 1e-6)


def layout_correlation(images: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Pearson correlation ``(B,)`` of each ``(S, S)`` image with a ``(LAYOUT_SIZE**2,)``
    unit-norm template: dark lung fields left and right of a bright mediastinum score
    high, a photo or noise low."""
    return _standardised_small(images) @ np.asarray(template, np.float64).ravel()


def default_path() -> Path:
    from pcl_viewer.paths import models_dir

    return models_dir() / DOMAIN_FILE


class DomainCheck:
    """Scores scans with a pipeline's CF model against a stored calibration.

    ``DomainCheck.for_pipeline(pipe)`` finds the calibration (``domain.json`` under
    resources/models, or the file given); :meth:`score` returns one
    :class:`DomainResult` per model image.
    """

    def __init__(self, cf, calibration: Calibration | None, reason: str = "",
                 statistic=None) -> None:
        self.cf = cf
        self.calibration = calibration
        self.reason = reason
        # (cf, (B, S, S) images, parents, cancel=) -> B floats; the ELBO unless replaced
        self.statistic = statistic or negative_elbo_bits

    @classmethod
    def for_pipeline(cls, pipeline, path: str | Path | None = None) -> DomainCheck:
        """The check for ``pipeline``'s CF bundle; uncalibrated (with the reason) when the
        file is missing, unreadable or made with another CF bundle."""
        path = Path(path) if path is not None else default_path()
        cf_info = pipeline.bundles.get("cf")
        if pipeline.cf is None or cf_info is None:
            return cls(None, None, "no counterfactual model loaded")
        if not hasattr(pipeline.cf, "hvae"):
            return cls(pipeline.cf, None, "the counterfactual model has no HVAE")
        try:
            cal = Calibration.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return cls(pipeline.cf, None, f"no calibration at {path}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return cls(pipeline.cf, None, f"unreadable calibration {path}: {exc}")
        if cal.fingerprints.get("cf") != cf_info.fingerprint:
            return cls(pipeline.cf, None,
                       f"calibrated for cf {cal.fingerprints.get('cf')}, loaded {cf_info.fingerprint}")
        return cls(pipeline.cf, cal)

    @property
    def calibrated(self) -> bool:
        return self.calibration is not None

    def score(self, model_images: np.ndarray, parents: list,
              probabilities: list[dict[str, float] | None] | None = None,
              cancel=None) -> list[DomainResult]:
        """``(B, S, S)`` model images with their parents (``Parents``) -> one result each.

        ``cancel()`` (optional) is polled between scans; see :func:`negative_elbo_bits`.
        """
        probabilities = probabilities or [None] * len(model_images)
        if self.calibration is None:  # nothing to compare with: no model work
            return [DomainResult(None, None, None, None, _entropy(p), f"{UNCALIBRATED} "
                                 f"({self.reason})") for p in probabilities]
        bpd = self.statistic(self.cf, model_images, parents, cancel=cancel)
        cal = self.calibration
        corr: list[float | None] = [None] * len(bpd)
        if cal.has_layout:
            corr = [float(c) for c in layout_correlation(np.asarray(model_images),
                                                         np.asarray(cal.template))]
        return [self._result(b, _entropy(p), c) for b, p, c in zip(bpd, probabilities, corr)]

    def _result(self, bpd: float, entropy: float | None,
                corr: float | None = None) -> DomainResult:
        cal = self.calibration
        if cal is None:
            return DomainResult(bpd, None, None, None, entropy,
                                f"{UNCALIBRATED} ({self.reason})")
        z = cal.z(bpd)
        score = cal.score(z)
        out = bool(z > cal.threshold)
        if corr is not None and cal.has_layout:  # either statistic can flag the scan
            zl = cal.layout_z(corr)
            score = min(score, _upper_share(cal.layout_sorted, zl))
            out = out or bool(zl > cal.layout_threshold)
        if out:
            message = (f"OUT OF DOMAIN: this image is unlike the scans the models were trained "
                       f"on (score {score:.2f}, {bpd:.2f} bits/pixel vs {cal.median:.2f} "
                       "typical). Parents, counterfactuals and segmentations are not reliable.")
        else:
            message = f"typical for the models (domain score {score:.2f})"
        return DomainResult(bpd, z, score, out, entropy, message, corr)


def negative_elbo_bits(cf, model_images: np.ndarray, parents: list, cancel=None) -> list[float]:
    """Negative ELBO (reconstruction NLL + KL, bits per pixel at the HVAE's working size)
    of each ``(S, S)`` image in ``model_images`` ``(B, S, S)`` given its ``Parents``.

    One forward pass per image (the HVAE reports batch means), with a fixed seed for the
    latent sample, so the same image always gets the same value.
    """
    import torch

    hvae = cf.hvae
    device = next(hvae.parameters()).device
    out: list[float] = []
    for img, pa in zip(model_images, parents):
        if cancel is not None and cancel():
            from pcl_viewer.pipeline import Cancelled

            raise Cancelled("cancelled by the user")
        x = torch.as_tensor(np.ascontiguousarray(img, np.float32)[None, None], device=device)
        p = torch.as_tensor(pa.to_vector()[None], device=device)
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(_SEED)
            with torch.inference_mode():
                terms = hvae(x, p)
        out.append(float(terms["nll"] + terms["kl"]) / math.log(2.0))
    return out


def _entropy(probs: dict[str, float] | None) -> float | None:
    if not probs:
        return None
    p = np.clip(np.asarray(list(probs.values()), np.float64), 1e-9, 1 - 1e-9)
    return float(np.mean(-(p * np.log2(p) + (1 - p) * np.log2(1 - p))))


# -------------------------------------------------------------- calibration --


def calibrate(cf_bundle: str | Path = "cf-cpu", seg_bundle: str | Path | None = "seg-cpu",
              n: int = 200, seed: int = 7919, size: int = 256, flag_rate: float = FLAG_RATE,
              out: str | Path | None = None, regime: str | None = None,
              device: str = "cpu", progress=None) -> Calibration:
    """Render ``n`` held-out phantom scans (training styles, ``seed``), score them with the
    CF bundle and write the calibration to ``out`` (default: resources/models/domain.json).

    ``progress(done, total)`` is called as scans are scored.
    """
    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.data.phantom.generate import generate
    from pcl_viewer.data.preprocess import to_model
    from pcl_viewer.pipeline import Pipeline, _parents_from_probs

    if n < 20:
        raise ValueError(f"need at least 20 held-out scans to calibrate, got {n}")
    if not 0.0 < flag_rate < 0.5:
        raise ValueError(f"flag rate must be in (0, 0.5), got {flag_rate}")
    t0 = time.perf_counter()
    pipe = Pipeline.from_bundles(cf_bundle, seg_bundle, device)
    if pipe.cf is None:
        raise ValueError("the domain check needs a counterfactual bundle")
    extra = {"regime": regime} if regime else {}
    with tempfile.TemporaryDirectory(prefix="pcl-domain-") as tmp:
        summary = generate(Path(tmp), n, size, seed, workers=1, **extra)
        ds = load_dataset(tmp)
        images = np.stack([to_model(ds.image(i), pipe.cf_size)[0] for i in range(len(ds))])
    bpd: list[float] = []
    for start in range(0, len(images), 20):
        chunk = images[start : start + 20]
        probs = pipe.infer_parents(chunk)
        bpd += negative_elbo_bits(pipe.cf, chunk, [_parents_from_probs(p) for p in probs])
        if progress is not None:
            progress(len(bpd), len(images))
    values = np.asarray(bpd, np.float64)
    median = float(np.median(values))
    q1, q3 = np.percentile(values, [25, 75])
    spread = float(max((q3 - q1) / 1.349, 1e-6))
    z = np.sort(np.abs(values - median) / spread)
    # two statistics share the flag rate: each flags about half of it on held-out scans
    threshold = float(np.quantile(z, 1.0 - flag_rate / 2))
    # layout: the mean standardised radiograph, fitted on the first half of the held-out
    # scans and calibrated on the second, so the quantiles are not optimistic
    half = len(images) // 2
    mean = _standardised_small(images[:half]).mean(0)
    template = mean / max(float(np.linalg.norm(mean)), 1e-9)
    corr = layout_correlation(images[half:], template)
    l_med = float(np.median(corr))
    lq1, lq3 = np.percentile(corr, [25, 75])
    l_spread = float(max((lq3 - lq1) / 1.349, 1e-6))
    lz = np.sort(np.maximum(0.0, (l_med - corr) / l_spread))
    l_threshold = float(np.quantile(lz, 1.0 - flag_rate / 2))
    from pcl_viewer.data.phantom import PHANTOM_VERSION

    cal = Calibration(
        median=median, spread=spread, threshold=threshold,
        z_sorted=[round(float(v), 6) for v in z],
        fingerprints={k: b.fingerprint for k, b in pipe.bundles.items()},
        flag_rate=flag_rate,
        template=[[round(float(v), 6) for v in row]
                  for row in template.reshape(LAYOUT_SIZE, LAYOUT_SIZE)],
        layout_median=l_med, layout_spread=l_spread, layout_threshold=l_threshold,
        layout_sorted=[round(float(v), 6) for v in lz],
        info={"n": int(n), "seed": int(seed), "size": int(size),
              "styles": summary.get("styles"), "regime": regime or "default",
              "phantom_version": PHANTOM_VERSION,
              "bundles": {k: b.name for k, b in pipe.bundles.items()},
              "bpd_min": float(values.min()), "bpd_max": float(values.max()),
              "flagged_in_sample": int((z > threshold).sum()),
              "layout_flagged_in_sample": int((lz > l_threshold).sum()),
              "seconds": round(time.perf_counter() - t0, 2),
              "command": (f"pcl domain calibrate --cf-bundle {cf_bundle} --seg-bundle "
                          f"{seg_bundle} --n {n} --seed {seed} --size {size}"
                          + (f" --regime {regime}" if regime else ""))})
    path = Path(out) if out is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    from pcl_viewer.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(cal.to_json(), indent=1))
    return cal
