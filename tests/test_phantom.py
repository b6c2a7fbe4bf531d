"""The phantom SCM: determinism, intervention semantics, calibration, sizes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pcl_viewer.data.phantom.noise import ExogenousNoise, StudyParents
from pcl_viewer.data.phantom.priors import Priors, model_marginals
from pcl_viewer.data.phantom.scm import counterfactual, render, sample_studies


@pytest.fixture(scope="module")
def studies():
    return sample_studies(12, seed=5, oversample=1.0)


def test_noise_record_roundtrip_and_determinism(studies):
    st = studies[0]
    text = json.dumps(st.noise.to_dict())
    noise2 = ExogenousNoise.from_dict(json.loads(text))
    a_img, a_mask = render(st.noise, st.parents, 64)
    b_img, b_mask = render(noise2, st.parents, 64)
    assert a_img.dtype == np.float32 and a_img.shape == (64, 64)
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    assert set(np.unique(a_mask)) == {0, 1, 2}


def test_sizes_and_anatomy_sides(studies):
    st = studies[1]
    parents = replace(st.parents, effusion=False, style="philips")
    for size in (128, 224, 512):
        img, mask = render(st.noise, parents, size)
        assert img.shape == mask.shape == (size, size)
        cols = np.nonzero(mask)[1]
        right_x = np.nonzero(mask == 1)[1].mean()
        left_x = np.nonzero(mask == 2)[1].mean()
        assert right_x < size / 2 < left_x, "right lung must be on the image left (PA)"
        assert 0.15 < (cols.max() - cols.min()) / size < 0.95
        # lungs dark, mediastinum/abdomen brighter
        assert img[mask > 0].mean() < img[mask == 0].mean()


def test_scanner_counterfactual_keeps_mask(studies):
    for st in studies[:4]:
        p = replace(st.parents, style="imagingdynamics")
        img, mask = render(st.noise, p, 96)
        cf_img, cf_mask = counterfactual(st.noise, p, {"scanner": "philips"}, 96)
        np.testing.assert_array_equal(mask, cf_mask)
        assert np.abs(cf_img - img).mean() > 0.02


SIDE_LABELS = {"right": [1], "left": [2], "bilateral": [1, 2]}


@pytest.fixture(scope="module")
def effusions_added(studies):
    """Every study without effusion (philips, severity at least 0.3) and do(effusion):
    ``(noise, parents, mask, image, counterfactual mask, counterfactual image)``."""
    out = []
    for st in studies:
        noise = ExogenousNoise.from_dict(st.noise.to_dict())
        noise.effusion.severity = max(noise.effusion.severity, 0.3)
        p = replace(st.parents, effusion=False, style="philips")
        img, mask = render(noise, p, 128)
        cf_img, cf_mask = counterfactual(noise, p, {"effusion": "present"}, 128)
        out.append((noise, p, mask, img, cf_mask, cf_img))
    return out


def _covered_lungs(effusions_added):
    """``(lung, covered)`` boolean maps of every lung of the chosen side that fluid covers."""
    return [(mask == lab, (mask != cf_mask) & (mask == lab))
            for noise, _, mask, _, cf_mask, _ in effusions_added
            for lab in SIDE_LABELS[noise.effusion.side] if ((mask != cf_mask) & (mask == lab)).any()]


def test_fluid_only_removes_aerated_lung(effusions_added):
    for _, _, mask, _, cf_mask, _ in effusions_added:
        assert np.all(cf_mask[mask != cf_mask] == 0)


def test_fluid_covers_only_the_chosen_side(effusions_added):
    for noise, _, mask, _, cf_mask, _ in effusions_added:
        assert set(np.unique(mask[mask != cf_mask])) <= set(SIDE_LABELS[noise.effusion.side])


def test_fluid_is_visible(effusions_added):
    for _, _, _, img, _, cf_img in effusions_added:
        assert np.abs(cf_img - img).max() > 0.05


def test_fluid_sits_at_the_base_of_the_lung(effusions_added):
    covered = _covered_lungs(effusions_added)
    assert covered  # some lung is covered at severity 0.3
    for lung, changed in covered:
        assert np.nonzero(changed)[0].mean() > np.nonzero(lung)[0].mean()


def test_fluid_fills_each_column_from_the_bottom_up(effusions_added):
    """No aerated lung is left below the fluid (a few pixels of the outline aside)."""
    for lung, changed in _covered_lungs(effusions_added):
        first = np.argmax(changed, axis=0)
        left = sum(int((lung[first[c]:, c] & ~changed[first[c]:, c]).sum())
                   for c in np.nonzero(changed.any(0))[0])
        assert left <= 0.03 * changed.sum() + 2


def test_removing_the_effusion_again_gives_the_normal_mask(effusions_added):
    for noise, p, mask, _, _, _ in effusions_added:
        _, back = counterfactual(noise, replace(p, effusion=True), {"effusion": False}, 128)
        np.testing.assert_array_equal(back, mask)


def test_tables_reproduce_padchest_marginals():
    tables = Priors.load().tables
    model, obs = model_marginals(tables), tables["observed"]
    for key in ("p_philips", "p_effusion", "p_effusion_philips", "p_effusion_imagingdynamics",
                "p_effusion_male", "p_effusion_female"):
        assert model[key] == pytest.approx(obs[key], abs=0.002), key
    np.testing.assert_allclose(model["p_effusion_by_age_bin"], obs["p_effusion_by_age_bin"],
                               atol=0.003)
    assert 0.38 < obs["p_philips"] < 0.42 and 0.033 < obs["p_effusion"] < 0.039


def test_sampled_marginals_match_priors():
    obs = Priors.load().tables["observed"]
    st = sample_studies(4000, seed=11, studies_per_patient=1)
    style = np.array([s.parents.style for s in st])
    eff = np.array([s.parents.effusion for s in st])
    age = np.array([s.parents.age for s in st])
    # tolerances ~3 standard errors at n = 4000
    assert abs((style == "philips").mean() - obs["p_philips"]) < 0.025
    assert abs(eff.mean() - obs["p_effusion"]) < 0.009
    assert abs(eff[style == "philips"].mean() - obs["p_effusion_philips"]) < 0.018
    assert abs(eff[style == "imagingdynamics"].mean() - obs["p_effusion_imagingdynamics"]) < 0.01
    assert eff[style == "philips"].mean() > 1.5 * eff[style == "imagingdynamics"].mean()
    assert eff[age >= 80].mean() > 2.5 * eff[age < 50].mean()


def test_oversampling_raises_effusion():
    st = sample_studies(1000, seed=3, oversample=8.0, studies_per_patient=1)
    assert np.mean([s.parents.effusion for s in st]) > 0.15


def test_portable_and_parents():
    st = sample_studies(1, seed=0)[0]
    p = StudyParents(style="portable", sex="female", effusion=False)
    with pytest.raises(ValueError):
        p.to_parents()
    img, mask = render(st.noise, p, 64)
    assert img.shape == (64, 64)
    assert StudyParents("philips", "male", True).to_parents().to_vector().tolist() == [1, 1, 1]


def test_generate_command_prints_speed(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.cli import main

    out = tmp_path / "gen"
    res = CliRunner().invoke(main, ["phantom", "generate", "--n", "6", "--size", "64",
                                    "--seed", "1", "--out", str(out), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "images/s" in res.output and "CPU-ms per image" in res.output
    info = json.loads((out / "dataset.json").read_text())
    assert info["format"] == "pcl-phantom" and info["images_per_second"] > 0
    assert len(list((out / "images").glob("*.png"))) == 6
