"""Pixel sampling: canonical coordinates follow the tracked affines."""

from __future__ import annotations

import torch

from pcl_viewer.contrastive.sampling import sample_pixels
from pcl_viewer.data.views import PIPELINE_1, PIPELINE_2, common_view_affines, warp

S = 48


def _ramps(b: int) -> torch.Tensor:
    """Two-channel canonical image: channel 0 = x, channel 1 = y (linear, so bilinear is exact)."""
    c = (2 * torch.arange(S, dtype=torch.float32) + 1) / S - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx, yy]).expand(b, 2, S, S).clone()


def test_sampled_positions_in_each_view_show_the_same_canonical_pixel():
    g = torch.Generator().manual_seed(0)
    b, v, n = 6, 4, 200
    theta = common_view_affines(b, [PIPELINE_1] + [PIPELINE_2] * (v - 1), S, n, g)
    canon = _ramps(b)
    views = torch.stack([warp(canon, theta[:, k]) for k in range(v)], dim=1)  # (B, V, 2, S, S)
    sample = sample_pixels(theta, S, n, g)
    seen = sample.gather(views)  # (B, V, N, 2): the (x, y) each view shows at the sample
    expected = canon.flatten(2).transpose(1, 2).gather(1, sample.index[..., None].expand(b, n, 2))
    for k in range(v):
        assert torch.allclose(seen[:, k], expected, atol=1e-4)
        assert torch.allclose(seen[:, k], sample.canonical, atol=1e-4)


def test_rotated_crop_of_a_known_image_maps_back_to_its_pixels():
    g = torch.Generator().manual_seed(1)
    img = torch.zeros(1, 1, S, S)
    img[0, 0, 10:30, 5:20] = 1.0  # a block: view values must equal canonical values
    img[0, 0, 30:40, 25:45] = 0.5
    theta = common_view_affines(1, [PIPELINE_1, PIPELINE_2], S, 300, g)
    views = torch.stack([warp(img, theta[:, k]) for k in range(2)], dim=1)
    sample = sample_pixels(theta, S, 300, g)
    seen = sample.gather(views)[0, :, :, 0]  # (V, N)
    truth = img.flatten()[sample.index[0]]
    # away from the block edges bilinear interpolation is exact
    inner = (seen - truth[None]).abs() < 1e-4
    assert inner.float().mean() > 0.8


def test_samples_are_visible_in_every_view_and_distinct_when_possible():
    g = torch.Generator().manual_seed(2)
    theta = common_view_affines(8, [PIPELINE_1] + [PIPELINE_2] * 3, S, 100, g)
    sample = sample_pixels(theta, S, 100, g)
    assert sample.grids.abs().max() <= 1 - 1 / S + 1e-5
    for i in range(8):
        assert len(torch.unique(sample.index[i])) == 100


def test_labels_are_the_silver_class_of_the_canonical_pixel():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (2, S, S), dtype=torch.uint8)
    theta = torch.eye(2, 3).expand(2, 2, 2, 3)
    sample = sample_pixels(theta, S, 50, g, labels=labels)
    for i in range(2):
        assert torch.equal(sample.labels[i], labels[i].flatten()[sample.index[i]].long())
    assert torch.allclose(sample.positions, (sample.canonical + 1) / 2)
