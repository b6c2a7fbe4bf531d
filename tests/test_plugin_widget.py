"""The dock widget under Xvfb, with the fake CF model and a random smoke U-Net.

Run: QT_API=pyside6 xvfb-run -a -s "-screen 0 1280x1024x24" python -m pytest tests/test_plugin_widget.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("napari")
pytestmark = pytest.mark.gui

from pcl_viewer_napari._layers import is_derived  # noqa: E402
from pcl_viewer_napari._reader import scan_layer_data  # noqa: E402
from pcl_viewer_napari._state import AppState  # noqa: E402
from pcl_viewer_napari._timing import run_and_measure  # noqa: E402


@pytest.fixture
def app(make_napari_viewer, fake_pipeline, chest_scan, tmp_path, monkeypatch):
    """A viewer with the widget docked, the fake pipeline installed and the chest scan open."""
    from pcl_viewer_napari import _widget

    monkeypatch.setenv("PCL_VIEWER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("PCL_VIEWER_SYNC", raising=False)
    errors: list[str] = []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    viewer = make_napari_viewer()
    widget = _widget.PCLViewerWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    widget.model_panel.cf_combo.setCurrentText("fake-cf")
    widget.model_panel.seg_combo.setCurrentText("seg-smoke")
    widget.model_panel.device_combo.setCurrentText("cpu")
    AppState.set(fake_pipeline, "fake-cf", "seg-smoke", "cpu")
    data, kwargs, _ = scan_layer_data(chest_scan)
    scan = viewer.add_image(data.copy(), **kwargs)
    widget.select_scan(scan)
    widget.errors = errors
    yield viewer, widget, scan
    AppState.pipeline = AppState.key = None


def test_sample_data_opens_a_grey_scan_the_widget_offers(app):
    viewer, widget, _ = app
    (layer,) = viewer.open_sample("pcl-viewer", "philips-effusion")
    assert layer.data.ndim == 2 and 0.0 <= layer.data.min() and layer.data.max() <= 1.0
    assert layer.metadata["true_parents"]["scanner"] == "philips"
    assert widget.scan_panel.scan_combo.findText(layer.name) >= 0


def test_each_intervention_becomes_an_aligned_layer_with_provenance(app):
    viewer, widget, scan = app
    before = scan.data.copy()
    widget.cf_panel.intervention_checks["sex"].setChecked(True)
    widget.cf_panel.diff_check.setChecked(True)
    assert run_and_measure(widget, "generate").status == "ok"
    result = widget.result_for(scan)
    names = {ly.name for ly in viewer.layers}
    h, w = np.array(scan.data.shape) * np.array(scan.scale)
    for i, key in enumerate(("scanner", "effusion", "both", "sex"), start=1):
        layer = viewer.layers[f"chest: {key}"]
        assert layer.data.shape == scan.data.shape
        assert tuple(layer.scale) == tuple(scan.scale)
        # compare layout: tile i of a 3 x 3 grid (five views), beside the scan
        row, col = divmod(i, 3)
        assert layer.translate[0] == pytest.approx(scan.translate[0] + row * (h + 0.04 * h))
        assert layer.translate[1] == pytest.approx(scan.translate[1] + col * (w + 0.04 * h))
        assert layer.metadata["bundles"]["seg"]["fingerprint"] == AppState.pipeline.bundles[
            "seg"].fingerprint
        assert layer.metadata["strength"] == 1.0 and layer.metadata["do"] == result.views[key].do
        assert f"{layer.name} diff" in names
    np.testing.assert_array_equal(scan.data, before)  # the user's layer is untouched
    widget.cf_panel.compare_check.setChecked(False)  # all views back on the scan
    assert tuple(viewer.layers["chest: both"].translate) == tuple(scan.translate)


def test_segment_adds_native_labels_a_consistency_table_and_toggleable_chromaps(app):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    labels = [ly for ly in viewer.layers if ly.metadata.get("kind") == "labels"]
    assert len(labels) == 4 and all(ly.data.shape == scan.data.shape for ly in labels)
    assert widget.analysis_panel.table.rowCount() == 3
    dice = float(widget.analysis_panel.table.item(0, 1).text())
    assert 0.0 <= dice <= 1.0
    chromaps = {ly.metadata["view"]: ly for ly in viewer.layers
                if ly.metadata.get("kind") == "chromap"}
    assert set(chromaps) == {"factual", "scanner", "effusion", "both"}
    assert all(ly.rgb and ly.data.shape == (*scan.data.shape, 3) for ly in chromaps.values())
    assert not any(ly.visible for ly in chromaps.values())  # hidden until asked for
    assert all(ly.visible for ly in labels)
    widget.set_chromap_visible("factual", True)
    widget.set_chromap_visible("both", True)
    widget.set_chromap_visible("factual", False)
    assert chromaps["both"].visible and not chromaps["factual"].visible
    chromaps["scanner"].visible = True  # toggling in the layer list updates the checkbox
    assert widget.chromap_checks["scanner"].isChecked()


def test_a_rerun_sets_each_layer_once_and_draws_the_embedding(app):
    # A view comes back after its labels and after its CHRO-map with the same arrays;
    # setting them again re-uploaded textures and redrew the canvas in the Qt thread.
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    derived = [ly for ly in viewer.layers if is_derived(ly) and ly.metadata["kind"] != "captions"]
    sets = {ly.name: 0 for ly in derived}
    for ly in derived:
        ly.events.data.connect(lambda e, name=ly.name: sets.__setitem__(name, sets[name] + 1))
    assert run_and_measure(widget, "all").status == "ok"
    assert len(derived) == 3 + 4 + 4 and set(sets.values()) == {1}, sets
    pixels = widget.analysis_panel.plot.pixels
    plot = widget.analysis_panel.plot
    assert pixels is not None and pixels.shape == (plot.size_px, plot.size_px, 3)
    assert "factual" in plot.legend.text() and "pca" in plot.legend.text()


def test_the_embedding_picture_puts_each_view_where_its_points_are():
    from pcl_viewer_napari._plot import EXTENT, VIEW_COLOURS, disc_background, render_embedding

    size = 101
    emb = np.array([[0.0, 0.0]] * 5 + [[-0.7, 0.7]] * 5)  # view 0 at the centre, 1 top-left
    img = render_embedding(emb, np.repeat([0, 1], 5), size=size, max_points=10)
    bg = disc_background(size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8
    assert 4 <= np.any(img != bg, axis=-1).sum() <= 8  # two 2 x 2 px dots
    scale = (size - 2) / (2 * EXTENT)
    for (x, y), colour in (((0.0, 0.0), VIEW_COLOURS[0]), ((-0.7, 0.7), VIEW_COLOURS[1])):
        r, c = int((EXTENT - y) * scale), int((x + EXTENT) * scale)
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)])
        assert np.abs(img[r, c] - rgb).sum() < np.abs(bg[r, c] - rgb).sum()
    assert (bg[0, 0] == bg[-1, -1]).all()  # outside the disc: the panel colour


def test_ui_queue_batches_cheap_items_and_paces_turns_until_the_last_item(qtbot, monkeypatch):
    import time

    from pcl_viewer_napari import _uiqueue

    holder = _uiqueue.QObject()
    turns: list[float] = []
    queue = _uiqueue.UiQueue(holder, after_turn=lambda: turns.append(time.perf_counter()))
    done: list[int] = []
    queue.put("inline", done.append, -1, inline=True)
    assert done == [-1] and turns == []  # inline: at once, no turn
    for i in range(5):
        queue.put(f"item {i}", done.append, i)
    qtbot.waitUntil(lambda: len(done) == 6, timeout=5000)
    assert done == [-1, 0, 1, 2, 3, 4] and len(turns) == 1  # cheap items share one turn
    assert [label for label, _ in queue.timings] == ["inline", *(f"item {i}" for i in range(5))]

    # One slow item per turn: the next turn waits until the Qt thread's share is GUI_SHARE,
    # except once the last item is queued.
    monkeypatch.setattr(_uiqueue, "TURN_BUDGET_S", 0.0)
    monkeypatch.setattr(_uiqueue, "GUI_SHARE", 0.1)
    turns.clear()
    starts: list[float] = []

    def slow(i: int) -> None:
        starts.append(time.perf_counter())
        time.sleep(0.05)
        done.append(i)

    for i in range(3):
        queue.put("slow", slow, i)
    qtbot.waitUntil(lambda: len(starts) == 2, timeout=5000)
    queue.put("last", slow, 3, last=True)
    qtbot.waitUntil(lambda: done[-1] == 3, timeout=5000)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] >= 0.05 / 0.1 - 0.02  # paced: the turn's 50 ms were a tenth of the time
    assert max(gaps[1:]) < 0.4  # hurried once the last item is queued
    assert done[-4:] == [0, 1, 2, 3]


def test_widget_runs_leave_a_core_to_the_qt_thread(qtbot, monkeypatch):
    import threading

    import torch
    from pcl_viewer_napari import _workers

    monkeypatch.delenv("PCL_VIEWER_WORKER_THREADS", raising=False)
    monkeypatch.delenv("PCL_VIEWER_THREADS", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert _workers.worker_threads() == max(1, cores - 1)
    monkeypatch.setenv("PCL_VIEWER_WORKER_THREADS", "3")
    assert _workers.worker_threads() == 3
    before = torch.get_num_threads()
    seen: list[tuple[int, int]] = []
    done: list[tuple[str, object]] = []

    def job():
        seen.append((torch.get_num_threads(), threading.get_ident()))
        yield "step"
        return "value"

    for sync in ("1", "0"):
        monkeypatch.setenv("PCL_VIEWER_SYNC", sync)
        done.clear()
        _workers.start(job, on_yield=lambda _: None, on_done=lambda *out: done.append(out))
        qtbot.waitUntil(lambda: bool(done), timeout=10_000)
        assert done == [("ok", "value")]
    assert [n for n, _ in seen] == [3, 3]
    assert seen[0][1] == threading.get_ident() != seen[1][1]  # inline, then a worker thread
    assert torch.get_num_threads() == before  # the Qt thread's count is left alone


def test_strength_slider_updates_counterfactuals_live_and_labels_extrapolation(app, qtbot):
    viewer, widget, scan = app
    assert run_and_measure(widget, "generate").status == "ok"
    key = "effusion"
    full = viewer.layers[f"chest: {key}"].data.copy()
    widget.cf_panel.strength_slider.setValue(50)
    layer = widget.builder.get(scan, key, "image")
    qtbot.waitUntil(lambda: layer.metadata["strength"] == 0.5, timeout=3000)
    # attenuated, not extrapolated (only a strength above 1 goes beyond the model)
    assert layer.name == "chest: effusion x0.5" and layer.metadata["extrapolated"] is False
    diff_half = np.abs(layer.data - scan.data).mean()
    assert diff_half == pytest.approx(np.abs(full - scan.data).mean() / 2, rel=0.2)


def test_cancel_mid_run_stops_between_stages_and_leaves_consistent_state(app, qtbot):
    viewer, widget, scan = app
    cf = AppState.pipeline.cf
    residual = cf.residual
    before = {ly.name for ly in viewer.layers}

    def residual_then_cancel(*args, **kwargs):
        widget._cancel.set()  # the user presses Cancel while the first decode runs
        return residual(*args, **kwargs)

    cf.residual = residual_then_cancel
    try:
        timing = run_and_measure(widget, "all")
    finally:
        cf.residual = residual
    assert timing.status == "cancelled"
    qtbot.waitUntil(lambda: widget._rollback is None, timeout=10_000)
    assert widget.result_for(scan) is None and not widget.running
    assert widget.analysis_panel.run_all_btn.isEnabled()
    assert not widget.run_bar.cancel_btn.isEnabled()
    # the scan had no finished result: the cancelled run's layers are gone, panels empty
    assert [ly for ly in viewer.layers if is_derived(ly)] == []
    assert {ly.name for ly in viewer.layers} == before
    assert widget.analysis_panel.table.rowCount() == 0
    assert widget.scan_panel.prob_labels["sex"].text() == "–"
    assert run_and_measure(widget, "all").status == "ok"  # and the next run works


def test_a_broken_file_gives_a_notification_and_loses_nothing(app, tmp_path):
    viewer, widget, scan = app
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    names = [ly.name for ly in viewer.layers]
    assert widget.open_scan(bad) == []
    assert widget.errors and "broken.png" in widget.errors[-1]
    with pytest.raises(Exception, match="broken.png"):
        viewer.open(str(bad), plugin="pcl-viewer")
    assert [ly.name for ly in viewer.layers] == names and widget.scan_layer() is scan


def test_a_failing_run_is_a_readable_notification_and_changes_no_layer(app):
    viewer, widget, scan = app
    AppState.pipeline = AppState.key = None
    widget.model_panel.cf_combo.setCurrentText("/nonexistent/cf")
    widget.model_panel.seg_combo.setCurrentText("/nonexistent/seg")
    names = [ly.name for ly in viewer.layers]
    assert run_and_measure(widget, "all").status == "error"
    assert "no model could be loaded" in widget.errors[-1]
    assert [ly.name for ly in viewer.layers] == names


def test_settings_are_remembered_and_export_writes_csv_and_layers(app, tmp_path):
    viewer, widget, scan = app
    widget.analysis_panel.reducer_combo.setCurrentText("pca")
    assert run_and_measure(widget, "all").status == "ok"
    saved = json.loads((tmp_path / "config" / "settings.json").read_text())
    assert saved == {"cf_bundle": "fake-cf", "seg_bundle": "seg-smoke", "device": "cpu",
                     "reducer": "pca"}
    files = widget.export(tmp_path / "out")
    names = {f.name for f in files}
    assert "consistency.csv" in names and "provenance.json" in names
    assert sum(n.endswith(".nii.gz") for n in names) == 4
    csv = (tmp_path / "out" / "consistency.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[0].startswith("scan,view,intervention,dice")


def test_segment_lungs_menu_command_segments_the_selected_scan(app):
    from pcl_viewer_napari._commands import segment_lungs

    viewer, widget, scan = app
    viewer.layers.selection.active = scan
    os.environ["PCL_VIEWER_SYNC"] = "1"
    try:
        segment_lungs(viewer)
    finally:
        del os.environ["PCL_VIEWER_SYNC"]
    assert widget.last_outcome[0] == "ok"
    labels = [ly for ly in viewer.layers if ly.metadata.get("kind") == "labels"]
    assert [ly.name for ly in labels] == ["chest: scan lungs"]


def test_heartbeat_gap_during_a_full_run(app):
    viewer, widget, scan = app
    run_and_measure(widget, "all")  # warm-up
    timing = run_and_measure(widget, "all")
    print(f"\nheartbeat largest gap {timing.max_gap_ms:.0f} ms over {timing.seconds:.2f} s")
    assert timing.status == "ok"
    # The app's target: no heartbeat gap over TARGET_GAP_MS on a quiet machine (measured by
    # ``python -m pcl_viewer_napari.bench``). Tests share a loaded 2-core machine, where the scheduler alone
    # can hold the Qt thread off its core for a few time slices, so they allow LOAD_FACTOR
    # times the target (measured here under a load average of 4: 58 ms); a frozen window
    # would show the whole run, seconds, as one gap.
    TARGET_GAP_MS, LOAD_FACTOR = 100, 5
    assert timing.max_gap_ms <= TARGET_GAP_MS * LOAD_FACTOR


def test_the_widget_docked_from_the_plugins_menu_works_through_napari_proxies(
        make_napari_viewer, fake_pipeline, chest_scan, tmp_path, monkeypatch):
    from pcl_viewer_napari._widget import WIDGET_NAME

    monkeypatch.setenv("PCL_VIEWER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("PCL_VIEWER_SYNC", "1")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("pcl-viewer", WIDGET_NAME)
    mp = widget.model_panel
    for combo, text in ((mp.cf_combo, "fake-cf"), (mp.seg_combo, "seg-smoke"),
                        (widget.model_panel.device_combo, "cpu")):
        combo.setCurrentText(text)
    AppState.set(fake_pipeline, "fake-cf", "seg-smoke", "cpu")
    try:
        data, kwargs, _ = scan_layer_data(chest_scan)
        widget.select_scan(viewer.add_image(data, **kwargs))
        assert widget.run("all") and widget.last_outcome[0] == "ok"
        assert widget.result_for(widget.scan_layer()) is not None  # found again via a proxy
        assert widget.builder.get(widget.scan_layer(), "both", "labels") is not None
    finally:
        AppState.pipeline = AppState.key = None


def test_segment_lungs_is_offered_under_layers_segment(app):
    from napari._app_model import get_app_model

    items = get_app_model().menus.get_menu("napari/layers/segment")
    ids = [getattr(getattr(i, "command", None), "id", None) for i in items]
    assert "pcl-viewer.segment_lungs" in ids



def test_launcher_without_bundles_shows_a_sample_and_names_the_missing_bundles(
        qapp, tmp_path, monkeypatch, capsys):
    from pcl_viewer_napari import launcher

    for var, sub in (("PCL_VIEWER_RESOURCES", "res"), ("PCL_VIEWER_CACHE", "cache"),
                     ("PCL_VIEWER_CONFIG_DIR", "cfg"), ("PCL_VIEWER_USER_MODELS", "um")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    AppState.pipeline = AppState.key = None
    shot = tmp_path / "window.png"
    assert launcher.main(["--screenshot", str(shot)]) == 1  # nothing to run, but it opens
    err = capsys.readouterr().err
    assert "No counterfactual bundle 'cf-cpu'" in err and "No segmentation bundle 'seg-cpu'" in err
    assert shot.stat().st_size > 10_000


def _second_scan(viewer, widget, name="other"):
    from tests.conftest import synthetic_chest

    layer = viewer.add_image(synthetic_chest(200, 240, seed=5), name=name)
    widget.select_scan(layer)
    return layer


def _panel(widget):
    """What the panels show: parents, table rows, CHRO-map toggles, plot drawn."""
    return ({n: lab.text() for n, lab in widget.scan_panel.prob_labels.items()},
            widget.analysis_panel.table.rowCount(),
            sorted(widget.chromap_checks), widget.analysis_panel.plot.pixels is not None)


def test_switching_scans_shows_that_scans_last_result_or_nothing(app):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    shown = _panel(widget)
    assert shown[1] == 3 and shown[2] == ["both", "effusion", "factual", "scanner"] and shown[3]
    _second_scan(viewer, widget)
    assert _panel(widget) == ({n: "–" for n in widget.scan_panel.prob_labels}, 0, [], False)
    widget.select_scan(scan)
    assert _panel(widget) == shown


def test_cancel_on_another_scan_keeps_each_scans_panel_and_layers(app, qtbot):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    first_layers = {ly.name: ly.data for ly in viewer.layers if is_derived(ly)}
    other = _second_scan(viewer, widget)
    seg = AppState.pipeline.seg
    features = seg.features

    def features_then_cancel(*args, **kwargs):  # Cancel while the first view is segmented
        widget._cancel.set()
        return features(*args, **kwargs)

    seg.features = features_then_cancel
    try:
        assert run_and_measure(widget, "all").status == "cancelled"
    finally:
        seg.features = features
    qtbot.waitUntil(lambda: widget._rollback is None, timeout=10_000)
    assert _panel(widget) == ({n: "–" for n in widget.scan_panel.prob_labels}, 0, [], False)
    assert widget.builder.layers_of(other) == []  # nothing half-made for the other scan
    now = {ly.name: ly.data for ly in viewer.layers if is_derived(ly)}
    assert now.keys() == first_layers.keys()
    assert all(now[k] is first_layers[k] for k in now)  # the first scan's layers untouched
    widget.select_scan(scan)
    assert widget.analysis_panel.table.rowCount() == 3


def test_a_rerun_never_overwrites_an_edited_lungs_layer_and_undo_still_works(app):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    lungs = widget.builder.get(scan, "factual", "labels")
    model_labels = np.array(lungs.data)
    lungs.paint((10, 10), 2)  # the user corrects the segmentation (undoable)
    edited = np.array(lungs.data)
    assert (edited != model_labels).any()
    assert run_and_measure(widget, "segment").status == "ok"
    np.testing.assert_array_equal(lungs.data, edited)  # the edit is kept as it was
    new = widget.builder.get(scan, "factual", "labels")
    assert new is not lungs and new.name == "chest: scan lungs (new)"
    np.testing.assert_array_equal(new.data, model_labels)  # same scan, same model
    lungs.undo()
    np.testing.assert_array_equal(lungs.data, model_labels)


def test_cancel_takes_effect_within_half_a_second(app, qtbot):
    import threading

    from tests.conftest import synthetic_chest

    viewer, widget, _ = app
    big = viewer.add_image(synthetic_chest(1024, 1024, seed=2), name="big")
    widget.select_scan(big)
    seg = AppState.pipeline.seg
    features, segmenting = seg.features, threading.Event()

    def slow_features(*args, **kwargs):
        # A stage that runs until Cancel is pressed, then needs 0.15 s more before the next
        # poll (the longest step between two polls of the shipped models at 2048 px, one
        # CHRO-map overlay, took 0.1-0.15 s on a quiet machine).
        import time

        segmenting.set()
        widget._cancel.wait(30)
        time.sleep(0.15)
        return features(*args, **kwargs)

    seg.features = slow_features
    outcome: list[str] = []
    widget.finished.connect(outcome.append)
    try:
        assert widget.run("all")
        qtbot.waitUntil(segmenting.is_set, timeout=30_000)
        widget.cancel()
        qtbot.waitUntil(lambda: bool(outcome), timeout=10_000)
    finally:
        seg.features = features
    qtbot.waitUntil(lambda: widget.rollback_seconds is not None, timeout=30_000)
    print(f"\ncancel latency {1000 * widget.cancel_latency:.0f} ms (controls back, panels "
          f"consistent), layers rolled back after {1000 * widget.rollback_seconds:.0f} ms")
    assert outcome == ["cancelled"] and widget.cancel_latency < 0.5
    assert widget.builder.layers_of(big) == []


def test_the_activity_dock_shows_the_runs_progress(app, monkeypatch):
    from napari.utils import progress

    viewer, widget, _ = app
    closed: list[tuple[str, int, int]] = []
    close = progress.close
    monkeypatch.setattr(progress, "close", lambda self: (
        closed.append((self.desc, self.n, self.total)), close(self))[1])
    assert run_and_measure(widget, "all").status == "ok"
    assert closed == [("pcl-viewer: done: ", 1000, 1000)]  # filled, then closed at the end
    assert widget._nprogress is None


def test_a_banner_stays_on_a_photo_and_on_noise_but_not_on_a_phantom_scan(app, tmp_path):
    from skimage import data

    from pcl_viewer.paths import models_dir
    from pcl_viewer.pipeline import Pipeline
    from tests.test_domain import phantom_scans

    if not (models_dir() / "cf-cpu").is_dir():
        pytest.skip("needs the shipped cf-cpu bundle")
    viewer, widget, scan = app
    pipe = Pipeline.from_bundles("cf-cpu", None, "cpu")
    if not pipe.domain.calibrated:
        pytest.skip(f"domain check uncalibrated for the shipped cf-cpu: {pipe.domain.reason}")
    widget.model_panel.cf_combo.setCurrentText("cf-cpu")
    AppState.set(pipe, "cf-cpu", "seg-smoke", "cpu")
    rng = np.random.default_rng(0)
    photo = viewer.add_image(data.camera().astype(np.float32) / 255.0, name="camera")
    noise = viewer.add_image(rng.random((300, 300)).astype(np.float32), name="noise")
    # the most typical of five fresh phantom scans in the look the check was calibrated on
    scans = phantom_scans(tmp_path / "ph", 5, seed=60_002,
                          regime=pipe.domain.calibration.info.get("regime"))
    typical = max(scans, key=lambda s: pipe.run_sync(s, interventions=(),
                                                     segment=False).domain_score)
    phantom = viewer.add_image(typical.image, name="phantom")
    banners = {}
    for layer in (photo, noise, phantom):
        widget.select_scan(layer)
        assert run_and_measure(widget, "parents").status == "ok"
        banners[layer.name] = (not widget.banner.isHidden(), widget.banner.out_of_domain)
    assert banners == {"camera": (True, True), "noise": (True, True),
                       "phantom": (False, False)}
    assert widget.banner.text() == ""
    widget.select_scan(noise)  # the banner follows the scan shown
    assert not widget.banner.isHidden() and widget.banner.text().startswith("OUT OF DOMAIN")
    widget.cf_panel.intervention_checks["effusion"].setChecked(False)
    widget.cf_panel.intervention_checks["both"].setChecked(False)
    assert run_and_measure(widget, "generate").status == "ok"
    assert widget.builder.get(noise, "scanner", "image").metadata["out_of_domain"] is True


def test_linked_chromap_marks_a_clicked_pixel_and_its_feature_in_every_view(app):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    result = widget.result_for(scan)
    row, col = 128, 60  # a pixel of the scan (tile 0)
    world = np.asarray(scan.translate) + np.asarray(scan.scale) * (row, col)
    assert widget.link_at(world) == ("factual", row, col)
    linked = {k: widget.builder.get(scan, k, "linked") for k in result.views}
    assert all(ly is not None and ly.data.shape == scan.data.shape for ly in linked.values())
    assert linked["factual"].data[row, col] == 1  # the clicked pixel is in its feature
    assert 0 < linked["factual"].data.mean() < 0.5
    np.testing.assert_allclose(widget.analysis_panel.plot.marked[0], result.chromap.embedding[
        result.chromap.index_of(0, row, col)])
    # the same pixel in the scanner tile is found through that tile's offset
    tile = np.asarray(widget.builder.offset(scan, result, "scanner"))
    assert widget.link_at(tile + np.asarray(scan.scale) * (row, col)) == ("scanner", row, col)

    widget.analysis_panel.plot.brushed.emit((0.0, 0.0), (1.0, 1.0))  # brushing a quarter of the disc
    expected = result.chromap.select_region((0.0, 0.0), (1.0, 1.0))
    for v, key in enumerate(result.views):
        np.testing.assert_array_equal(linked[key].data.astype(bool), result.chromap.mask_native(
            expected[v], scan.data.shape))
    assert widget.analysis_panel.plot.box == ((0.0, 0.0), (1.0, 1.0))


def test_each_counterfactuals_quality_and_the_effusion_caveat_are_shown(app):
    viewer, widget, scan = app
    AppState.pipeline.cf_evaluation = {  # as in a CF bundle card's held-out evaluation
        "targets": {"reversibility_mae": 0.02, "effectiveness": 0.9},
        "meets_targets": {"truth_effusion": False, "truth_scanner": True}}
    assert run_and_measure(widget, "generate").status == "ok"
    lines = widget.cf_panel.quality_label.text().split("<br>")
    assert [line.split("</b>")[0] for line in lines if line.startswith("<b>")] == [
        "<b>scanner", "<b>effusion", "<b>both"]
    caveats = [line for line in lines if "stress test" in line]
    assert len(caveats) == 2 and all("truth_effusion" in c for c in caveats[:1])
    AppState.pipeline.cf_evaluation = {"targets": {"reversibility_mae": 0.02},
                                       "meets_targets": {"truth_effusion": True}}
    AppState.pipeline._qualities.clear()
    assert run_and_measure(widget, "generate").status == "ok"
    assert "stress test" not in widget.cf_panel.quality_label.text()  # targets met: no caveat


def test_export_in_the_background_writes_the_same_files_off_the_qt_thread(app, qtbot, tmp_path):
    import threading

    from pcl_viewer_napari import _export

    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    threads: list[int] = []
    export_scan = _export.export_scan

    def recording(*args):
        threads.append(threading.get_ident())
        return export_scan(*args)

    _export.export_scan = recording
    try:
        widget.export(tmp_path / "bg", background=True)
        qtbot.waitUntil(lambda: widget.run_bar.status.text().startswith("Exported"), timeout=30_000)
    finally:
        _export.export_scan = export_scan
    assert threads and threads[0] != threading.get_ident()
    written = sorted(p.name for p in (tmp_path / "bg").iterdir())
    assert written == sorted(p.name for p in widget.export(tmp_path / "fg"))
