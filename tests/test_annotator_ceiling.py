"""The annotator ceiling: label noise alone keeps a perfect model below 100 % Dice."""

from __future__ import annotations

import pytest

from pcl_viewer.evaluate.phantom_eval import annotator_ceiling


@pytest.fixture(scope="module")
def ceiling():
    return annotator_ceiling(n=40, seed=5, size=64)


def test_the_ceiling_counts_both_groups(ceiling):
    assert ceiling["n_nf"] + ceiling["n_pe"] == ceiling["n"] == 40


def test_annotator_noise_keeps_even_a_perfect_model_below_100(ceiling):
    assert 80.0 < ceiling["dice"] < 99.5


def test_the_hidden_border_makes_effusion_labels_noisier(ceiling):
    assert ceiling["dice_pe"] < ceiling["dice_nf"]


def test_a_model_is_scored_against_the_gold_and_the_consensus_on_the_same_studies(seg_bundle_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.phantom import phantom

    res = CliRunner().invoke(phantom, ["ceiling", "--n", "6", "--seed", "5", "--size", "64",
                                       "--bundle", str(seg_bundle_path)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    lines = res.output.strip().splitlines()
    assert [ln.split(",")[0] for ln in lines] == [
        "consensus annotator vs gold", f"{seg_bundle_path} vs gold", f"{seg_bundle_path} vs consensus"]
    assert all("Dice % overall" in ln and "(n=6)" in ln for ln in lines)
    scores = [float(ln.split("overall")[1].split()[0]) for ln in lines]
    assert all(0.0 <= v <= 100.0 for v in scores)


def test_an_unreadable_bundle_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.phantom import phantom

    res = CliRunner().invoke(phantom, ["ceiling", "--n", "2", "--bundle", str(tmp_path / "none")])
    assert res.exit_code == 2 and "--bundle" in res.output
