"""The realistic phantom regime: determinism, the easy regime's regression values,
intervention semantics at every severity, marginals of the new variables, and the
labelled-folder evaluation path."""

from __future__ import annotations

import csv
import json
from dataclasses import replace

import numpy as np
import pytest

from pcl_viewer.data.phantom.anatomy import cardiothoracic_ratio
from pcl_viewer.data.phantom.noise import SEVERITY_BETA, ExogenousNoise
from pcl_viewer.data.phantom.priors import Priors
from pcl_viewer.data.phantom.scm import Renderer, counterfactual, render, sample_studies

# sum of pixel values, right and left lung pixel counts of the first six studies of
# sample_studies(6, 11, oversample=8) at 64 px, rendered by the first renderer (commit
# ccda700): the easy regime must keep reproducing them
EASY_REFERENCE = [(2392.9711, 465, 462), (1966.4014, 541, 472), (2575.0246, 502, 412),
                  (2559.7589, 394, 322), (2605.1132, 448, 371), (1992.4058, 521, 440)]


def test_easy_regime_reproduces_the_first_renderer():
    for st, (total, right, left) in zip(sample_studies(6, 11, oversample=8.0, regime="easy"),
                                        EASY_REFERENCE):
        assert st.noise.regime == "easy" and st.noise.extra is None
        img, mask = Renderer(st.noise).render(st.parents, 64)
        assert float(img.astype(np.float64).sum()) == pytest.approx(total, abs=0.05)
        assert int((mask == 1).sum()) == right and int((mask == 2).sum()) == left


@pytest.fixture(scope="module")
def studies():
    return sample_studies(40, seed=23, oversample=8.0)


def test_realistic_noise_roundtrip_and_determinism(studies):
    st = studies[0]
    assert st.noise.regime == "realistic" and st.noise.extra is not None
    again = ExogenousNoise.from_json(json.dumps(st.noise.to_dict()))
    a = render(st.noise, st.parents, 96)
    b = render(again, st.parents, 96)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    # the same seed samples the same studies
    first = sample_studies(3, seed=23, oversample=8.0)
    assert [s.noise.to_dict() for s in first] == [s.noise.to_dict() for s in studies[:3]]


def _add_effusion(studies, severity: float, layering: bool):
    """A right effusion of ``severity`` added to study 2 (a philips inpatient without one):
    ``(noise, parents, (img, mask), (cf_img, cf_mask))``."""
    noise = ExogenousNoise.from_dict(studies[2].noise.to_dict())
    noise.effusion.severity = severity
    noise.effusion.side = "right"
    noise.extra.layering = 0.0 if layering else 0.99
    parents = replace(studies[2].parents, effusion=False, style="philips", care="inpatient")
    return (noise, parents, render(noise, parents, 128),
            counterfactual(noise, parents, {"effusion": "present"}, 128))


SEVERITIES = pytest.mark.parametrize("severity", [0.03, 0.3, 0.6, 0.9])
LAYERING = pytest.mark.parametrize("layering", [False, True])


@SEVERITIES
@LAYERING
def test_fluid_only_takes_aerated_lung_away(studies, severity, layering):
    _, _, (_, mask), (_, cf_mask) = _add_effusion(studies, severity, layering)
    assert np.all(cf_mask[mask != cf_mask] == 0)


@SEVERITIES
@LAYERING
def test_only_the_chosen_side_changes(studies, severity, layering):
    _, _, (_, mask), (_, cf_mask) = _add_effusion(studies, severity, layering)
    assert set(np.unique(mask[mask != cf_mask])) == {1}


@SEVERITIES
@LAYERING
def test_the_fluid_is_visible(studies, severity, layering):
    _, _, (img, _), (cf_img, _) = _add_effusion(studies, severity, layering)
    assert np.abs(cf_img - img).max() > 0.05


@SEVERITIES
@LAYERING
def test_the_fluid_sits_at_the_base_of_the_lung(studies, severity, layering):
    _, _, (_, mask), (_, cf_mask) = _add_effusion(studies, severity, layering)
    covered_rows = np.nonzero(mask != cf_mask)[0]
    assert covered_rows.mean() > np.nonzero(mask == 1)[0].mean()


@pytest.mark.parametrize("severity", [0.6, 0.9])
def test_a_large_free_effusion_covers_much_of_the_lung(studies, severity):
    _, _, (_, mask), (_, cf_mask) = _add_effusion(studies, severity, layering=False)
    lost = (mask != cf_mask).sum() / (mask == 1).sum()
    assert lost > 0.4 * severity


@SEVERITIES
@LAYERING
def test_the_image_changes_mostly_on_the_effusion_side(studies, severity, layering):
    """The right lung is on the image's left; vendor processing (local contrast
    equalisation, veil) spreads a little of the change over the whole image."""
    _, _, (img, _), (cf_img, _) = _add_effusion(studies, severity, layering)
    change = np.abs(cf_img - img)
    assert change[:, :64].sum() > 1.5 * change[:, 64:].sum()


@SEVERITIES
@LAYERING
def test_the_scanner_counterfactual_of_an_effusion_image_keeps_its_mask(studies, severity,
                                                                       layering):
    noise, parents, _, (_, cf_mask) = _add_effusion(studies, severity, layering)
    eff = replace(parents, effusion=True)
    _, sc_mask = counterfactual(noise, eff, {"scanner": "imagingdynamics"}, 128)
    np.testing.assert_array_equal(sc_mask, cf_mask)


def test_fluid_edge_is_soft_not_a_step(studies):
    st = studies[3]
    noise = ExogenousNoise.from_dict(st.noise.to_dict())
    noise.effusion.severity, noise.effusion.side = 0.5, "left"
    noise.extra.layering = 0.99
    parents = replace(st.parents, effusion=False, style="philips")
    _, mask = render(noise, parents, 128)
    cf_img, _ = counterfactual(noise, parents, {"effusion": "present"}, 128)
    img, _ = render(noise, parents, 128)
    diff = np.abs(cf_img - img)
    col = int(np.median(np.nonzero(mask == 2)[1]))
    profile = diff[:, col]
    top = int(np.argmax(profile > 0.5 * profile.max()))
    # the change ramps up over several pixels above its half-maximum row
    assert profile[max(top - 3, 0)] > 0.05 * profile.max()


def test_severity_and_cardiomegaly_marginals():
    pr = Priors.load()
    st = sample_studies(3000, seed=404, oversample=1.0)
    sev = np.array([s.noise.effusion.severity for s in st])
    a, b = SEVERITY_BETA
    assert abs(sev.mean() - a / (a + b)) < 0.02 and sev.max() > 0.9 and sev.min() < 0.1
    cardio = np.array([s.noise.extra.cardiomegaly for s in st])
    expected = np.mean([pr.p_cardiomegaly("M" if s.parents.sex == "male" else "F",
                                          s.parents.age, s.parents.effusion) for s in st])
    assert abs(cardio.mean() - expected) < 3 * np.sqrt(expected * (1 - expected) / len(st))
    tables = pr.tables["observed"]
    assert tables["p_cardiomegaly_effusion"] > 1.5 * tables["p_cardiomegaly_no_effusion"]
    ctr = np.array([cardiothoracic_ratio(s.noise, s.parents) for s in st])
    assert ctr[cardio].min() >= 0.52 - 1e-9 and ctr.max() <= 0.65 + 1e-9
    assert 0.40 < np.median(ctr[~cardio]) < 0.50
    # devices are drawn in every style, more in inpatients
    dev_in = np.mean([len(s.noise.extra.devices) for s in st if s.parents.care == "inpatient"])
    dev_out = np.mean([len(s.noise.extra.devices) for s in st if s.parents.care == "outpatient"])
    assert dev_in > dev_out > 0


def test_dataset_json_names_version_and_regime(tmp_path):
    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.data.phantom.generate import generate

    generate(tmp_path / "d", 6, 64, 3, regime="realistic")
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["phantom_version"] == 2 and meta["regime"] == "realistic"
    ds = load_dataset(tmp_path / "d")
    assert ds.provenance["regime"] == "realistic"
    generate(tmp_path / "e", 6, 64, 3, regime="easy")
    assert load_dataset(tmp_path / "e").provenance["regime"] == "easy"


def test_evaluate_folder_path(tmp_path, seg_bundle_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.evaluate import evaluate
    from pcl_viewer.evaluate.independent import write_independent_set

    write_independent_set(tmp_path / "ind", 4, seed=3, size=64)
    out = tmp_path / "per.csv"
    res = CliRunner().invoke(evaluate, ["--bundle", str(seg_bundle_path), "--images",
                                        str(tmp_path / "ind" / "images"), "--masks",
                                        str(tmp_path / "ind" / "masks"), "--labels",
                                        str(tmp_path / "ind" / "labels.csv"), "--out", str(out),
                                        "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "Dice % overall" in res.output and "(n=4)" in res.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(0.0 <= float(r["dice"]) <= 100.0 for r in rows)
    # a mask with a label outside 0/1/2 is refused with one line
    import cv2

    bad = tmp_path / "ind" / "masks" / rows[0]["file"]
    cv2.imwrite(str(bad), np.full((64, 64), 7, np.uint8))
    res = CliRunner().invoke(evaluate, ["--bundle", str(seg_bundle_path), "--images",
                                        str(tmp_path / "ind" / "images"), "--masks",
                                        str(tmp_path / "ind" / "masks"), "--device", "cpu"])
    assert res.exit_code != 0 and "labels must be 0, 1, 2" in res.output
