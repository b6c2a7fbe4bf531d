"""Augmented views with tracked geometry (docs/method.md §3).

Every geometric transform is one affine matrix ``theta`` per view, in the
convention of :func:`torch.nn.functional.affine_grid` with
``align_corners=False``: it maps a point ``u`` of the *view* (normalised
coordinates in [-1, 1], x then y) to the point ``p = theta[:, :2] @ u +
theta[:, 2]`` of the *canonical* image (the untransformed real image, same
normalised coordinates). The view is rendered by ``grid_sample`` with exactly
that grid, so the correspondence between a view pixel and its canonical pixel
is known exactly, not estimated.

Two pipelines (the reference's torchvision pipelines, batched in torch):

- pipeline 1 (real image): RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3),
  rotation +-15 deg, no flip; ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8;
  Gaussian blur p=0.5 (sigma 0.1-2.0, kernel about 10 % of the side).
- pipeline 2 (counterfactuals): pipeline 1 plus solarize (threshold 0.5) p=0.2.

Grey images: torchvision's ``adjust_saturation`` and ``adjust_hue`` return a
1-channel image unchanged, so on our grey X-rays ColorJitter reduces to
brightness (x * b, b in [0.6, 1.4]) and contrast (blend with the image mean,
c in [0.6, 1.4]) applied in random order, each clamped to [0, 1]. We keep that
exact behaviour rather than inventing a grey substitute for saturation/hue.

Rotation is applied after the crop, in the view frame (as torchvision's
RandomRotation after RandomResizedCrop); where a rotated corner leaves the
crop we show the real image content around it (not zeros), and only where it
leaves the canonical image is the view zero-padded. Pixel sampling never
draws from padding (:func:`visible_in_views`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Hyper-parameters of one augmentation pipeline (probabilities per image)."""

    rotation: float = 15.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2  # identity on grey images (kept for the record)
    hue: float = 0.1  # identity on grey images (kept for the record)
    jitter_p: float = 0.8
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5


PIPELINE_1 = AugmentConfig()
PIPELINE_2 = AugmentConfig(solarize_p=0.2)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def identity_affine(batch: int) -> torch.Tensor:
    """``(B, 2, 3)`` identity: the view is the canonical image."""
    return torch.eye(2, 3).expand(batch, 2, 3).clone()


def random_affine(batch: int, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random crop + rotation as ``(B, 2, 3)`` view->canonical affines.

    The crop has area fraction ``s ~ U(scale)`` and aspect ``r`` log-uniform in
    ``ratio`` (torchvision's RandomResizedCrop distribution, clipped to the image
    instead of its rejection loop); the rotation angle is ``U(-rot, rot)``.
    """
    s = _uniform(batch, *cfg.scale, generator)
    log_r = _uniform(batch, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), generator)
    r = torch.exp(log_r)
    half_w = torch.sqrt(s * r).clamp(max=1.0)  # half-width in normalised units = width fraction
    half_h = torch.sqrt(s / r).clamp(max=1.0)
    cx = (1 - half_w) * (2 * torch.rand(batch, generator=generator) - 1)
    cy = (1 - half_h) * (2 * torch.rand(batch, generator=generator) - 1)
    angle = torch.deg2rad(_uniform(batch, -cfg.rotation, cfg.rotation, generator))
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(batch, 2, 3)
    # canonical = centre + diag(half_w, half_h) @ R(angle) @ u
    theta[:, 0, 0] = half_w * cos
    theta[:, 0, 1] = -half_w * sin
    theta[:, 1, 0] = half_h * sin
    theta[:, 1, 1] = half_h * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Render views: ``(B, C, H, W)`` canonical images, ``(B, 2, 3)`` -> ``(B, C, H, W)``."""
    grid = F.affine_grid(theta.to(images), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def to_view(theta: torch.Tensor, canonical: torch.Tensor) -> torch.Tensor:
    """Map canonical points into views.

    Args:
        theta: ``(B, V, 2, 3)`` view->canonical affines.
        canonical: ``(B, M, 2)`` canonical points (normalised, x then y).

    Returns:
        ``(B, V, M, 2)`` the same points in each view's normalised coordinates.
    """
    a = theta[..., :2]  # (B, V, 2, 2)
    t = theta[..., 2]  # (B, V, 2)
    rel = canonical[:, None, :, :] - t[:, :, None, :]  # (B, V, M, 2)
    return torch.einsum("bvij,bvmj->bvmi", torch.linalg.inv(a), rel)


def pixel_centres(size: int) -> torch.Tensor:
    """``(size*size, 2)`` normalised (x, y) centres of a square grid, row-major."""
    c = (2 * torch.arange(size, dtype=torch.float32) + 1) / size - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)


def visible_in_views(theta: torch.Tensor, size: int, stride: int = 1) -> torch.Tensor:
    """``(B, V, 2, 3)`` -> ``(B, size*size)`` bool: canonical pixels seen by every view.

    A point counts as visible when it lies within the outermost pixel centres of
    a view, so bilinear sampling at it never touches zero padding. ``stride > 1``
    checks only every stride-th row and column (a cheap estimate for redraws;
    the result then has ``(size // stride) ** 2`` entries).
    """
    b = theta.shape[0]
    pts = pixel_centres(size)
    if stride > 1:
        keep = torch.arange(0, size, stride)
        pts = pts.view(size, size, 2)[keep][:, keep].reshape(-1, 2)
    pts = pts.to(theta).expand(b, -1, -1)
    u = to_view(theta, pts)  # (B, V, M, 2)
    limit = 1 - 1 / size + 1e-6
    return (u.abs() <= limit).all(dim=-1).all(dim=1)


def common_view_affines(
    batch: int,
    configs: list[AugmentConfig | None],
    size: int,
    min_visible: int,
    generator: torch.Generator,
    max_tries: int = 20,
) -> torch.Tensor:
    """Affines for V views of each image whose common visible region is large enough.

    ``configs[v] is None`` means no geometric augmentation for view v. Images whose
    V independent crops share fewer than ``min_visible`` canonical pixels are
    redrawn (up to ``max_tries``; the draw with the largest overlap is kept).
    Independent crops of scale down to 0.08 often do not overlap at all, and the
    method needs pixels seen in every view; the redraw biases crops slightly
    towards larger overlaps (documented in docs/pretraining.md).

    Returns:
        ``(B, V, 2, 3)``.
    """
    def draw(n: int) -> torch.Tensor:
        return torch.stack(
            [identity_affine(n) if c is None else random_affine(n, c, generator) for c in configs],
            dim=1,
        )

    stride = 4 if size >= 64 else 1

    def visible_count(th: torch.Tensor) -> torch.Tensor:
        return visible_in_views(th, size, stride).sum(dim=1) * stride**2

    theta = draw(batch)
    count = visible_count(theta)
    for _ in range(max_tries - 1):
        todo = (count < min_visible).nonzero().flatten()
        if len(todo) == 0:
            break
        cand = draw(len(todo))
        ccount = visible_count(cand)
        better = ccount > count[todo]
        theta[todo[better]] = cand[better]
        count[todo[better]] = ccount[better]
    return theta


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image; ``(B, 1, H, W)``."""
    b, c, h, w = images.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    k = torch.exp(-(x[None, :] ** 2) / (2 * sigma[:, None].to(images) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (B, K)
    flat = images.reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, dim=0)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kk[:, None, None, :], groups=b * c)
    flat = F.conv2d(flat, kk[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def photometric(images: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Colour jitter (grey), blur and solarize on ``(B, 1, H, W)`` in [0, 1]."""
    b = images.shape[0]
    dev = images.device

    def per_image(v: torch.Tensor) -> torch.Tensor:
        return v.to(dev, images.dtype).view(b, 1, 1, 1)

    jitter = per_image(torch.rand(b, generator=generator) < cfg.jitter_p)
    bright = per_image(_uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, generator))
    contr = per_image(_uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, generator))
    contrast_first = per_image(torch.rand(b, generator=generator) < 0.5)

    def brightness(x: torch.Tensor) -> torch.Tensor:
        return (x * bright).clamp(0, 1)

    def contrast(x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (contr * x + (1 - contr) * mean).clamp(0, 1)

    jittered = contrast_first * brightness(contrast(images)) + (1 - contrast_first) * contrast(
        brightness(images)
    )
    out = jitter * jittered + (1 - jitter) * images

    blur = torch.rand(b, generator=generator) < cfg.blur_p
    sigma = _uniform(b, *cfg.blur_sigma, generator)
    if bool(blur.any()):
        out = torch.where(per_image(blur).bool(), _gaussian_blur(out, sigma), out)

    solar = torch.rand(b, generator=generator) < cfg.solarize_p
    if cfg.solarize_p > 0 and bool(solar.any()):
        flipped = torch.where(out >= cfg.solarize_threshold, 1 - out, out)
        out = torch.where(per_image(solar).bool(), flipped, out)
    return out


def make_views(
    stacks: torch.Tensor,
    augment: bool,
    generator: torch.Generator,
    min_visible: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment the V views of each image.

    Args:
        stacks: ``(B, V, 1, S, S)`` pixel-aligned views (view 0 the real image,
            the others its counterfactuals or copies of it).
        augment: False gives the dagger setting (identity geometry, no photometric
            change).
        generator: CPU generator for every random choice (reproducible resume).
        min_visible: wanted size of the region visible in all views (pixels).

    Returns:
        views ``(B, V, 1, S, S)`` and their view->canonical affines ``(B, V, 2, 3)``.
    """
    b, v, _, s, _ = stacks.shape
    if not augment:
        return stacks, identity_affine(b * v).view(b, v, 2, 3)
    configs = [PIPELINE_1] + [PIPELINE_2] * (v - 1)
    theta = common_view_affines(b, configs, s, min_visible, generator)
    out = []
    for k, cfg in enumerate(configs):
        warped = warp(stacks[:, k], theta[:, k])
        out.append(photometric(warped, cfg, generator))
    return torch.stack(out, dim=1), theta
