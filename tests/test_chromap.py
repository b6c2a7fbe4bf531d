"""CHRO-map (docs/method.md §6): ellipse, colours, frame, overlays, command."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_viewer.chromap import (
    ChroMap,
    Ellipse,
    disc_colours,
    disc_hsv,
    hsv_to_rgb,
    khachiyan_mvee,
)
from pcl_viewer.data.preprocess import to_model


def _features(v: int = 3, c: int = 8, h: int = 16, w: int = 16, seed: int = 0) -> np.ndarray:
    """Smooth synthetic decoder features ``(V, C, h, w)`` with structure in space."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    basis = np.stack([np.sin(3 * xx), np.cos(2 * yy), xx * yy, np.ones_like(xx)])
    out = np.einsum("vck,khw->vchw", rng.normal(size=(v, c, 4)) * 0.3 + rng.normal(size=(1, c, 4)), basis)
    return (out + 0.05 * rng.normal(size=out.shape)).astype(np.float32)


def _rotated_ellipse(centre, axes, angle) -> tuple[np.ndarray, np.ndarray]:
    r = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.asarray(centre, float), r @ np.diag(1 / np.asarray(axes, float) ** 2) @ r.T


# ---------------------------------------------------------------- ellipse ---


def test_mvee_of_points_on_a_known_ellipse_is_that_ellipse():
    centre, a_true = _rotated_ellipse((1.5, -2.0), (3.0, 1.0), np.deg2rad(30))
    t = np.linspace(0, 2 * np.pi, 200, endpoint=False)
    axes = np.array([[3.0, 0], [0, 1.0]])
    r = np.array([[np.cos(np.pi / 6), -np.sin(np.pi / 6)], [np.sin(np.pi / 6), np.cos(np.pi / 6)]])
    pts = (r @ axes @ np.stack([np.cos(t), np.sin(t)])).T + centre
    inner = centre + 0.5 * (pts - centre)[::3]  # interior points do not change the answer
    ell = khachiyan_mvee(np.concatenate([pts, inner]))
    np.testing.assert_allclose(ell.centre, centre, atol=1e-3)
    np.testing.assert_allclose(ell.matrix, a_true, atol=2e-3)


def test_mvee_of_a_disc_cloud_is_the_circle():
    rng = np.random.default_rng(0)
    rad, ang = np.sqrt(rng.random(3000)) * 2.0, rng.random(3000) * 2 * np.pi
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    pts = np.concatenate([np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1),
                          2.0 * np.stack([np.cos(t), np.sin(t)], 1)]) + [4.0, 1.0]
    ell = khachiyan_mvee(pts)
    np.testing.assert_allclose(ell.centre, [4.0, 1.0], atol=1e-3)
    np.testing.assert_allclose(ell.matrix, np.eye(2) / 4.0, atol=1e-3)


def test_mvee_encloses_every_point_with_one_on_the_boundary():
    rng = np.random.default_rng(1)
    pts = rng.standard_t(3, size=(20000, 2)) @ np.array([[2.0, 0.5], [0.0, 0.3]])
    ell = khachiyan_mvee(pts)
    m = ell.mahalanobis(pts)
    assert m.max() == pytest.approx(1.0, abs=1e-9)
    assert (m <= 1.0 + 1e-9).all()
    assert np.linalg.norm(ell.to_disc(pts), axis=1).max() == pytest.approx(1.0, abs=1e-5)


def test_mvee_is_at_least_as_small_as_the_bounding_circle():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(500, 2)) * [5.0, 0.5]
    ell = khachiyan_mvee(pts)
    area = np.pi / np.sqrt(np.linalg.det(ell.matrix))
    circle = np.pi * np.max(np.sum((pts - pts.mean(0)) ** 2, 1))
    assert area < 0.5 * circle


@pytest.mark.parametrize("pts", [np.zeros((10, 2)), np.c_[np.arange(10.0), 2 * np.arange(10.0)],
                                 np.array([[1.0, 2.0]])])
def test_mvee_degenerate_clouds_get_an_enclosing_circle(pts):
    ell = khachiyan_mvee(pts)
    assert np.isfinite(ell.matrix).all()
    assert (ell.mahalanobis(pts) <= 1 + 1e-9).all()


def test_mvee_rejects_bad_input():
    with pytest.raises(ValueError):
        khachiyan_mvee(np.zeros((5, 3)))
    with pytest.raises(ValueError):
        khachiyan_mvee(np.array([[0.0, np.nan], [1, 1], [2, 0]]))


# ---------------------------------------------------------------- colours ---


def test_centre_has_zero_saturation_and_is_white():
    hue, sat = disc_hsv(np.zeros((1, 2)))
    assert sat[0] == 0.0
    np.testing.assert_allclose(disc_colours(np.zeros((1, 2))), [[1.0, 1.0, 1.0]])


def test_boundary_has_full_saturation_and_hue_is_angle():
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    hue, sat = disc_hsv(np.stack([np.cos(t), np.sin(t)], 1))
    np.testing.assert_allclose(sat, 1.0, atol=1e-6)
    np.testing.assert_allclose(hue, t / (2 * np.pi), atol=1e-6)
    rgb = disc_colours(np.array([[1.0, 0.0], [np.cos(2 * np.pi / 3), np.sin(2 * np.pi / 3)]]))
    np.testing.assert_allclose(rgb, [[1, 0, 0], [0, 1, 0]], atol=1e-5)  # red at 0, green at 120 deg


def test_hue_is_continuous_in_angle_including_the_wrap():
    t = np.linspace(0, 4 * np.pi, 4001)
    rgb = disc_colours(0.8 * np.stack([np.cos(t), np.sin(t)], 1))
    step = np.abs(np.diff(rgb, axis=0)).max()
    assert step < 0.01  # 1/1000 turn moves any channel by at most ~0.005 * 6 * 0.8


def test_saturation_grows_with_radius_and_clips_outside():
    r = np.linspace(0, 1.5, 16)
    _, sat = disc_hsv(np.stack([r, np.zeros_like(r)], 1))
    assert np.all(np.diff(sat) >= 0) and sat[-1] == 1.0


def test_hsv_to_rgb_matches_matplotlib():
    from matplotlib.colors import hsv_to_rgb as mpl

    rng = np.random.default_rng(0)
    hsv = rng.random((500, 3))
    np.testing.assert_allclose(hsv_to_rgb(hsv[:, 0], hsv[:, 1], hsv[:, 2]), mpl(hsv), atol=1e-5)


# ------------------------------------------------------------------ frame ---


def test_embedding_fills_the_unit_disc():
    cm = ChroMap.fit(_features())
    radius = np.linalg.norm(cm.embedding, axis=1)
    assert cm.embedding.shape == (3 * 16 * 16, 2)
    assert radius.max() == pytest.approx(1.0, abs=1e-5)
    assert cm.view_rgb.shape == (3, 16, 16, 3) and cm.view_rgb.dtype == np.uint8


def test_identical_features_in_two_views_get_identical_colours():
    f = _features(v=3)
    f[2] = f[0]
    cm = ChroMap.fit(f)
    np.testing.assert_array_equal(cm.view_rgb[0], cm.view_rgb[2])
    assert not np.array_equal(cm.view_rgb[0], cm.view_rgb[1])


def test_scale_of_a_pixel_vector_does_not_change_its_colour():
    f = _features(v=2)
    cm = ChroMap.fit(np.stack([f[1], 7.0 * f[1]]))  # L2 normalisation per pixel comes first
    np.testing.assert_array_equal(cm.view_rgb[0], cm.view_rgb[1])


def test_fit_is_deterministic():
    f = _features()
    np.testing.assert_array_equal(ChroMap.fit(f, seed=3).view_rgb, ChroMap.fit(f.copy(), seed=3).view_rgb)


def test_pca_sign_is_fixed_under_feature_permutation_of_views():
    f = _features(v=4)
    a = ChroMap.fit(f)
    b = ChroMap.fit(f[[2, 3, 0, 1]])
    np.testing.assert_array_equal(a.view_rgb[0], b.view_rgb[2])


def test_frame_reuse_colours_new_features_without_refit():
    f = _features(v=3)
    cm = ChroMap.fit(f)
    np.testing.assert_allclose(cm.colours(f[1]) * 255, cm.view_rgb[1], atol=0.51)
    before = (cm.frame.mean.copy(), cm.frame.ellipse.matrix.copy())
    new = cm.colours(_features(v=1, seed=9)[0])
    assert new.shape == (16, 16, 3) and new.dtype == np.float32
    np.testing.assert_array_equal(cm.frame.mean, before[0])
    np.testing.assert_array_equal(cm.frame.ellipse.matrix, before[1])


def test_constant_features_do_not_crash():
    cm = ChroMap.fit(np.ones((2, 4, 8, 8), np.float32))
    assert np.isfinite(cm.embedding).all()
    np.testing.assert_array_equal(cm.view_rgb, 255)  # everything at the centre: white


def test_fit_rejects_bad_shapes_and_reducers():
    with pytest.raises(ValueError):
        ChroMap.fit(np.zeros((4, 8, 8)))
    with pytest.raises(ValueError):
        ChroMap.fit(_features(), reducer="tsne")


# --------------------------------------------------------------- overlays ---


@pytest.mark.parametrize("shape", [(300, 200), (200, 333), (64, 64)])
def test_overlay_shapes_at_non_square_native_sizes(shape):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    small, geo = to_model(img, 16)
    cm = ChroMap.fit(_features(v=2), geometry=geo)
    for mode in ("blend", "aggregated"):
        out = cm.overlay(1, img, mode=mode)
        assert out.shape == shape + (3,) and out.dtype == np.uint8
    plain = ChroMap.fit(_features(v=2)).overlay(0, img)
    assert plain.shape == shape + (3,)


def test_overlay_with_geometry_follows_the_padding():
    img = np.zeros((40, 20), np.float32)  # tall: padded left and right to 40 x 40
    _, geo = to_model(img, 16)
    f = np.zeros((1, 2, 16, 16), np.float32)
    f[:, 0] = 1.0
    f[:, 1, :, 8:] = 5.0  # right half of the model grid differs
    cm = ChroMap.fit(np.concatenate([f, f]), geometry=geo)
    rgb = cm.rgb(0, img.shape)
    # Native column 0 is model column 5 (padding 10 px of 40 -> 4 model px); both halves visible.
    assert not np.array_equal(rgb[:, 0], rgb[:, -1])
    np.testing.assert_array_equal(rgb[:, 0], np.broadcast_to(cm.view_rgb[0, 0, 0], (40, 3)))


def test_blend_is_alpha_mix_of_colour_and_grey():
    img = np.full((32, 32), 0.4, np.float32)
    cm = ChroMap.fit(_features(v=2, h=8, w=8))
    rgb = cm.rgb(0, img.shape).astype(float)
    grey = round(0.4 * 255)
    for alpha in (0.0, 0.5, 1.0):
        out = cm.overlay(0, img, alpha=alpha).astype(float)
        np.testing.assert_allclose(out, alpha * rgb + (1 - alpha) * grey, atol=1.0)


def test_aggregated_keeps_brightness_and_takes_hue():
    img = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    cm = ChroMap.fit(_features(v=2))
    out = cm.overlay(0, img, mode="aggregated")
    np.testing.assert_allclose(out.max(axis=2), np.round(img * 255), atol=1)  # HSV value = grey
    import cv2

    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL).astype(int)
    ref = cv2.cvtColor(cm.rgb(0, img.shape), cv2.COLOR_RGB2HSV_FULL).astype(int)
    sel = (img > 0.5) & (ref[..., 1] > 128)
    d = np.abs(hsv[..., 0] - ref[..., 0])[sel]
    assert np.minimum(d, 256 - d).max() <= 4


def test_overlay_rejects_bad_arguments():
    cm = ChroMap.fit(_features(v=2))
    img = np.zeros((20, 20), np.float32)
    with pytest.raises(ValueError):
        cm.overlay(0, img, mode="sum")
    with pytest.raises(ValueError):
        cm.overlay(0, img, alpha=1.5)
    with pytest.raises(ValueError):
        _, geo = to_model(np.zeros((30, 20), np.float32), 16)
        cm.overlay(0, img, geometry=geo)


def test_ellipse_outline_lies_on_the_boundary():
    centre, a = _rotated_ellipse((0.0, 1.0), (2.0, 0.5), 0.3)
    ell = Ellipse(centre, a)
    np.testing.assert_allclose(ell.mahalanobis(ell.outline(50)), 1.0, atol=1e-9)


# ------------------------------------------------------------------- umap ---


@pytest.mark.slow  # numba compiles UMAP on first use (~40-60 s); the features are tiny
def test_umap_reducer_is_seeded_consistent_and_reusable():
    f = _features(v=3, h=12, w=12)
    f[2] = f[0]
    a = ChroMap.fit(f, reducer="umap", seed=1, fit_pixels=200)
    b = ChroMap.fit(f.copy(), reducer="umap", seed=1, fit_pixels=200)
    np.testing.assert_array_equal(a.view_rgb, b.view_rgb)  # determinism with a seed
    np.testing.assert_array_equal(a.view_rgb[0], a.view_rgb[2])  # identical features, colours
    assert np.linalg.norm(a.embedding, axis=1).max() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(a.colours(f[1]) * 255, a.view_rgb[1], atol=0.51)  # frame reuse
    assert a.colours(_features(v=1, h=12, w=12, seed=5)[0]).shape == (12, 12, 3)


# ---------------------------------------------------------------- command ---


def test_parse_views():
    from pcl_viewer.commands.chromap import parse_views

    assert parse_views("factual, effusion") == ["factual", "effusion"]
    for bad in ("", "factual,factual", "sex", "factual,scaner"):
        with pytest.raises(ValueError):
            parse_views(bad)


def test_figure_of_all_views_from_the_pipeline(fake_pipeline, chest_scan, tmp_path):
    from PIL import Image

    from pcl_viewer.chromap_figure import draw_chromap_figure
    from pcl_viewer.commands.chromap import chromap_inputs

    names, images, feats, classes, geo = chromap_inputs(
        fake_pipeline, chest_scan, ["factual", "scanner", "effusion", "both"])
    assert feats.shape == (4, 32, 64, 64) and classes.shape == (4, 64, 64)
    assert [im.shape for im in images] == [chest_scan.shape] * 4
    assert names[0] == "factual" and names[1].startswith("do(scanner=")
    assert not np.array_equal(images[0], images[1])
    cm = ChroMap.fit(feats, geometry=geo)
    assert cm.overlay(3, images[3]).shape == chest_scan.shape + (3,)
    out = draw_chromap_figure(cm, images, names, tmp_path / "fig.png", classes=classes)
    with Image.open(out) as im:
        assert im.size[0] > 4 * im.size[1] / 2 and im.mode in ("RGB", "RGBA")


def test_labels_on_model_grid_follow_the_padding():
    from pcl_viewer.chromap_figure import labels_on_model_grid

    labels = np.zeros((40, 20), np.uint8)
    labels[:, :10] = 1
    labels[:, 10:] = 2
    _, geo = to_model(labels.astype(np.float32), 8)  # padded left/right by 10 native px
    grid = labels_on_model_grid(labels, geo)
    np.testing.assert_array_equal(grid[0], [0, 0, 1, 1, 2, 2, 0, 0])


def _run_cli(args):
    from click.testing import CliRunner

    from pcl_viewer.cli import main

    return CliRunner().invoke(main, ["chromap", *args])


def test_cli_draws_the_factual_figure_with_a_segmentation_bundle(seg_bundle_path, tmp_path):
    from data_factory import synthetic_cxr, write_png

    scan = write_png(tmp_path / "scan.png", (synthetic_cxr(90, 70) * 255).astype(np.uint8))
    out = tmp_path / "figs" / "chromap.png"
    res = _run_cli([str(scan), "--bundle", str(seg_bundle_path), "--views", "factual",
                    "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "factual" in res.output


def test_cli_missing_bundles_are_clear_errors(seg_bundle_path, tmp_path):
    from data_factory import synthetic_cxr, write_png

    scan = write_png(tmp_path / "scan.png", (synthetic_cxr(40, 40) * 255).astype(np.uint8))
    res = _run_cli([str(scan), "--bundle", str(tmp_path / "nope"), "--views", "factual",
                    "--out", str(tmp_path / "f.png")])
    assert res.exit_code != 0 and "segmentation bundle" in res.output
    res = _run_cli([str(scan), "--bundle", str(seg_bundle_path), "--cf-bundle",
                    str(tmp_path / "no-cf"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code != 0 and "counterfactual bundle" in res.output and "--views factual" in res.output
    res = _run_cli([str(tmp_path / "missing.png"), "--out", str(tmp_path / "f.png")])
    assert res.exit_code != 0 and "no such file" in res.output
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------ linking ---


def test_a_clicked_pixel_selects_the_same_feature_in_every_view():
    f = _features(v=3)
    f[2] = f[0]  # view 2 repeats view 0: the same features at the same places
    img = np.zeros((40, 20), np.float32)  # padded to 40 x 40 -> 16 x 16 grid
    _, geo = to_model(img, 16)
    cm = ChroMap.fit(f, geometry=geo)
    idx = cm.index_of(0, row=20, col=0)  # native column 0 = grid column 4 (padding)
    assert idx == 0 * 256 + 8 * 16 + 4
    sel = cm.select_near(idx, radius=0.05)
    assert sel.shape == (3, 16, 16) and sel[0, 8, 4] and sel[2, 8, 4]
    np.testing.assert_array_equal(sel[0], sel[2])
    assert sel.sum() < sel.size / 2  # a feature, not the whole scan
    native = cm.mask_native(sel[0], img.shape)
    assert native.shape == (40, 20) and native[20, 0]


def test_a_brushed_box_of_the_embedding_selects_exactly_its_points():
    cm = ChroMap.fit(_features(v=2))
    e = cm.embedding
    sel = cm.select_region((0.0, 0.0), (1.0, 1.0))
    expected = ((e[:, 0] >= 0) & (e[:, 1] >= 0)).reshape(sel.shape)
    np.testing.assert_array_equal(sel, expected)
    assert 0 < sel.sum() < sel.size
