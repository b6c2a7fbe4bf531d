"""AI-generated silver masks for a phantom dataset, with a quality score (as CheXmask).

A U-Net is trained on gold *normal* images of one scanner (200 by default), with the
shipped segmenter's recipe (:func:`pcl_viewer.train.finetune.finetune`: MONAI's strong
intensity and geometric augmentation, Dice + cross-entropy), then labels the whole
pool. Like CheXmask's segmenters, it never saw an effusion or the other scanner, so its
masks are good on what it knows and worse elsewhere. The quality score needs no gold: it is
the mean Dice between the prediction and predictions on test-time augmented
copies (affine + intensity) mapped back, a proxy for the reverse
classification accuracy CheXmask reports in ``Dice RCA (Mean)``. All rows are
written with their score; loaders keep those above the threshold (0.7).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import cv2
import numpy as np

from pcl_viewer.evaluate.metrics import dice_scores  # cheap: torch/MONAI load when called

WORK_SIZE = 128  # the segmenter runs at this size; masks are resized to the dataset size


def _lung_dice(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean over the two lungs of the Dice of 0/1/2 label maps ``(N, H, W)`` or ``(H, W)``
    -> ``(N,)`` float64 (:func:`~pcl_viewer.evaluate.metrics.dice_scores` in float64; a
    lung absent from both maps scores 1, absent from one scores 0)."""
    return dice_scores(a, b, both_empty=1.0, dtype="float64").mean(1)


def _affines(n: int, rng: np.random.Generator, size: int, strength: float = 1.0) -> np.ndarray:
    """``(n, 2, 3)`` random similarity transforms (pixels)."""
    out = np.zeros((n, 2, 3), np.float32)
    for i in range(n):
        ang = rng.uniform(-8, 8) * strength
        sc = 1.0 + rng.uniform(-0.08, 0.08) * strength
        m = cv2.getRotationMatrix2D((size / 2, size / 2), ang, sc)
        m[:, 2] += rng.uniform(-0.05, 0.05, 2) * size * strength
        out[i] = m
    return out


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    g = np.exp(rng.normal(0, 0.25))
    c = rng.uniform(0.8, 1.2)
    b = rng.normal(0, 0.05)
    out = np.clip(img, 0, 1) ** g
    out = (out - 0.5) * c + 0.5 + b + rng.normal(0, 0.01, img.shape)
    return np.clip(out, 0, 1).astype(np.float32)


SILVER_RECIPE = "finetune-monai-v1"  # names the recipe in silver_report.json and data-set markers


def train_segmenter(imgs: np.ndarray, masks: np.ndarray, steps: int, seed: int, echo=print):
    """The silver U-Net: ``imgs (N,S,S) float32`` / ``masks (N,S,S) uint8`` -> a network in
    eval mode on the CPU mapping ``(B,1,S,S)`` to logits ``(B,3,S,S)``.

    Exactly ``steps`` optimiser steps of the shipped segmenter's fine-tuning (cpu U-Net,
    MONAI augmentation, Dice + cross-entropy, random init)."""
    from pcl_viewer.models.unet import UNetConfig
    from pcl_viewer.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(epochs=1, min_steps=steps, max_steps=steps, augmentation="monai",
                         loss="dicece", seed=seed)

    def progress(step: int, total: int) -> None:
        if step % 100 == 0 or step == total:
            echo(f"  step {step}/{total}")

    net, _ = finetune(imgs[:, None].astype(np.float32), masks.astype(np.uint8),
                      UNetConfig.for_preset("cpu"), cfg, progress=progress, device="cpu")
    return net.eval()


def predict(net, imgs: np.ndarray, n_tta: int = 2, seed: int = 0,
            batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Labels ``(N,S,S) uint8`` and TTA-agreement quality ``(N,)`` float32."""
    import torch

    size = imgs.shape[-1]
    rng = np.random.default_rng(seed + 99)
    labels = np.zeros(imgs.shape, np.uint8)
    quality = np.zeros(len(imgs), np.float32)
    with torch.no_grad():
        for s in range(0, len(imgs), batch):
            x = imgs[s:s + batch]
            pred = net(torch.from_numpy(x)[:, None]).argmax(1).numpy().astype(np.uint8)
            labels[s:s + batch] = pred
            scores = np.zeros((len(x), n_tta), np.float32)
            for t in range(n_tta):
                mats = _affines(len(x), rng, size, strength=1.0)
                xa = np.stack([_jitter(cv2.warpAffine(x[i], m, (size, size),
                                                      borderMode=cv2.BORDER_REPLICATE), rng)
                               for i, m in enumerate(mats)])
                pa = net(torch.from_numpy(xa)[:, None]).argmax(1).numpy().astype(np.uint8)
                back = np.stack([cv2.warpAffine(pa[i], cv2.invertAffineTransform(m), (size, size),
                                                flags=cv2.INTER_NEAREST)
                                 for i, m in enumerate(mats)])
                scores[:, t] = _lung_dice(pred, back)
            quality[s:s + batch] = scores.mean(1)
    return labels, quality


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if a.shape[0] == size:
        return a
    flag = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(a, (size, size), interpolation=flag)


def make_silver(data: Path, n_train: int = 200, scanner: str = "philips", steps: int = 800,
                threshold: float = 0.7, seed: int = 0, echo=print) -> dict:
    """Train, label the pool, write ``silver_masks.csv`` and ``silver_report.json``.

    Runs with ``$PCL_SILVER_THREADS`` torch threads (1 by default: on the shared 2-core
    machine 2 threads spin-wait, measured); the caller's count is restored afterwards.
    """
    from pcl_viewer.device import limited_threads

    with limited_threads(max(1, int(os.environ.get("PCL_SILVER_THREADS", "1") or 1))):
        return _make_silver(Path(data), n_train, scanner, steps, threshold, seed, echo)


def _make_silver(data: Path, n_train: int, scanner: str, steps: int, threshold: float,
                 seed: int, echo) -> dict:
    from pcl_viewer.data import rle
    from pcl_viewer.data.dataset import load_dataset

    n_train = int(n_train)
    ds = load_dataset(data)
    rng = np.random.default_rng(seed)
    cand = [i for i, r in enumerate(ds.records)
            if r.style == scanner and not r.effusion and r.split == "train"]
    if len(cand) < 2:
        raise ValueError(f"need gold normal {scanner} training images; found {len(cand)}")
    train_idx = sorted(rng.choice(cand, size=min(n_train, len(cand)), replace=False).tolist())
    native = ds.image(0).shape[0]
    work = min(native, WORK_SIZE)
    imgs = np.stack([_resize(ds.image(i), work, False) for i in range(len(ds))])
    tr_m = np.stack([_resize(ds.gold_mask(i), work, True) for i in train_idx])
    echo(f"training on {len(train_idx)} gold normal {scanner} images, {steps} steps")
    t0 = time.perf_counter()
    net = train_segmenter(imgs[train_idx], tr_m, steps, seed, echo)
    t_train = time.perf_counter() - t0
    labels, quality = predict(net, imgs, seed=seed)
    rows, groups = [], {}
    train_set = set(train_idx)
    for i, rec in enumerate(ds.records):
        lab = labels[i]
        if native != work:
            lab = _resize(lab, native, True)
        r_rle, l_rle = rle.encode_lungs(lab)
        rows.append([rec.image_id, round(float(quality[i]), 4), r_rle, l_rle, native, native])
        if i in train_set:
            continue
        d = float(_lung_dice(lab, ds.gold_mask(i))[0])
        keys = ["overall", "effusion" if rec.effusion else "normal", f"scanner:{rec.style}"]
        if quality[i] > threshold:
            keys.append("kept (quality > threshold)")
        for k in keys:
            groups.setdefault(k, []).append(d)
    with open(data / "silver_masks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Dice RCA (Mean)", "Right Lung", "Left Lung", "Height", "Width"])
        w.writerows(rows)
    report = {
        "trained_on": {"scanner": scanner, "n": len(train_idx),
                       "image_ids": [ds.records[i].image_id for i in train_idx]},
        "recipe": SILVER_RECIPE, "steps": steps, "train_seconds": round(t_train, 1), "threshold": threshold,
        "n_pool": len(ds), "n_kept": int((quality > threshold).sum()),
        "quality_mean": float(quality.mean()),
        "dice": {k: {"mean": round(float(np.mean(v)), 4), "n": len(v)}
                 for k, v in sorted(groups.items())},
        "note": "silver-vs-gold Dice (mean of both lungs), excluding the training images",
    }
    (data / "silver_report.json").write_text(json.dumps(report, indent=1))
    return report
