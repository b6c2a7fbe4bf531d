"""eval-cf against the phantom's true counterfactuals, with an independent judge."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pcl_viewer.parents import VIEW_KINDS


@pytest.fixture(scope="module")
def phantom64(tmp_path_factory):
    from pcl_viewer.data.phantom.generate import generate

    root = tmp_path_factory.mktemp("phantom") / "ds"
    generate(root, 12, 64, seed=3, counterfactuals=True, oversample=8.0, workers=1)
    return root


@pytest.fixture(scope="module")
def report(phantom64, cf_bundle_path, tmp_path_factory, one_torch_thread) -> dict:
    """``pcl eval-cf`` of the random smoke bundle, judged by itself."""
    from pcl_viewer.cli import main

    out = tmp_path_factory.mktemp("eval") / "report.json"
    res = CliRunner().invoke(main, ["eval-cf", "--bundle", str(cf_bundle_path), "--data",
                                    str(phantom64), "--out", str(out), "--judge",
                                    str(cf_bundle_path), "--threads", "1"])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


INTERVENED = {"scanner": ["scanner"], "effusion": ["effusion"], "both": ["scanner", "effusion"]}


def test_eval_cf_reports_every_image_and_the_judge(report):
    assert report["n"] == 12
    assert report["judge"]["fingerprint"]


def test_the_null_intervention_is_exact_whatever_the_weights(report):
    assert report["composition_mae"] < 1e-6  # x + (mu - mu) is x


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_the_true_counterfactual_differs_from_the_factual(report, kind):
    assert report["interventions"][kind]["identity_mae"] > 0


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_the_error_reduction_is_measured_against_the_identity(report, kind):
    m = report["interventions"][kind]
    assert m["mae_reduction_vs_identity"] == pytest.approx(1 - m["mae"] / m["identity_mae"])


@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_the_same_classifiers_as_judge_give_the_same_verdict(report, kind):
    m = report["interventions"][kind]
    assert m["judge_effectiveness"] == pytest.approx(
        {name: m["effectiveness"][name] for name in INTERVENED[kind]})


def test_eval_cf_refuses_a_judge_that_cannot_classify(phantom64, cf_bundle_path, seg_bundle_path, tmp_path):
    from pcl_viewer.cli import main

    res = CliRunner().invoke(main, ["eval-cf", "--bundle", str(cf_bundle_path), "--data",
                                    str(phantom64), "--out", str(tmp_path / "r.json"),
                                    "--judge", str(seg_bundle_path)])
    assert res.exit_code != 0
    assert not (tmp_path / "r.json").exists()


def test_counterfactual_figures_are_written(tmp_path):
    from pcl_viewer.evaluate.cf_quality import counterfactual_figure, effusion_figure

    rng = np.random.default_rng(0)
    x = rng.random((4, 1, 32, 32)).astype(np.float32)
    true_cf = np.clip(x[:, None] + 0.1, 0, 1).repeat(len(VIEW_KINDS), axis=1)
    examples = {k: np.clip(x + 0.05, 0, 1) for k in VIEW_KINDS}
    parents = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0]], np.float32)
    counterfactual_figure(tmp_path / "a.png", x[:2], true_cf[:2],
                          {k: v[:2] for k, v in examples.items()}, parents[:2], title="t")
    effusion_figure(tmp_path / "b.png", x, true_cf, examples, parents, n_add=1)
    for name in ("a.png", "b.png"):
        assert (tmp_path / name).stat().st_size > 1000
