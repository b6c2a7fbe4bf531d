"""AI-generated silver masks for a phantom dataset, with a quality score (as CheXmask).

A small MONAI U-Net is trained on at most 20 gold *normal* images of one
scanner, then labels the whole pool. The quality score needs no gold: it is
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


def _build_net():
    from monai.networks.nets import UNet

    return UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32, 64),
                strides=(2, 2, 2), num_res_units=1)


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


def _augment(imgs: np.ndarray, masks: np.ndarray, rng: np.random.Generator):
    size = imgs.shape[-1]
    mats = _affines(len(imgs), rng, size)
    xi = np.empty_like(imgs)
    xm = np.empty_like(masks)
    for i, m in enumerate(mats):
        xi[i] = _jitter(cv2.warpAffine(imgs[i], m, (size, size), flags=cv2.INTER_LINEAR,
                                       borderMode=cv2.BORDER_REPLICATE), rng)
        xm[i] = cv2.warpAffine(masks[i], m, (size, size), flags=cv2.INTER_NEAREST)
    return xi, xm


def train_segmenter(imgs: np.ndarray, masks: np.ndarray, steps: int, seed: int,
                    echo=print, budget_s: float | None = None, batch: int = 8):
    """Train the U-Net on ``imgs (N,S,S) float32`` / ``masks (N,S,S) uint8`` for ``steps``
    AdamW steps of ``batch`` augmented images (stops early at ``budget_s`` seconds)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = _build_net()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.15)
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        idx = rng.choice(len(imgs), size=min(batch, len(imgs)), replace=False)
        xi, xm = _augment(imgs[idx], masks[idx], rng)
        x = torch.from_numpy(xi)[:, None]
        y = torch.from_numpy(xm.astype(np.int64))
        logits = net(x)
        prob = logits.softmax(1)
        onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
        inter = (prob * onehot).sum((0, 2, 3))
        dice = 1 - (2 * inter + 1) / (prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3)) + 1)
        loss = F.cross_entropy(logits, y) + dice[1:].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            echo(f"  step {step + 1}/{steps} loss {loss.item():.3f}")
        if budget_s is not None and time.perf_counter() - t0 > budget_s:
            echo(f"  time budget reached after {step + 1} steps")
            break
    net.eval()
    return net


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


class ShapePrior:
    """Landmark shape model of the training masks; predictions are projected onto it,
    as landmark-based segmenters (CheXmask's HybridGNet) constrain their outputs."""

    def __init__(self, masks: np.ndarray, var_kept: float = 0.9, limit: float = 2.0) -> None:
        shapes = [s for s in (self.landmarks(m) for m in masks) if s is not None]
        flat = np.stack(shapes).reshape(len(shapes), -1)
        self.mean = flat.mean(0)
        _, sv, vt = np.linalg.svd(flat - self.mean, full_matrices=False)
        var = sv**2 / max(len(flat) - 1, 1)
        k = int(np.searchsorted(np.cumsum(var) / var.sum(), var_kept) + 1)
        self.modes, self.std, self.limit = vt[:k], np.sqrt(var[:k]), limit

    @staticmethod
    def landmarks(mask: np.ndarray) -> np.ndarray | None:
        """``(2 * N_PER_LUNG, 2)`` landmarks in units of the mask size, or None."""
        from pcl_viewer.data.phantom.shape import lung_landmarks

        out = []
        for label, sign in ((1, -1.0), (2, 1.0)):
            cs, _ = cv2.findContours((mask == label).astype(np.uint8), cv2.RETR_EXTERNAL,
                                     cv2.CHAIN_APPROX_NONE)
            if not cs:
                return None
            lm = lung_landmarks(max(cs, key=cv2.contourArea)[:, 0, :], sign)
            if lm is None:
                return None
            out.append(lm / mask.shape[0])
        return np.concatenate(out)

    def project(self, mask: np.ndarray) -> np.ndarray:
        """The closest plausible shape (coefficients clipped at ``limit`` sd), rasterised."""
        lm = self.landmarks(mask)
        if lm is None:
            return mask
        b = self.modes @ (lm.reshape(-1) - self.mean)
        b = np.clip(b, -self.limit * self.std, self.limit * self.std)
        fit = (self.mean + b @ self.modes).reshape(-1, 2) * mask.shape[0]
        out = np.zeros_like(mask)
        n = len(fit) // 2
        for label, poly in ((1, fit[:n]), (2, fit[n:])):
            cv2.fillPoly(out, [np.round(poly * 16).astype(np.int32)], label, cv2.LINE_8, 4)
        return out


def _resize(a: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if a.shape[0] == size:
        return a
    flag = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(a, (size, size), interpolation=flag)


def make_silver(data: Path, n_train: int = 20, scanner: str = "philips", steps: int = 200,
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

    n_train = min(int(n_train), 20)
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
    prior = ShapePrior(tr_m)
    labels = np.stack([prior.project(m) for m in labels])
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
        "steps": steps, "train_seconds": round(t_train, 1), "threshold": threshold,
        "n_pool": len(ds), "n_kept": int((quality > threshold).sum()),
        "quality_mean": float(quality.mean()),
        "dice": {k: {"mean": round(float(np.mean(v)), 4), "n": len(v)}
                 for k, v in sorted(groups.items())},
        "note": "silver-vs-gold Dice (mean of both lungs), excluding the training images",
    }
    (data / "silver_report.json").write_text(json.dumps(report, indent=1))
    return report
