"""Augmentation pipelines with tracked affines (docs/method.md §3)."""

from __future__ import annotations

import math

import torch

from pcl_viewer.data.views import (
    PIPELINE_1,
    PIPELINE_2,
    AugmentConfig,
    common_view_affines,
    make_views,
    photometric,
    random_affine,
    visible_in_views,
    warp,
)


def test_random_affine_is_crop_of_allowed_area_rotated_within_15_degrees_without_flip():
    g = torch.Generator().manual_seed(0)
    theta = random_affine(2000, PIPELINE_1, g)
    a = theta[:, :, :2]
    det = torch.linalg.det(a)  # = area fraction of the crop (before clipping to the image)
    assert (det > 0).all()  # no reflection: no flip
    assert det.min() >= 0.08 * 0.75 - 1e-6 and det.max() <= 1.0 + 1e-6
    # a = diag(w, h) @ R(angle): the angle is recovered from the column norms
    w = a[:, 0, :].norm(dim=1)
    h = a[:, 1, :].norm(dim=1)
    angle = torch.atan2(a[:, 1, 0] / h, a[:, 0, 0] / w)
    assert angle.abs().max() <= math.radians(15) + 1e-5
    assert angle.abs().max() > math.radians(13)  # the whole range is used


def test_views_without_augmentation_are_the_inputs_with_identity_geometry():
    g = torch.Generator().manual_seed(0)
    stacks = torch.rand(2, 4, 1, 16, 16)
    views, theta = make_views(stacks, augment=False, generator=g, min_visible=10)
    assert torch.equal(views, stacks)
    assert torch.equal(theta, torch.eye(2, 3).expand(2, 4, 2, 3))


def test_identity_warp_reproduces_the_image():
    img = torch.rand(3, 1, 20, 20)
    assert torch.allclose(warp(img, torch.eye(2, 3).expand(3, 2, 3)), img, atol=1e-6)


def test_common_region_is_large_enough_for_most_images():
    g = torch.Generator().manual_seed(1)
    theta = common_view_affines(64, [PIPELINE_1] + [PIPELINE_2] * 3, 64, 250, g)
    count = visible_in_views(theta, 64).sum(dim=1)
    assert (count >= 250).float().mean() >= 0.9
    assert (count > 0).all()


def test_photometric_stays_in_unit_range_and_off_switches_give_identity():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 1, 32, 32)
    y = photometric(x, PIPELINE_2, g)
    assert y.min() >= 0 and y.max() <= 1
    off = AugmentConfig(jitter_p=0.0, blur_p=0.0, solarize_p=0.0)
    assert torch.equal(photometric(x, off, g), x)


def test_solarize_inverts_pixels_above_half_and_only_pipeline_2_solarizes():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8)
    solar = AugmentConfig(jitter_p=0.0, blur_p=0.0, solarize_p=1.0)
    assert torch.equal(photometric(x, solar, g), torch.where(x >= 0.5, 1 - x, x))
    assert PIPELINE_1.solarize_p == 0.0 and PIPELINE_2.solarize_p == 0.2


def test_brightness_and_contrast_follow_torchvision_on_grey():
    g = torch.Generator().manual_seed(4)
    x = torch.full((64, 1, 4, 4), 0.5)
    x[:, :, 0, 0] = 0.1
    only_jitter = AugmentConfig(jitter_p=1.0, blur_p=0.0, solarize_p=0.0)
    y = photometric(x, only_jitter, g)
    ratio = y[:, 0, 1, 1] / 0.5  # brightness factor (contrast keeps the mean-ish pixel near)
    assert ratio.min() > 0.45 and ratio.max() < 1.55
    assert (y[:, 0, 0, 0] != 0.1).any()
