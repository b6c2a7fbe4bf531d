"""Optimiser and learning-rate schedule shared by pre-training, fine-tuning and the
counterfactual model's training.

docs/method.md §3/§4: AdamW, linear warm-up from lr/100 to lr, then cosine decay to an
absolute floor (1e-6). The schedule is per optimisation step.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, warmup_steps: int, total_steps: int, base_lr: float,
              start_factor: float = 0.01, min_lr: float = 1e-6, *,
              warmup_offset: int = 0, min_factor: float | None = None) -> float:
    """Multiplier of ``base_lr`` at ``step`` (0-based).

    Linear from ``start_factor`` at step ``-warmup_offset`` to 1 at ``warmup_steps``, then
    cosine from 1 to ``min_lr / base_lr`` (or ``min_factor``, a share of ``base_lr``) at
    ``total_steps``. Pre-training and fine-tuning use the defaults (warm-up from lr/100,
    floor 1e-6); the counterfactual recipe warms up as ``(step + 1) / warmup_steps``
    (``start_factor=0, warmup_offset=1``) and decays to ``min_factor=0.1``.
    """
    floor = min(min_lr / base_lr, 1.0) if min_factor is None else min_factor
    if step < warmup_steps:
        return start_factor + (1 - start_factor) * (step + warmup_offset) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / span, 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  start_factor: float = 0.01, min_lr: float = 1e-6) -> LambdaLR:
    """A LambdaLR for :func:`lr_factor`; call ``.step()`` after every optimiser step.

    Its ``state_dict()`` is plain JSON-able data, so it fits train/checkpoint.py.
    """
    base = optimizer.param_groups[0]["lr"]
    return LambdaLR(
        optimizer,
        lambda s: lr_factor(s, warmup_steps, total_steps, base, start_factor, min_lr),
    )


def adamw(params, lr: float = 3e-3, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW with torch's default weight decay (the reference states none)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
