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
    widget.cf_combo.setCurrentText("fake-cf")
    widget.seg_combo.setCurrentText("seg-smoke")
    widget.device_combo.setCurrentText("cpu")
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
    assert widget.scan_combo.findText(layer.name) >= 0


def test_each_intervention_becomes_an_aligned_layer_with_provenance(app):
    viewer, widget, scan = app
    before = scan.data.copy()
    widget.intervention_checks["sex"].setChecked(True)
    widget.diff_check.setChecked(True)
    assert run_and_measure(widget, "generate").status == "ok"
    result = widget.result_for(scan)
    names = {ly.name for ly in viewer.layers}
    for key in ("scanner", "effusion", "both", "sex"):
        layer = viewer.layers[f"chest [{result.views[key].name}]"]
        assert layer.data.shape == scan.data.shape
        assert tuple(layer.scale) == tuple(scan.scale)
        assert tuple(layer.translate) == tuple(scan.translate)
        assert layer.metadata["bundles"]["seg"]["fingerprint"] == AppState.pipeline.bundles[
            "seg"].fingerprint
        assert layer.metadata["strength"] == 1.0 and layer.metadata["do"] == result.views[key].do
        assert f"{layer.name} difference" in names
    scanner = result.views["scanner"].parents.scanner
    assert f"chest [do(scanner={scanner})]" in names
    np.testing.assert_array_equal(scan.data, before)  # the user's layer is untouched


def test_segment_adds_native_labels_a_consistency_table_and_toggleable_chromaps(app):
    viewer, widget, scan = app
    assert run_and_measure(widget, "all").status == "ok"
    labels = [ly for ly in viewer.layers if ly.metadata.get("kind") == "labels"]
    assert len(labels) == 4 and all(ly.data.shape == scan.data.shape for ly in labels)
    assert widget.table.rowCount() == 3
    dice = float(widget.table.item(0, 1).text())
    assert 0.0 <= dice <= 1.0
    chromaps = {ly.metadata["view"]: ly for ly in viewer.layers
                if ly.metadata.get("kind") == "chromap"}
    assert set(chromaps) == {"factual", "scanner", "effusion", "both"}
    assert all(ly.rgb and ly.data.shape == (*scan.data.shape, 3) for ly in chromaps.values())
    widget.set_chromap_visible("both", True)
    widget.set_chromap_visible("factual", False)
    assert chromaps["both"].visible and not chromaps["factual"].visible
    chromaps["scanner"].visible = True  # toggling in the layer list updates the checkbox
    assert widget.chromap_checks["scanner"].isChecked()


def test_strength_slider_updates_counterfactuals_live_and_labels_extrapolation(app, qtbot):
    viewer, widget, scan = app
    assert run_and_measure(widget, "generate").status == "ok"
    key = "effusion"
    name = widget.result_for(scan).views[key].name
    full = viewer.layers[f"chest [{name}]"].data.copy()
    widget.strength_slider.setValue(50)
    layer = widget.builder.get(scan, key, "image")
    qtbot.waitUntil(lambda: layer.metadata["strength"] == 0.5, timeout=3000)
    assert "extrapolated" in layer.name and layer.metadata["extrapolated"] is True
    diff_half = np.abs(layer.data - scan.data).mean()
    assert diff_half == pytest.approx(np.abs(full - scan.data).mean() / 2, rel=0.2)


def test_cancel_mid_run_stops_between_stages_and_leaves_consistent_state(app):
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
    assert widget.result_for(scan) is None and not widget.running
    assert widget.run_all_btn.isEnabled() and not widget.cancel_btn.isEnabled()
    derived = [ly for ly in viewer.layers if is_derived(ly)]
    assert [ly.metadata["kind"] for ly in derived] == ["image"]  # one finished view, no labels
    assert derived[0].data.shape == scan.data.shape and derived[0].metadata["strength"] == 1.0
    assert before <= {ly.name for ly in viewer.layers}
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
    widget.cf_combo.setCurrentText("/nonexistent/cf")
    widget.seg_combo.setCurrentText("/nonexistent/seg")
    names = [ly.name for ly in viewer.layers]
    assert run_and_measure(widget, "all").status == "error"
    assert "no model could be loaded" in widget.errors[-1]
    assert [ly.name for ly in viewer.layers] == names


def test_settings_are_remembered_and_export_writes_csv_and_layers(app, tmp_path):
    viewer, widget, scan = app
    widget.reducer_combo.setCurrentText("pca")
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
    assert [ly.name for ly in labels] == ["chest lungs"]


def test_heartbeat_gap_during_a_full_run(app):
    viewer, widget, scan = app
    run_and_measure(widget, "all")  # warm-up
    timing = run_and_measure(widget, "all")
    print(f"\nheartbeat largest gap {timing.max_gap_ms:.0f} ms over {timing.seconds:.2f} s")
    assert timing.status == "ok"
    # Lenient: on a loaded 2-core CI box one layer draw (software GL) can take a second;
    # a frozen window would show the whole run as one gap. The 100 ms target is in bench.
    assert timing.max_gap_ms < 3000


def test_the_widget_docked_from_the_plugins_menu_works_through_napari_proxies(
        make_napari_viewer, fake_pipeline, chest_scan, tmp_path, monkeypatch):
    from pcl_viewer_napari._widget import WIDGET_NAME

    monkeypatch.setenv("PCL_VIEWER_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("PCL_VIEWER_SYNC", "1")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("pcl-viewer", WIDGET_NAME)
    for combo, text in ((widget.cf_combo, "fake-cf"), (widget.seg_combo, "seg-smoke"),
                        (widget.device_combo, "cpu")):
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
