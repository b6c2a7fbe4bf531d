"""The viewer pipeline as a specification (fake CF model, random smoke U-Net)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pcl_viewer.data.scan import Scan
from pcl_viewer.parents import Parents
from pcl_viewer.pipeline import (
    FACTUAL,
    STAGES,
    Cancelled,
    ConsistencyRow,
    View,
    consistency_rows,
    rows_to_csv,
)
from tests.conftest import synthetic_chest


def test_run_yields_progress_in_stage_order_and_returns_a_result(fake_pipeline, chest_scan):
    gen = fake_pipeline.run(chest_scan)
    stages = []
    while True:
        try:
            step = next(gen)
        except StopIteration as stop:
            result = stop.value
            break
        assert 0 <= step.i <= step.n
        stages.append(step.stage)
    seen = list(dict.fromkeys(stages))
    assert seen == [s for s in STAGES if s in seen]
    assert {"preprocess", "parents", "abduct", "decode", "segment", "chromap"} <= set(seen)
    assert list(result.views) == [FACTUAL, "scanner", "effusion", "both"]
    assert set(result.timings) >= {"preprocess", "parents", "abduct", "decode", "segment"}


def test_views_labels_and_overlays_are_at_native_size(fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan)
    h, w = chest_scan.shape
    for view in result.views.values():
        assert view.image.shape == (h, w) and view.image.dtype == np.float32
        assert 0.0 <= view.image.min() and view.image.max() <= 1.0
        assert view.labels.shape == (h, w) and view.labels.dtype == np.uint8
        assert set(np.unique(view.labels)) <= {0, 1, 2}
        assert view.overlay.shape == (h, w, 3) and view.overlay.dtype == np.uint8
    assert result.embedding.shape[1] == 2
    assert len(result.embedding_labels) == len(result.embedding)


def test_inferred_parents_come_with_probabilities_and_flip_in_standard_views(
        fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    assert result.parents_source == "inferred"
    assert set(result.probabilities) == {"scanner", "sex", "effusion"}
    pa = result.parents
    assert result.views["scanner"].parents.scanner == pa.flipped("scanner")
    assert result.views["both"].parents.effusion == pa.flipped("effusion")


def test_user_parents_override_the_classifiers(fake_pipeline, chest_scan):
    user = Parents("philips", "male", "present")
    result = fake_pipeline.run_sync(chest_scan, parents=user, segment=False)
    assert result.parents == user and result.parents_source == "user"
    assert result.views["effusion"].do == {"effusion": "absent"}


def test_one_abduction_is_cached_per_scan_and_parents(fake_pipeline, chest_scan):
    cf = fake_pipeline.cf
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    first = cf.abductions  # the scan's, and one batch for the views' reversibility
    fake_pipeline.run_sync(chest_scan, segment=False)
    fake_pipeline.decode(result, "sex", {"sex": "male"})
    assert first == 2 and cf.abductions == first


def test_strength_rescales_the_residual_without_running_the_model(fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    decodes = fake_pipeline.cf.decodes
    half = fake_pipeline.decode(result, "effusion", result.views["effusion"].do, strength=0.5)
    assert fake_pipeline.cf.decodes == decodes
    assert not half.extrapolated and half.name.endswith("x0.5")  # attenuated, not beyond
    assert fake_pipeline.decode(result, "effusion", half.do, 1.5).extrapolated
    diff_full = np.abs(fake_pipeline.decode(result, "effusion", half.do, 1.0).image
                       - chest_scan.image).mean()
    diff_half = np.abs(half.image - chest_scan.image).mean()
    assert diff_half == pytest.approx(diff_full / 2, rel=0.15)
    with pytest.raises(ValueError, match="strength"):
        fake_pipeline.decode(result, "effusion", half.do, 2.0)


def test_cancel_between_stages_raises_cancelled(fake_pipeline, chest_scan):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(Cancelled):
        fake_pipeline.run_sync(chest_scan, cancel=cancel)


def test_consistency_rows_measure_dice_and_area_change():
    lab = np.zeros((10, 10), np.uint8)
    lab[:, :4] = 1
    lab[:, 6:] = 2
    shrunk = lab.copy()
    shrunk[:5][shrunk[:5] == 2] = 0  # left lung loses half its area
    views = {FACTUAL: View(FACTUAL, {}, 1.0, None, np.zeros((10, 10), np.float32), labels=lab),
             "x": View("x", {"scanner": "philips"}, 1.0, None, np.zeros((10, 10), np.float32),
                       labels=shrunk)}
    (row,) = consistency_rows(views)
    assert row.dice_right == 1.0
    assert row.dice_left == pytest.approx(2 * 20 / (40 + 20))
    assert row.area_right_change == 0.0 and row.area_left_change == pytest.approx(-0.5)
    assert row.dice == pytest.approx((1.0 + 2 / 3) / 2)


def test_rows_to_csv_writes_a_header_and_one_row_per_counterfactual(tmp_path):
    rows = [ConsistencyRow("scanner", "do(scanner=philips)", 0.9, 0.9, 0.9, 0.01, math.nan)]
    text = rows_to_csv(rows, tmp_path / "c.csv", scan="s1").read_text().splitlines()
    assert text[0].startswith("scan,view,intervention,dice")
    assert len(text) == 2 and text[1].startswith("s1,scanner")


def test_metadata_names_bundles_parents_intervention_and_strength(fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    meta = result.metadata("scanner")
    assert meta["bundles"]["seg"]["fingerprint"] and meta["bundles"]["cf"]["name"] == "fake-cf"
    assert meta["strength"] == 1.0 and meta["intervention"].startswith("do(scanner=")
    assert meta["parents"] == result.parents.to_dict()


def test_run_batch_matches_single_runs(fake_pipeline):
    scans = [Scan(synthetic_chest(200, 180, seed=s), name=f"s{s}") for s in range(3)]
    batch = fake_pipeline.run_batch(scans, batch_size=2)
    single = fake_pipeline.run_sync(scans[1], interventions=None, chromap=False)
    assert [list(r.views) for r in batch] == [[FACTUAL, "scanner", "effusion"]] * 3
    assert batch[1].parents == single.parents
    np.testing.assert_allclose(batch[1].views["scanner"].image, single.views["scanner"].image,
                               atol=1e-6)
    assert batch[1].consistency[0].dice == pytest.approx(single.consistency[0].dice, abs=1e-6)


def test_pipeline_without_cf_model_segments_the_factual_view_only(fake_pipeline, chest_scan):
    fake_pipeline.cf = None
    result = fake_pipeline.run_sync(chest_scan)
    assert list(result.views) == [FACTUAL] and result.views[FACTUAL].labels is not None
    assert result.consistency == []


def test_a_partial_parent_override_keeps_the_other_inferred_parents(fake_pipeline, chest_scan):
    inferred = fake_pipeline.run_sync(chest_scan, segment=False).parents
    result = fake_pipeline.run_sync(chest_scan, parents={"sex": "male"}, segment=False)
    assert result.parents == inferred.intervene({"sex": "male"})
    assert result.parents_source == "user"


def test_real_bundles_load_and_run_with_the_counterfactual_model(cf_bundle_path, seg_bundle_path,
                                                                 chest_scan):
    from pcl_viewer.pipeline import Pipeline

    pipe = Pipeline.from_bundles(cf_bundle_path, seg_bundle_path, "cpu")
    assert set(pipe.bundles) == {"cf", "seg"} and pipe.cf.image_size == 64
    result = pipe.run_sync(chest_scan)
    assert list(result.views) == [FACTUAL, "scanner", "effusion", "both"]
    assert all(0.0 <= p <= 1.0 for p in result.probabilities.values())
    assert len(result.consistency) == 3
    scans = [chest_scan, Scan(synthetic_chest(180, 200, seed=3), name="b")]
    batch = pipe.run_batch(scans, parents=[Parents("philips", "male", "absent"), None])
    np.testing.assert_allclose(batch[0].views["effusion"].residual,
                               pipe.run_sync(scans[0], parents=batch[0].parents,
                                             segment=False).views["effusion"].residual,
                               atol=1e-4)


def test_a_missing_bundle_is_skipped_with_a_message_when_not_strict(seg_bundle_path):
    from pcl_viewer.models.bundle import BundleError
    from pcl_viewer.pipeline import Pipeline

    pipe = Pipeline.from_bundles("/nonexistent/cf", seg_bundle_path, "cpu", strict=False)
    assert pipe.cf is None and pipe.seg is not None
    assert "/nonexistent/cf" in pipe.load_errors[0]
    with pytest.raises(BundleError):
        Pipeline.from_bundles("/nonexistent/cf", seg_bundle_path, "cpu")


def test_refresh_resegments_views_changed_after_the_run(fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    fake_pipeline.decode(result, "sex", {"sex": "male"}, strength=0.5)
    fake_pipeline.refresh(result)
    assert all(v.labels is not None and v.overlay is not None for v in result.views.values())
    assert [r.view for r in result.consistency] == ["scanner", "effusion", "both", "sex"]
    assert result.chromap.n_views == 5


def test_each_counterfactual_carries_its_quality_and_the_bundles_caveat(fake_pipeline,
                                                                        chest_scan):
    fake_pipeline.cf_evaluation = {
        "targets": {"reversibility_mae": 0.02, "effectiveness": 0.9},
        "meets_targets": {"truth_effusion": False, "truth_scanner": True}}
    result = fake_pipeline.run_sync(chest_scan, segment=False)
    scanner, effusion = result.views["scanner"].quality, result.views["effusion"].quality
    # the fake residual is exactly reversible; its classifier ignores the image's scanner
    assert scanner.reversibility_mae < 1e-6 and set(scanner.readback) == {"scanner"}
    assert effusion.misses[-1] == "held-out truth_effusion"
    assert effusion.caveat.startswith("do(effusion) is a stress test")
    assert result.metadata("effusion")["quality"]["targets"] == {"reversibility_mae": 0.02,
                                                                 "effectiveness": 0.9}
    assert result.views[FACTUAL].quality is None


def test_cancel_is_polled_inside_the_chromap_stage(fake_pipeline, chest_scan):
    state = {"segmented": False, "polls": 0}

    def cancel() -> bool:  # false at the poll after the last segmentation, true at the next
        state["polls"] += state["segmented"]
        return state["polls"] >= 2

    stages = []
    with pytest.raises(Cancelled):
        for step in fake_pipeline.run(chest_scan, cancel=cancel):
            stages.append(step.stage)
            state["segmented"] = step.stage == "segment" and step.i == step.n
    assert stages[-1] == "segment" and "chromap" not in stages


def test_a_chromap_fit_cancelled_between_overlays_sets_none(fake_pipeline, chest_scan):
    result = fake_pipeline.run_sync(chest_scan, chromap=False)
    features = fake_pipeline.segment([v.image for v in result.views.values()]).features
    polls = []

    def check() -> None:  # cancelled after the first overlay
        polls.append(1)
        if len(polls) == 2:
            raise Cancelled("cancelled by the test")

    with pytest.raises(Cancelled):
        fake_pipeline._fit_chromap(result, features, "pca", check)
    assert all(v.overlay is None for v in result.views.values())  # all or none


def test_a_partial_parent_override_works_in_batches_as_in_single_runs(fake_pipeline, chest_scan):
    single = fake_pipeline.run_sync(chest_scan, parents={"sex": "male"}, segment=False)
    (batch,) = fake_pipeline.run_batch([chest_scan], parents=[{"sex": "male"}], segment=False)
    assert batch.parents == single.parents
    assert batch.parents_source == "user"


def test_counterfactual_is_the_runs_view_with_the_runs_parents(fake_pipeline, chest_scan):
    run = fake_pipeline.run_sync(chest_scan, interventions={"x": {"effusion": "present"}},
                                 strength=0.5, segment=False)
    one = fake_pipeline.counterfactual(chest_scan, {"effusion": "present"}, strength=0.5)
    assert one.parents == run.parents and one.parents_source == "inferred"
    np.testing.assert_array_equal(one.views["counterfactual"].image, run.views["x"].image)


def test_segment_gives_native_labels_model_classes_and_features(fake_pipeline, chest_scan):
    from pcl_viewer.evaluate.phantom_eval import segment_image

    seg = fake_pipeline.segment([chest_scan.image, chest_scan.image[:100]])
    s = fake_pipeline.seg_size
    assert [lab.shape for lab in seg.labels] == [chest_scan.shape, (100, chest_scan.shape[1])]
    assert seg.classes.shape == (2, s, s) and seg.features.shape[::2] == (2, s)
    # pcl evaluate's segmentation is the same computation
    np.testing.assert_array_equal(segment_image(chest_scan.image, fake_pipeline.seg, s),
                                  seg.labels[0])


def test_run_yields_each_partial_result_once_and_never_changes_it(fake_pipeline, chest_scan):
    from pcl_viewer.events import ParentsReady, TableReady, ViewReady

    events = list(fake_pipeline.run(chest_scan))
    assert sum(isinstance(e, ParentsReady) for e in events) == 1
    decoded = [e.view for e in events if isinstance(e, ViewReady) and e.part == "image"]
    assert [v.key for v in decoded] == ["scanner", "effusion", "both"]
    # the run went on to segment and map these views: the objects yielded stay as they were
    assert all(v.labels is None and v.overlay is None for v in decoded)
    labelled = [e.view for e in events if isinstance(e, ViewReady) and e.part == "labels"]
    assert all(v.labels is not None and v.overlay is None for v in labelled)
    (parents,) = [e.result for e in events if isinstance(e, ParentsReady)]
    assert list(parents.views) == [FACTUAL]
    assert isinstance(events[-1], TableReady) and len(events[-1].rows) == 3
