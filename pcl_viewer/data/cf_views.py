"""Counterfactual views of a pool for pre-training: the model's or the phantom's true ones.

``load_views(ds, "model", bundle)`` -> ``(N, 3, 1, S, S)`` float32 in
:data:`~pcl_viewer.parents.VIEW_KINDS` order (scanner, effusion, both: flip of each
parent). Model views are computed once by :func:`precompute_views` (batched, no grad)
and cached under ``ds.cache_dir`` as a plain ``.npy`` keyed by the bundle fingerprint and the image ids.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pcl_viewer.atomic import atomic_save
from pcl_viewer.parents import PARENT_NAMES, VIEW_KINDS


def _cache_path(ds, fingerprint: str, size: int) -> Path:
    ids = "\n".join(r.image_id for r in ds.records)
    key = hashlib.sha1(f"{fingerprint}|{size}|{ids}".encode()).hexdigest()[:16]
    return Path(ds.cache_dir) / f"cf_views_{fingerprint}_{size}_{key}.npy"


def precompute_views(ds, model, batch_size: int = 32,
                     progress: Callable[[int, int, float], None] | None = None) -> np.ndarray:
    """Model counterfactual views ``(N, 3, 1, S, S)`` float32 of every image of ``ds``.

    Parents come from the dataset; where a parent is unknown (NaN) the classifiers infer it.
    ``progress(done, total, images_per_second)`` is called after every batch.
    """
    size = model.image_size
    arr = ds.arrays(size)
    x_all, pa_all = arr["image"], arr["parents"].copy()
    n = len(x_all)
    out = np.zeros((n, len(VIEW_KINDS), 1, size, size), np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, batch_size):
            x = torch.from_numpy(x_all[i:i + batch_size])
            pa = pa_all[i:i + batch_size]
            unknown = np.isnan(pa)
            if unknown.any():
                probs = model.infer_parents(x)
                guess = np.stack([probs[k].cpu().numpy() for k in PARENT_NAMES], 1)
                pa = np.where(unknown, (guess >= 0.5).astype(np.float32), pa)
            out[i:i + len(x)] = model.standard_views(x, pa).cpu().numpy()
            if progress is not None:
                done = min(n, i + batch_size)
                progress(done, n, done / max(time.perf_counter() - t0, 1e-9))
    return out


def write_views(ds, model, batch_size: int = 32, progress=None) -> tuple[Path, float]:
    """Compute and cache the model views; returns the cache path and images per second."""
    t0 = time.perf_counter()
    views = precompute_views(ds, model, batch_size, progress)
    rate = len(views) / max(time.perf_counter() - t0, 1e-9)
    fingerprint = model.bundle.fingerprint if model.bundle is not None else "unbundled"
    path = _cache_path(ds, fingerprint, model.image_size)
    atomic_save(path, lambda t: np.save(t, views, allow_pickle=False))
    return path, rate


def load_views(ds, views: str = "model", bundle=None, size: int | None = None) -> np.ndarray:
    """Counterfactual views ``(N, 3, 1, S, S)`` float32 in ``VIEW_KINDS`` order.

    Args:
        ds: a :class:`~pcl_viewer.data.dataset.CXRDataset`.
        views: ``"model"`` (the bundle's counterfactuals, cached) or ``"true"`` (the phantom's).
        bundle: bundle path, name or :class:`ModelBundle` (default: the shipped ``cf-cpu``).
        size: image size for ``"true"`` views (default: the bundle's input size, else 128).
    """
    if views == "true":
        arr = ds.arrays(size or 128)
        if "true_cf" not in arr:
            raise ValueError(f"{ds.root}: dataset has no true counterfactuals")
        return arr["true_cf"]
    if views != "model":
        raise ValueError(f"views must be 'model' or 'true', got {views!r}")
    from pcl_viewer.models.bundle import ModelBundle, find_bundle
    from pcl_viewer.models.counterfactual import CounterfactualModel

    if not isinstance(bundle, ModelBundle):
        bundle = ModelBundle.load(find_bundle(bundle or "cf-cpu"))
    img_size = int(bundle.card["input"]["size"])
    path = _cache_path(ds, bundle.fingerprint, img_size)
    if path.is_file():
        return np.load(path, allow_pickle=False)
    model = CounterfactualModel.from_bundle(bundle)
    return np.load(write_views(ds, model)[0], allow_pickle=False)
