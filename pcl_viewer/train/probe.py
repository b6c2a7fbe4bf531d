"""Linear probe on frozen decoder features (docs/method.md §3: it picks the checkpoint).

A 1x1 convolution (32 -> 3 classes) is trained on the frozen 32-channel
full-resolution features of some images against their silver masks, and
scored by Dice over the two lung classes on held-out images. The probe is a
logistic regression on standardised features (full batch, Adam); the
standardisation is folded into the returned 1x1 conv.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pcl_viewer.evaluate.metrics import dice_scores


@dataclass
class ProbeResult:
    """Mean Dice of the lung classes on the held-out images, and per class (1, 2)."""

    dice: float
    per_class: list[float]
    n_train: int
    n_eval: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _features(model: nn.Module, images: torch.Tensor, device, batch: int) -> torch.Tensor:
    """Yield-free helper: ``(n, 1, S, S)`` -> ``(n, C, S, S)`` on the CPU, in chunks."""
    out = []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(device, torch.float32)
        out.append(model.features(x).float().cpu())
    return torch.cat(out)


def linear_probe(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: torch.Tensor,
    eval_idx: torch.Tensor,
    steps: int = 150,
    pixels_per_image: int = 1024,
    lr: float = 0.05,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int = 3,
    batch: int = 16,
) -> tuple[ProbeResult, nn.Conv2d]:
    """Train a 1x1-conv probe on frozen features and score it.

    Args:
        model: a DenseUNet (anything with ``features(x) -> (B, C, H, W)``).
        images: ``(N, 1, S, S)`` float in [0, 1].
        labels: ``(N, S, S)`` silver masks (0 background, 1, 2 lungs).
        train_idx / eval_idx: disjoint image indices.

    Returns:
        the score and the probe as a ``Conv2d(C, num_classes, 1)`` (CPU).
    """
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    try:
        feats = _features(model, images[train_idx], device, batch)  # (n, C, S, S)
        n, c = feats.shape[:2]
        flat = feats.flatten(2)  # (n, C, S*S)
        lab = labels[train_idx].flatten(1).long()
        k = min(pixels_per_image, flat.shape[2])
        pick = torch.stack([torch.randperm(flat.shape[2], generator=g)[:k] for _ in range(n)])
        x = flat.gather(2, pick[:, None, :].expand(n, c, k)).transpose(1, 2).reshape(-1, c)
        y = lab.gather(1, pick).reshape(-1)
        mu, sd = x.mean(0), x.std(0).clamp(min=1e-6)
        xs = (x - mu) / sd
        lin = nn.Linear(c, num_classes)
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
        opt = torch.optim.Adam(lin.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                F.cross_entropy(lin(xs), y).backward()
                opt.step()
        conv = nn.Conv2d(c, num_classes, 1)
        with torch.no_grad():
            w = lin.weight / sd[None, :]
            conv.weight.copy_(w[:, :, None, None])
            conv.bias.copy_(lin.bias - (w * mu[None, :]).sum(1))
        scores = []
        for i in range(0, len(eval_idx), batch):
            idx = eval_idx[i : i + batch]
            f = _features(model, images[idx], device, batch)
            with torch.no_grad():
                pred = conv(f).argmax(1)
            # (b, 2) float32 Dice of the two lungs; NaN where a lung is absent from both
            # maps, so nanmean scores each lung on the images that show it.
            scores.append(torch.from_numpy(
                dice_scores(pred, labels[idx].long(), both_empty=float("nan"))))
        d = torch.cat(scores)
        per_class = torch.nanmean(d, dim=0)
        result = ProbeResult(
            dice=float(torch.nanmean(per_class)), per_class=[float(v) for v in per_class],
            n_train=int(n), n_eval=int(len(eval_idx)),
        )
    finally:
        model.train(was_training)
    return result, conv


def probe_split(has_labels: torch.Tensor, n_train: int, n_eval: int, seed: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed disjoint (train, eval) image indices among the labelled images.

    The split depends only on ``seed`` (not on the pre-training seed), so every
    method is probed on the same images.
    """
    idx = has_labels.nonzero().flatten()
    perm = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))]
    n_eval = min(n_eval, max(1, len(perm) // 3))
    n_train = min(n_train, len(perm) - n_eval)
    return perm[n_eval : n_eval + n_train].sort().values, perm[:n_eval].sort().values
