"""Pixel sampling with canonical coordinates (docs/method.md §3).

For each image we draw N canonical pixels (pixels of the untransformed real
image) from the region visible in every view, and map them into each view with
the tracked affines. The canonical coordinates are what define positives: two
sampled embeddings correspond when they come from the same image and the same
canonical pixel (DVD) or canonical pixels within a radius (MVD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pcl_viewer.data.views import pixel_centres, to_view, visible_in_views


@dataclass
class PixelSample:
    """N sampled pixels per image, seen in V views.

    Attributes:
        index: ``(B, N)`` long, canonical pixel index ``y * S + x``.
        canonical: ``(B, N, 2)`` canonical pixel centres, normalised [-1, 1] (x, y).
        grids: ``(B, V, N, 2)`` the same points in each view (normalised, for grid_sample).
        labels: ``(B, N)`` long silver class of each canonical pixel, or None.
        size: S, the side of the canonical image.
    """

    index: torch.Tensor
    canonical: torch.Tensor
    grids: torch.Tensor
    labels: torch.Tensor | None
    size: int

    @property
    def positions(self) -> torch.Tensor:
        """``(B, N, 2)`` canonical positions in units of the image side ([0, 1])."""
        return (self.canonical + 1) / 2

    def gather(self, maps: torch.Tensor) -> torch.Tensor:
        """Read per-view maps at the sampled points (bilinear).

        Args:
            maps: ``(B, V, C, H, W)`` features or images of the V views.

        Returns:
            ``(B, V, N, C)``.
        """
        b, v, c, h, w = maps.shape
        grid = self.grids.to(maps).reshape(b * v, -1, 1, 2)
        out = F.grid_sample(
            maps.reshape(b * v, c, h, w), grid, mode="bilinear", padding_mode="zeros",
            align_corners=False,
        )  # (B*V, C, N, 1)
        return out.squeeze(-1).transpose(1, 2).reshape(b, v, -1, c)


def sample_pixels(
    theta: torch.Tensor,
    size: int,
    n: int,
    generator: torch.Generator,
    labels: torch.Tensor | None = None,
) -> PixelSample:
    """Draw ``n`` canonical pixels per image from the region all views see.

    Args:
        theta: ``(B, V, 2, 3)`` view->canonical affines (see pcl_viewer.data.views).
        size: side S of the canonical image.
        n: pixels per image (1000 in the reference).
        generator: CPU generator.
        labels: optional ``(B, S, S)`` silver masks of the canonical images.

    Without replacement when the common region has at least ``n`` pixels,
    otherwise with replacement (duplicates are the same canonical pixel, hence
    positives of each other, never false negatives).
    """
    theta = theta.detach().cpu().float()
    visible = visible_in_views(theta, size).float()  # (B, S*S)
    empty = visible.sum(dim=1) == 0
    if bool(empty.any()):  # no common region at all: fall back to the whole image
        visible[empty] = 1.0
    index = torch.empty(theta.shape[0], n, dtype=torch.long)
    for i in range(theta.shape[0]):
        w = visible[i]
        replace = int(w.sum()) < n
        index[i] = torch.multinomial(w, n, replacement=replace, generator=generator)
    canonical = pixel_centres(size)[index]  # (B, N, 2)
    grids = to_view(theta, canonical)
    lab = None
    if labels is not None:
        lab = labels.reshape(labels.shape[0], -1).cpu().long().gather(1, index)
    return PixelSample(index=index, canonical=canonical, grids=grids, labels=lab, size=size)
