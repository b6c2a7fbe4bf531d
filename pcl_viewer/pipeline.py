"""The viewer's pipeline: one scan in, counterfactuals, segmentations and CHRO-maps out.

The GUI, ``pcl-viewer --screenshot`` and ``pcl review`` all call this module (see
docs/CONTRACTS.md, "Pipeline"); it imports no Qt or napari.

:meth:`Pipeline.run` is a generator (stardist-napari pattern): it yields the events of
:mod:`pcl_viewer.events` (progress, and immutable partial results for the viewer) and
returns a :class:`PipelineResult`. The story, top-down::

    model_image, geometry = to_model(scan.image, S)             # preprocess
    parents = user parents or classifiers(model_image)          # parents
    domain = HVAE negative ELBO vs held-out phantom quantiles   # domain
    abduction = cf.abduct(model_image, parents)   (cached)      # abduct
    residual_k = cf.residual(abduction, do_k)  for each do_k    # decode
    view_k = scan.image + strength * upsample(residual_k)       #   (native size)
    quality_k = recon error, reversibility, classifier read-back # quality
    logits_k, features_k = unet(to_model(view_k))               # segment
    labels_k = argmax(logits_k) -> native (nearest)
    chromap = ChroMap.fit(features of all views)                # chromap
    rows = Dice / lung-area change of each view vs factual      # consistency
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np

from pcl_viewer.data.preprocess import Geometry, to_model
from pcl_viewer.data.scan import Scan
from pcl_viewer.events import DomainReady, ParentsReady, QualityReady, Step, TableReady, ViewReady
from pcl_viewer.parents import (
    PARENT_NAMES,
    PARENT_VALUES,
    VIEW_KINDS,
    Parents,
    intervention_name,
)
from pcl_viewer.segmentation import Segmentation, segment_batch

if TYPE_CHECKING:
    import torch

    from pcl_viewer.chromap import ChroMap
    from pcl_viewer.domain import DomainCheck, DomainResult
    from pcl_viewer.models.counterfactual import Abduction, CounterfactualModel
    from pcl_viewer.models.unet import DenseUNet

__all__ = ["DEFAULT_CF_BUNDLE", "DEFAULT_SEG_BUNDLE", "FACTUAL", "MAX_STRENGTH", "STAGES",
           "BundleInfo", "Cancelled", "ConsistencyRow", "DomainReady", "ParentsReady", "Pipeline",
           "PipelineResult", "QualityReady", "Segmentation", "Step", "TableReady", "View",
           "ViewQuality", "ViewReady", "consistency_rows", "resolve_interventions", "rows_to_csv"]

DEFAULT_CF_BUNDLE = "cf-cpu"
DEFAULT_SEG_BUNDLE = "seg-cpu"
STAGES: tuple[str, ...] = ("preprocess", "parents", "domain", "abduct", "decode", "quality",
                           "segment", "chromap", "consistency")
MAX_STRENGTH = 1.5
FACTUAL = "factual"
_ABDUCTION_CACHE = 4


class Cancelled(Exception):
    """The caller's ``cancel()`` returned True (polled between stages and between the
    views, scans and overlays within a stage)."""


@dataclass(frozen=True)
class BundleInfo:
    name: str
    fingerprint: str
    path: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "fingerprint": self.fingerprint, "path": self.path}


@dataclass(frozen=True)
class View:
    """One view of a scan: the factual image or a counterfactual, at native size.

    Immutable: a later stage makes a new View (``dataclasses.replace``), so a view
    already handed to another thread never changes under it.

    Attributes:
        image: ``(H, W)`` float32 in [0, 1].
        residual: ``(S, S)`` float32 ``mu_cf - mu`` at strength 1 (None for the factual view).
        labels: ``(H, W)`` uint8 (0 background, 1 right lung, 2 left lung) or None.
        overlay: ``(H, W, 3)`` uint8 CHRO-map blended with the image, or None.
        quality: counterfactual quality (:class:`ViewQuality`) or None (factual view, or
            not measured).
    """

    key: str
    do: dict[str, str]
    strength: float
    parents: Parents | None
    image: np.ndarray
    residual: np.ndarray | None = None
    labels: np.ndarray | None = None
    overlay: np.ndarray | None = None
    quality: ViewQuality | None = None

    @property
    def name(self) -> str:
        if not self.do:
            return FACTUAL
        return intervention_name(self.do, self.strength)

    @property
    def extrapolated(self) -> bool:
        """True beyond the model's counterfactual (strength > 1); below 1 it is attenuated."""
        return bool(self.do) and self.strength > 1.0 + 1e-9


@dataclass(frozen=True)
class ViewQuality:
    """How far one counterfactual can be trusted, measured on this scan at model size.

    Attributes:
        recon_mae: mean |x - mu| of the abduction (the HVAE's reconstruction of the scan),
            intensity units [0, 1]; shared by every view of a scan.
        reversibility_mae: mean |x - x_back|, where x_back is the counterfactual's own
            counterfactual back to the scan's parents (0 = perfectly reversible).
        readback: the classifiers' probability that each intervened parent has its
            target value in the counterfactual (1 = the intervention took effect).
        targets: the bundle's targets (``reversibility_mae``, ``effectiveness``), or {}.
        misses: the targets this view misses here or on the bundle's held-out
            evaluation (e.g. ``"truth_effusion"``); empty when none are known to be missed.
        caveat: one line to show beside the view while it misses its targets, or None.
    """

    recon_mae: float
    reversibility_mae: float
    readback: dict[str, float]
    targets: dict[str, float]
    misses: tuple[str, ...]
    caveat: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"recon_mae": self.recon_mae, "reversibility_mae": self.reversibility_mae,
                "readback": dict(self.readback), "targets": dict(self.targets),
                "misses": list(self.misses), "caveat": self.caveat}


class ConsistencyRow(NamedTuple):
    """A counterfactual's segmentation against the factual one. Area changes are fractions."""

    view: str
    intervention: str
    dice: float
    dice_right: float
    dice_left: float
    area_right_change: float
    area_left_change: float


@dataclass
class PipelineResult:
    """Everything the pipeline made for one scan (see docs/CONTRACTS.md, "Pipeline")."""

    scan: Scan
    geometry: Geometry
    model_image: np.ndarray
    parents: Parents | None
    probabilities: dict[str, float] | None
    parents_source: str
    views: dict[str, View]
    bundles: dict[str, BundleInfo]
    consistency: list[ConsistencyRow] = field(default_factory=list)
    chromap: ChroMap | None = None
    reducer: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    cpu_timings: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    domain: DomainResult | None = None  # None when not checked

    def snapshot(self) -> PipelineResult:
        """A copy whose containers (views, rows, timings, errors) are its own: what the
        result is now, for another thread, while this one is still being filled."""
        return replace(self, views=dict(self.views), consistency=list(self.consistency),
                       timings=dict(self.timings), cpu_timings=dict(self.cpu_timings),
                       errors=list(self.errors))

    @property
    def domain_score(self) -> float | None:
        """Held-out quantile of the scan's domain statistic, 0..1 (1 = typical), or None
        when the check did not run or is uncalibrated for the loaded models."""
        return None if self.domain is None else self.domain.score

    @property
    def out_of_domain(self) -> bool | None:
        """True when the domain check flags the scan; None when it is uncalibrated."""
        return None if self.domain is None else self.domain.out_of_domain

    @property
    def embedding(self) -> np.ndarray | None:
        return None if self.chromap is None else self.chromap.embedding

    @property
    def embedding_labels(self) -> np.ndarray | None:
        """``(N,)`` view index of every embedding point (view-major, like the embedding)."""
        if self.chromap is None:
            return None
        n = len(self.chromap.embedding) // self.chromap.n_views
        return np.repeat(np.arange(self.chromap.n_views), n)

    def metadata(self, key: str = FACTUAL) -> dict[str, Any]:
        """JSON-able provenance of one view, for layer metadata and exports."""
        view = self.views[key]
        return {
            "pcl_viewer": True,
            "scan": self.scan.name,
            "scan_path": self.scan.path,
            "view": key,
            "intervention": view.name,
            "do": dict(view.do),
            "strength": float(view.strength),
            "extrapolated": view.extrapolated,
            "parents": self.parents.to_dict() if self.parents else None,
            "parents_source": self.parents_source,
            "view_parents": view.parents.to_dict() if view.parents else None,
            "probabilities": self.probabilities,
            "bundles": {k: b.to_dict() for k, b in self.bundles.items()},
            "reducer": self.reducer,
            "domain_score": self.domain_score,
            "out_of_domain": self.out_of_domain,
            "domain": self.domain.to_dict() if self.domain is not None else None,
            "quality": view.quality.to_dict() if view.quality is not None else None,
        }


# ------------------------------------------------------------- the pipeline --


class Pipeline:
    """Counterfactual model + segmentation U-Net on one device, with an abduction cache.

    The only inference path: the viewer, ``pcl review``, ``pcl cf``, ``pcl segment`` and
    ``pcl chromap`` all call it. :meth:`run` (one scan, a generator of
    :mod:`pcl_viewer.events`) and :meth:`run_batch` (many scans, batched) are made of the
    same stage methods; :meth:`counterfactual` and :meth:`segment` are single stages.
    """

    def __init__(self, cf: CounterfactualModel | None = None, seg: DenseUNet | None = None,
                 device: str = "cpu", bundles: dict[str, BundleInfo] | None = None) -> None:
        self.cf = cf
        self.seg = seg
        self.device = device
        self.bundles = dict(bundles or {})
        self.load_errors: list[str] = []
        self._abductions: OrderedDict[tuple[str, tuple[float, ...]], Abduction] = OrderedDict()
        self._qualities: OrderedDict[tuple[Any, ...], ViewQuality] = OrderedDict()
        self.domain_path: str | Path | None = None  # None: resources/models/domain.json
        self._domain: DomainCheck | None = None
        # the CF bundle's held-out evaluation (card "metrics.eval_cf"): targets and misses
        self.cf_evaluation: dict[str, Any] = {}

    @classmethod
    def from_bundles(cls, cf_bundle: str | Path | None = DEFAULT_CF_BUNDLE,
                     seg_bundle: str | Path | None = DEFAULT_SEG_BUNDLE,
                     device: str = "auto", strict: bool = True) -> Pipeline:
        """Load and verify both bundles (either may be None: that part is skipped).

        ``strict=False``: a bundle that cannot be loaded is skipped and its readable
        error kept in ``load_errors`` (the viewer still opens, with a notice).
        """
        from pcl_viewer.device import configure_threads, resolve_device

        device = str(resolve_device(device))  # "cpu", "cuda", "cuda:1", "mps"
        configure_threads()
        pipe = cls(None, None, device)
        for part, bundle in (("cf", cf_bundle), ("seg", seg_bundle)):
            if bundle is None:
                continue
            try:
                pipe._load(part, bundle)
            except Exception as exc:  # BundleError, ImportError of a missing module, ...
                if strict:
                    raise
                pipe.load_errors.append(f"{part} bundle {str(bundle)!r}: {exc}")
        return pipe

    def _load(self, part: str, bundle: str | Path) -> None:
        from pcl_viewer.device import prepare_for_inference
        from pcl_viewer.models.bundle import ModelBundle, find_bundle

        path = find_bundle(bundle)
        info = ModelBundle.load(path, kind="counterfactual" if part == "cf" else "segmentation")
        if part == "cf":
            from pcl_viewer.models.counterfactual import CounterfactualModel

            self.cf = CounterfactualModel.from_bundle(info, self.device)
            self.cf_evaluation = dict((info.card.get("metrics") or {}).get("eval_cf") or {})
            self._domain = None
        else:
            net = prepare_for_inference(info.build("unet", device=self.device), self.device)
            self.seg = cast("DenseUNet", net)
        self.bundles[part] = BundleInfo(info.name, info.fingerprint, str(path))

    @property
    def cf_size(self) -> int:
        return int(self.cf.image_size) if self.cf is not None else self.seg_size

    @property
    def seg_size(self) -> int:
        return int(self.seg.cfg.image_size) if self.seg is not None else 128

    def _cf_model(self) -> CounterfactualModel:
        if self.cf is None:
            raise RuntimeError("no counterfactual model loaded; cannot decode interventions")
        return self.cf

    # -------------------------------------------------------------- run ---

    def run(self, scan: Scan, parents: Parents | dict[str, str] | None = None,
            interventions: dict[str, dict[str, str]] | Iterable[str] | None = None,
            strength: float = 1.0,
            segment: bool = True, chromap: bool = True, reducer: str = "pca",
            cancel: Callable[[], bool] | None = None) -> Generator[Step, None, PipelineResult]:
        """Generator over the stages of one scan; returns the :class:`PipelineResult`.

        ``parents``: a full :class:`Parents` overrides the classifiers; a dict overrides
        only the parents it names. Yields :mod:`pcl_viewer.events` (never an object it
        changes later).
        """
        check = _checker(cancel)
        clock = _Clock()
        _check_strength(strength)

        yield Step("preprocess", 0, 1)
        x, geometries = self._prepare([scan])
        clock.lap("preprocess")
        yield Step("preprocess", 1, 1)
        check()

        if self.cf is not None:
            yield Step("parents", 0, 1)
        pa, probs, sources = self._parents(x, [parents])
        if self.cf is not None:
            clock.lap("parents")
        result = self._new_result(scan, geometries[0], x[0], pa[0], probs[0], sources[0], reducer)
        yield ParentsReady("parents", 1, 1, result.snapshot())
        if self.cf is not None:
            check()

        if self.cf is not None and result.parents is not None:
            yield Step("domain", 0, 1)
            result.domain = self._domain_stage(x, [result.parents], probs, cancel)[0]
            clock.lap("domain")
            yield DomainReady("domain", 1, 1, result.domain)
            check()
            todo = resolve_interventions(interventions, result.parents)
            yield Step("abduct", 0, 1)
            abduction = self._abduction(result.model_image, result.parents)
            clock.lap("abduct")
            yield Step("abduct", 1, 1)
            check()
            for i, (key, do) in enumerate(todo.items()):
                view = self._decode_view(result, abduction, key, do, strength)
                result.views[key] = view
                yield ViewReady("decode", i + 1, len(todo), view, "image")
                check()
            clock.lap("decode")
            if todo:
                yield Step("quality", 0, 1)
                self._measure_quality(result, abduction, list(todo), check)
                clock.lap("quality")
                yield QualityReady("quality", 1, 1, tuple(result.views[k] for k in todo))
                check()

        if segment and self.seg is not None:
            yield from self._segment_stage(result, chromap, reducer, clock, check)
        result.timings, result.cpu_timings = clock.laps, clock.cpu
        return result

    def warm_up(self, size: int = 256) -> None:
        """One full run on a small synthetic scan, then forget it: the first real run then
        skips first-call costs (kernel set-up of every layer shape, lazy imports)."""
        rng = np.random.default_rng(0)
        img = (0.5 + 0.1 * rng.standard_normal((size, size))).clip(0, 1).astype(np.float32)
        self.run_sync(Scan(img, name="warm-up"))
        self._abductions.clear()
        self._qualities.clear()

    def run_sync(self, scan: Scan, **kwargs: Any) -> PipelineResult:
        """Run the generator to its end and return its result."""
        gen = self.run(scan, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as stop:
                result: PipelineResult = stop.value
                return result

    def decode(self, result: PipelineResult, key: str, do: dict[str, str],
               strength: float = 1.0) -> View:
        """Add or replace one counterfactual view from the cached abduction.

        A view with the same ``do`` is only rescaled (``strength`` x its residual):
        the model does not run at all.
        """
        _check_strength(strength)
        if self.cf is None or result.parents is None:
            raise RuntimeError("no counterfactual model loaded; cannot decode interventions")
        old = result.views.get(key)
        if old is not None and old.do == do and old.residual is not None:
            view = View(key, dict(do), strength, old.parents,
                        self._native_view(result, old.residual, strength), old.residual,
                        quality=old.quality)  # measured on the counterfactual at strength 1
        else:
            view = self._decode_view(result, self._abduction(result.model_image, result.parents),
                                     key, do, strength)
        result.views[key] = view
        return view

    def refresh(self, result: PipelineResult, chromap: bool = True,
                reducer: str | None = None) -> PipelineResult:
        """Re-segment every view and refit the CHRO-map and the consistency table."""
        reducer = reducer or result.reducer or "pca"
        result.reducer = reducer
        clock = _Clock()
        for _ in self._segment_stage(result, chromap, reducer, clock, lambda: None):
            pass
        result.timings.update(clock.laps)
        return result

    def counterfactual(self, scan: Scan, do: dict[str, str],
                       parents: Parents | dict[str, str] | None = None,
                       strength: float = 1.0) -> PipelineResult:
        """One counterfactual of ``scan`` at its native size (``pcl cf``): the result has the
        factual view and the view ``"counterfactual"``.

        Parents as in :meth:`run` (the same classifiers and threshold). No domain check,
        quality, segmentation; ``strength`` is not limited (extrapolation is the caller's).
        """
        x, geometries = self._prepare([scan])
        pa, probs, sources = self._parents(x, [parents])
        result = self._new_result(scan, geometries[0], x[0], pa[0], probs[0], sources[0], "pca")
        if result.parents is None:
            raise RuntimeError("no counterfactual model loaded; cannot decode interventions")
        abduction = self._abduction(result.model_image, result.parents)
        result.views["counterfactual"] = self._decode_view(result, abduction, "counterfactual",
                                                           do, strength)
        return result

    def segment(self, images: Sequence[np.ndarray]) -> Segmentation:
        """Segment ``(H, W)`` float32 [0, 1] images of any size in one batch: labels at
        native size, model-size classes and decoder features (:mod:`pcl_viewer.segmentation`)."""
        if self.seg is None:
            raise RuntimeError("no segmentation model loaded")
        return segment_batch(self.seg, images, self.seg_size, self.device)

    # ------------------------------------------------------------- batch ---

    def run_batch(self, scans: list[Scan], parents: Sequence[Parents | dict[str, str] | None]
                  | None = None,
                  interventions: Iterable[str] | None = ("scanner", "effusion"),
                  segment: bool = True, chromap: bool = False,
                  batch_size: int = 16) -> list[PipelineResult]:
        """Like :meth:`run` for many scans, with model work batched across scans.

        ``interventions`` names keys of :func:`standard_interventions` (per-scan flips);
        ``parents`` per scan as in :meth:`run` (a dict overrides only what it names).
        """
        results: list[PipelineResult] = []
        for start in range(0, len(scans), batch_size):
            chunk = scans[start : start + batch_size]
            given = list(parents or [None] * len(scans))[start : start + batch_size]
            results.extend(self._run_chunk(chunk, given, tuple(interventions or ()),
                                           segment, chromap))
        return results

    def _run_chunk(self, scans: list[Scan], given: list[Parents | dict[str, str] | None],
                   keys: tuple[str, ...], segment: bool, chromap: bool) -> list[PipelineResult]:
        clock = _Clock()
        x, geometries = self._prepare(scans)
        clock.lap("preprocess")
        pa, probs, sources = self._parents(x, given)
        clock.lap("parents")
        results = [self._new_result(scan, geo, img, p, prob, source, "pca")
                   for scan, geo, img, p, prob, source
                   in zip(scans, geometries, x, pa, probs, sources)]
        known = [p for p in pa if p is not None]
        if self.cf is not None and len(known) == len(pa):
            for r, d in zip(results, self._domain_stage(x, known, probs)):
                r.domain = d
            clock.lap("domain")
        if self.cf is not None and keys and len(known) == len(pa):
            abduction = self._abduct_batch(x, known)
            clock.lap("abduct")
            for key in keys:
                dos = [resolve_interventions([key], p)[key] for p in known]
                res = self._residuals(abduction, dos, known, x.shape[-1])
                for r, do, resid in zip(results, dos, res):
                    r.views[key] = self._make_view(r, key, do, 1.0, resid)
            clock.lap("decode")
        if segment and self.seg is not None:
            self._segment_results(results, chromap, "pca")
            clock.lap("segment")
            for r in results:
                r.consistency = consistency_rows(r.views)
            clock.lap("consistency")
        share = {k: v / max(len(scans), 1) for k, v in clock.laps.items()}
        for r in results:
            r.timings = dict(share)
        return results

    # ------------------------------------------------------------ stages ---
    # run(), run_batch() and counterfactual() are made of these.

    def _prepare(self, scans: Sequence[Scan]) -> tuple[np.ndarray, list[Geometry]]:
        """``(B, S, S)`` model images of ``scans`` and their geometries."""
        prepared = [to_model(s.image, self.cf_size) for s in scans]
        return np.stack([p[0] for p in prepared]), [p[1] for p in prepared]

    def _parents(self, x: np.ndarray, given: Sequence[Parents | dict[str, str] | None]
                 ) -> tuple[list[Parents | None], list[dict[str, float] | None], list[str]]:
        """``(parents, probabilities, source)`` per scan.

        A full :class:`Parents` is taken as given; otherwise the classifiers' parents
        (probability >= 0.5) with a dict's named parents overriding. Without a CF model
        only a full :class:`Parents` is kept. The classifiers run even for given parents
        (their probabilities are shown, and the domain check uses them).
        """
        sources = ["user" if g else "inferred" for g in given]
        if self.cf is None:
            return [g if isinstance(g, Parents) else None for g in given], [None] * len(given), \
                sources
        probs: list[dict[str, float] | None]
        try:
            probs = list(self.infer_parents(x))
        except ValueError as exc:  # a bundle without classifiers: parents must be given
            if not all(isinstance(g, Parents) for g in given):
                raise ValueError(f"{exc}; set scanner, sex and effusion by hand") from exc
            probs = [None] * len(given)
        parents: list[Parents | None] = [
            g if isinstance(g, Parents) else _parents_from_probs(p or {}).intervene(dict(g or {}))
            for g, p in zip(given, probs)]
        return parents, probs, sources

    def _new_result(self, scan: Scan, geometry: Geometry, model_image: np.ndarray,
                    parents: Parents | None, probabilities: dict[str, float] | None,
                    source: str, reducer: str) -> PipelineResult:
        views = {FACTUAL: View(FACTUAL, {}, 1.0, parents, scan.image)}
        return PipelineResult(scan, geometry, model_image, parents, probabilities, source,
                              views, dict(self.bundles), reducer=reducer)

    def _domain_stage(self, x: np.ndarray, parents: list[Parents],
                      probabilities: list[dict[str, float] | None],
                      cancel: Callable[[], bool] | None = None) -> list[DomainResult]:
        return self.check_domain(list(x), parents, probabilities, cancel)

    @property
    def domain(self) -> DomainCheck:
        """The :class:`pcl_viewer.domain.DomainCheck` of the loaded CF bundle (cached)."""
        if self._domain is None:
            from pcl_viewer.domain import DomainCheck

            self._domain = DomainCheck.for_pipeline(self, self.domain_path)
        return self._domain

    def check_domain(self, model_images: list[np.ndarray], parents: list[Parents],
                     probabilities: list[dict[str, float] | None] | None = None,
                     cancel: Callable[[], bool] | None = None) -> list[DomainResult]:
        """Domain check of ``(S, S)`` model images -> one ``DomainResult`` each.

        The ELBO is taken under the classifiers' parents when they ran (a user's override
        must not make a scan look typical), else under ``parents``.
        """
        probabilities = probabilities or [None] * len(model_images)
        pa = [_parents_from_probs(p) if p else q for p, q in zip(probabilities, parents)]
        return self.domain.score(np.stack(model_images), pa, probabilities, cancel=cancel)

    def _measure_quality(self, result: PipelineResult, abduction: Abduction, keys: list[str],
                         check: Callable[[], None]) -> None:
        """Set :class:`ViewQuality` on the counterfactual views ``keys`` (model size).

        Reversibility: each counterfactual is abducted under its own parents and sent back
        to the scan's parents (one batched abduction and decode for all views).
        Read-back: the classifiers on the counterfactuals (one batch).
        """
        import torch

        cf = self._cf_model()
        parents = result.parents
        assert parents is not None
        x = result.model_image
        size = x.shape[-1]
        base = self._abduction_key(x, parents)
        cached = {k: self._qualities.get((*base, _do_key(result.views[k].do))) for k in keys}
        if all(q is not None for q in cached.values()):
            for k, q in cached.items():
                result.views[k] = replace(result.views[k], quality=q)
            return
        mu = getattr(abduction, "mu", None)
        recon = (float("nan") if mu is None else
                 float(np.abs(x - np.asarray(_numpy(mu), np.float32).reshape(size, size)).mean()))
        views = [result.views[k] for k in keys]
        cfs = np.stack([np.clip(x + v.residual, 0.0, 1.0) for v in views]).astype(np.float32)
        check()
        cf_parents = [v.parents for v in views if v.parents is not None]
        back = self._abduct_batch(cfs, cf_parents)
        check()
        target = torch.as_tensor(np.stack([parents.to_vector()] * len(views)),
                                 device=self.device)
        with torch.inference_mode():
            resid = cf.residual(back, target, strength=1.0)
        rev = np.abs(np.clip(cfs + np.asarray(_numpy(resid), np.float32).reshape(
            len(views), size, size), 0.0, 1.0) - x[None]).mean(axis=(1, 2))
        check()
        probs: list[dict[str, float]]
        try:
            probs = self.infer_parents(cfs)
        except ValueError:  # a bundle without classifiers
            probs = [{} for _ in views]
        targets = dict(self.cf_evaluation.get("targets") or {})
        for view, r, p in zip(views, rev, probs):
            readback = {}
            for name in view.do:
                if name in p:
                    idx = PARENT_VALUES[name].index(getattr(view.parents, name))
                    readback[name] = float(p[name] if idx == 1 else 1.0 - p[name])
            quality = _quality(view, recon, float(r), readback, targets,
                               self.cf_evaluation.get("meets_targets") or {})
            result.views[view.key] = replace(view, quality=quality)
            self._qualities[(*base, _do_key(view.do))] = quality
        while len(self._qualities) > 8 * _ABDUCTION_CACHE:
            self._qualities.popitem(last=False)

    def infer_parents(self, x: np.ndarray) -> list[dict[str, float]]:
        """``(B, S, S)`` model images -> per scan ``{parent: P(value index 1)}``."""
        import torch

        cf = self._cf_model()
        with torch.inference_mode():
            out = cf.infer_parents(self._tensor(x))
        probs = {k: np.asarray(_numpy(v), dtype=np.float64).reshape(-1) for k, v in out.items()}
        return [{k: float(probs[k][b]) for k in PARENT_NAMES if k in probs} for b in range(len(x))]

    @staticmethod
    def _abduction_key(model_image: np.ndarray, parents: Parents
                       ) -> tuple[str, tuple[float, ...]]:
        return (hashlib.blake2b(model_image.tobytes(), digest_size=16).hexdigest(),
                tuple(parents.to_vector().tolist()))

    def _abduction(self, model_image: np.ndarray, parents: Parents) -> Abduction:
        key = self._abduction_key(model_image, parents)
        if key in self._abductions:
            self._abductions.move_to_end(key)
            return self._abductions[key]
        abduction = self._abduct_batch(model_image[None], [parents])
        self._abductions[key] = abduction
        while len(self._abductions) > _ABDUCTION_CACHE:
            self._abductions.popitem(last=False)
        return abduction

    def _abduct_batch(self, x: np.ndarray, parents: list[Parents]) -> Abduction:
        import torch

        cf = self._cf_model()
        pa = np.stack([p.to_vector() for p in parents])
        with torch.inference_mode():
            return cf.abduct(self._tensor(x), pa)

    def _residuals(self, abduction: Abduction, dos: list[dict[str, str]],
                   parents: list[Parents], size: int) -> np.ndarray:
        """``(B, S, S)`` residuals at strength 1, one intervention per scan.

        One ``do`` for the whole batch goes as a dict; different ones as the target
        parents ``(B, 3)`` (the CF model accepts both).
        """
        import torch

        cf = self._cf_model()
        do: dict[str, str] | torch.Tensor
        if len({tuple(sorted(d.items())) for d in dos}) == 1:
            do = dos[0]
        else:
            do = torch.as_tensor(np.stack([p.intervene(d).to_vector()
                                           for p, d in zip(parents, dos)]), device=self.device)
        with torch.inference_mode():
            out = cf.residual(abduction, do, strength=1.0)
        return np.asarray(_numpy(out), dtype=np.float32).reshape(len(dos), size, size)

    def _decode_view(self, result: PipelineResult, abduction: Abduction, key: str,
                     do: dict[str, str], strength: float) -> View:
        parents = result.parents
        assert parents is not None
        resid = self._residuals(abduction, [do], [parents], result.model_image.shape[-1])[0]
        return self._make_view(result, key, do, strength, resid)

    def _make_view(self, result: PipelineResult, key: str, do: dict[str, str],
                   strength: float, residual: np.ndarray) -> View:
        parents = result.parents
        assert parents is not None
        return View(key, dict(do), strength, parents.intervene(do),
                    self._native_view(result, residual, strength), residual)

    @staticmethod
    def _native_view(result: PipelineResult, residual: np.ndarray, strength: float) -> np.ndarray:
        """High-resolution counterfactual: the native scan plus the upsampled residual."""
        up = result.geometry.to_native(residual.astype(np.float32))
        out: np.ndarray = result.scan.image + np.float32(strength) * up
        return np.clip(out, 0.0, 1.0, out=out)

    def _segment_stage(self, result: PipelineResult, chromap: bool, reducer: str, clock: _Clock,
                       check: Callable[[], None]) -> Generator[Step, None, None]:
        keys = list(result.views)
        features = []
        for i, key in enumerate(keys):
            features += self._segment_results([result], False, reducer, only=[key])
            yield ViewReady("segment", i + 1, len(keys), result.views[key], "labels")
            check()
        clock.lap("segment")
        if chromap:
            self._fit_chromap(result, np.stack(features), reducer, check)
            clock.lap("chromap")
            for i, key in enumerate(keys):
                yield ViewReady("chromap", i + 1, len(keys), result.views[key], "chromap")
            check()
        result.consistency = consistency_rows(result.views)
        clock.lap("consistency")
        yield TableReady("consistency", 1, 1, tuple(result.consistency))

    def _segment_results(self, results: list[PipelineResult], chromap: bool, reducer: str,
                         only: list[str] | None = None) -> list[np.ndarray]:
        """Segment views (one batch); set their labels at native size; return their
        ``(C, s, s)`` features. ``only``: these view keys (default: every view)."""
        items = [(r, k) for r in results for k in (only or list(r.views))]
        seg = self.segment([r.views[k].image for r, k in items])
        for (r, k), labels in zip(items, seg.labels):
            r.views[k] = replace(r.views[k], labels=labels)
        if chromap:
            for r in results:
                idx = [i for i, (rr, _) in enumerate(items) if rr is r]
                self._fit_chromap(r, seg.features[idx], reducer)
        return list(seg.features)

    def _fit_chromap(self, result: PipelineResult, feats: np.ndarray, reducer: str,
                     check: Callable[[], None] | None = None) -> None:
        from pcl_viewer.chromap import ChroMap

        geo = to_model(result.scan.image, self.seg_size)[1]
        cmap = ChroMap.fit(feats, reducer=reducer, geometry=geo)
        overlays = []
        for v, view in enumerate(result.views.values()):
            if check is not None:
                check()
            overlays.append(cmap.overlay(v, view.image))
        for key, overlay in zip(list(result.views), overlays):  # all or none
            result.views[key] = replace(result.views[key], overlay=overlay)
        result.chromap, result.reducer = cmap, reducer

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        import torch

        return torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32)[:, None],
                               device=self.device)


def resolve_interventions(interventions: dict[str, dict[str, str]] | Iterable[str] | None,
                          parents: Parents) -> dict[str, dict[str, str]]:
    """``None`` -> the method's three views; names -> flips of ``parents``; a dict passes through.

    Names: ``scanner``, ``effusion``, ``both`` (:func:`standard_interventions`) and ``sex``
    (exploration only: the method does not intervene on sex).
    """
    from pcl_viewer.parents import standard_interventions

    if isinstance(interventions, dict):
        return {k: dict(v) for k, v in interventions.items()}
    flips = standard_interventions(parents) | {"sex": {"sex": parents.flipped("sex")}}
    keys = VIEW_KINDS if interventions is None else tuple(interventions)
    unknown = [k for k in keys if k not in flips]
    if unknown:
        raise ValueError(f"unknown interventions {unknown}; choose from {', '.join(flips)}")
    return {k: flips[k] for k in keys}


# --------------------------------------------------------------- consistency --


def consistency_rows(views: dict[str, View]) -> list[ConsistencyRow]:
    """Dice and lung-area change of every counterfactual's labels against the factual labels."""
    factual = views.get(FACTUAL)
    if factual is None or factual.labels is None:
        return []
    rows = []
    for key, view in views.items():
        if key == FACTUAL or view.labels is None:
            continue
        counts = np.bincount((factual.labels.astype(np.int64) * 3 + view.labels).ravel(),
                             minlength=9).reshape(3, 3)
        dice = [_dice(counts, c) for c in (1, 2)]
        area = [_area_change(counts, c) for c in (1, 2)]
        rows.append(ConsistencyRow(key, view.name, float(np.mean(dice)), dice[0], dice[1], *area))
    return rows


def rows_to_csv(rows: list[ConsistencyRow], path: str | Path, scan: str | None = None) -> Path:
    """Write consistency rows (one per counterfactual) as CSV; returns the path."""
    import csv

    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow((["scan"] if scan is not None else []) + list(ConsistencyRow._fields))
        for row in rows:
            w.writerow(([scan] if scan is not None else []) +
                       [f"{v:.6f}" if isinstance(v, float) else v for v in row])
    return path


def _dice(counts: np.ndarray, c: int) -> float:
    inter, a, b = counts[c, c], counts[c].sum(), counts[:, c].sum()
    return 1.0 if a + b == 0 else float(2.0 * inter / (a + b))


def _area_change(counts: np.ndarray, c: int) -> float:
    a, b = counts[c].sum(), counts[:, c].sum()
    return float("nan") if a == 0 else float((b - a) / a)


# ------------------------------------------------------------------ helpers --


def _quality(view: View, recon: float, reversibility: float, readback: dict[str, float],
             targets: dict[str, float], meets: dict[str, bool]) -> ViewQuality:
    """A view's quality against the bundle's targets and its held-out evaluation."""
    misses = []
    rev_target = targets.get("reversibility_mae")
    if rev_target is not None and reversibility > rev_target:
        misses.append("reversibility")
    eff_target = targets.get("effectiveness")
    if eff_target is not None and any(p < eff_target for p in readback.values()):
        misses.append("effectiveness")
    # held-out misses of this intervention, e.g. "truth_effusion" for do(effusion)
    kind = view.key if view.key in VIEW_KINDS else None
    held_out = sorted(k for k, ok in meets.items()
                      if ok is False and kind is not None and k.endswith(f"_{kind}"))
    misses += [f"held-out {k}" for k in held_out]
    caveat = None
    if "effusion" in view.do and misses:
        caveat = ("do(effusion) is a stress test, not a validated counterfactual: it misses "
                  f"its targets ({', '.join(misses)}); read lung changes under it with care.")
    elif misses:
        caveat = f"misses its targets ({', '.join(misses)})"
    return ViewQuality(recon, reversibility, readback,
                       {k: float(v) for k, v in targets.items()
                        if k in ("reversibility_mae", "effectiveness")},
                       tuple(misses), caveat)


def _do_key(do: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(do.items()))


def _parents_from_probs(probs: dict[str, float]) -> Parents:
    return Parents(**{n: PARENT_VALUES[n][int(probs.get(n, 0.0) >= 0.5)] for n in PARENT_NAMES})


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH}], got {strength}")


def _checker(cancel: Callable[[], bool] | None) -> Callable[[], None]:
    def check() -> None:
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user")

    return check


def _numpy(t: Any) -> np.ndarray:
    """A tensor (any device, any float type) or array-like as a NumPy array."""
    out: np.ndarray = t.detach().float().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
    return out


class _Clock:
    """Wall time per stage (seconds), accumulated across laps of the same stage; also the
    process CPU time (all threads), which on a shared machine says what the stage costs
    when it has the cores to itself."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._t, self._c = time.perf_counter(), time.process_time()

    def lap(self, stage: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        self.laps[stage] = self.laps.get(stage, 0.0) + now - self._t
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu - self._c
        self._t, self._c = now, cpu
