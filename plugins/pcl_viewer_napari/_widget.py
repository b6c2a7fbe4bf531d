"""The dock widget: counterfactuals by scanner or pathology, lung segmentation, CHRO-maps.

Model work runs in :mod:`._workers` (a napari generator worker); this module
reads the controls (:mod:`._panels`), starts a run, shows progress and hands
partial results, a few per event-loop turn (:mod:`._uiqueue`), to
:class:`._layers.LayerBuilder`. Nothing here computes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import napari
import numpy as np
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import QCheckBox, QFileDialog, QFrame, QScrollArea, QVBoxLayout, QWidget

from pcl_viewer.data.scan import Scan
from pcl_viewer.events import (
    RESULT_EVENTS,
    DomainReady,
    ParentsReady,
    QualityReady,
    Step,
    TableReady,
    ViewReady,
)
from pcl_viewer.pipeline import FACTUAL, STAGES, PipelineResult, View
from pcl_viewer_napari import _compat, _workers  # noqa: F401  (_compat: the None guard)
from pcl_viewer_napari._layers import (
    LayerBuilder,
    is_derived,
    layer_key,
    prewarm_labels,
    scan_from_layer,
)
from pcl_viewer_napari._panels import (
    AnalysisPanel,
    CounterfactualPanel,
    DomainBanner,
    ModelPanel,
    RunBar,
    ScanPanel,
)
from pcl_viewer_napari._settings import Settings
from pcl_viewer_napari._state import AppState
from pcl_viewer_napari._uiqueue import UiQueue

WIDGET_NAME = "Counterfactuals & CHRO-map"
ALL_STAGES = ("load", *STAGES)
# The progress rides along with the partial results' turns (one repaint for both); this
# timer covers stretches without results. See _uiqueue for why repaints are rationed.
PROGRESS_INTERVAL_MS = 500
DOCK_WIDTH = 440  # px: the panels' controls, table and embedding plot side by side


@dataclass(frozen=True)
class RunRequest:
    """What one run asks of the pipeline, read from the panels when it starts.

    ``bundles`` is ``(cf bundle, seg bundle, device)``; ``parents`` the parents the user
    set (None: all inferred); the rest are :meth:`Pipeline.run`'s arguments.
    """

    bundles: tuple[str, str, str]
    parents: dict[str, str] | None
    interventions: tuple[str, ...]
    strength: float
    segment: bool
    chromap: bool
    reducer: str


class PCLViewerWidget(QWidget):
    """Dock widget of the pcl-viewer plugin (one per viewer).

    ``finished`` is emitted with ``"ok"``, ``"cancelled"`` or ``"error"`` when a run ends.
    """

    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.settings = Settings.load()
        self.builder = LayerBuilder(napari_viewer)
        self.results: dict[str, tuple[Any, PipelineResult]] = {}
        self.worker = None
        self.last_outcome: tuple[str, Any] | None = None
        self.last_run_seconds: float | None = None
        self._cancel = threading.Event()
        self._running_layer = None
        self._pending: PipelineResult | None = None
        self._last_step: Step | None = None
        self._t0 = 0.0
        self._before: dict = {}  # the running scan's layers before the run (for rollback)
        self._tiled: set[str] = set()  # scans whose compare tiles the camera has been fitted to
        self._nprogress = None  # napari.utils.progress of the run (activity dock)
        self.cancel_latency: float | None = None  # seconds from Cancel to the run's end
        self._cancel_t = 0.0
        self._build_ui()
        self.queue = UiQueue(self, after_turn=self._show_progress)
        # Timer objects, not QTimer.singleShot(ms, callable): see _compat.
        self._strength_timer = QTimer(self, singleShot=True, interval=40)
        self._strength_timer.timeout.connect(self._apply_strength)
        self._progress_timer = QTimer(self, interval=PROGRESS_INTERVAL_MS)
        self._progress_timer.timeout.connect(self._show_progress)
        self._rollback: tuple[Any, dict] | None = None
        self._rollback_timer = QTimer(self, singleShot=True, interval=0)
        self._rollback_timer.timeout.connect(self._finish_rollback)
        self.rollback_seconds: float | None = None  # from Cancel to the layers rolled back
        self._prewarm_timer = QTimer(self, singleShot=True, interval=0)
        self._prewarm_timer.timeout.connect(prewarm_labels)
        self._prewarm_timer.start()
        self.viewer.layers.events.inserted.connect(self._refresh_scans)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_scans()

    # --------------------------------------------------------------- UI ---

    def _build_ui(self) -> None:
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = scroll = QScrollArea(widgetResizable=True)
        scroll.setFrameShape(QFrame.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        outer.addWidget(scroll)
        inner = QWidget()
        scroll.setWidget(inner)
        root = QVBoxLayout(inner)
        root.setContentsMargins(4, 4, 4, 4)
        root.setSpacing(4)
        s = self.settings
        self.banner = DomainBanner()
        root.addWidget(self.banner)
        self.model_panel = ModelPanel(s.cf_bundle, s.seg_bundle, s.device)
        self.scan_panel = ScanPanel()
        self.cf_panel = CounterfactualPanel()
        self.analysis_panel = AnalysisPanel(s.reducer)
        for panel in (self.model_panel, self.scan_panel, self.cf_panel, self.analysis_panel):
            root.addWidget(panel)
        self.scan_panel.open_requested.connect(self._open_dialog)
        self.scan_panel.infer_btn.clicked.connect(lambda: self.run("parents"))
        self.cf_panel.generate_btn.clicked.connect(lambda: self.run("generate"))
        self.analysis_panel.segment_btn.clicked.connect(lambda: self.run("segment"))
        self.analysis_panel.run_all_btn.clicked.connect(lambda: self.run("all"))
        self.cf_panel.strength_slider.valueChanged.connect(lambda _: self._strength_timer.start())
        self.scan_panel.scan_combo.currentTextChanged.connect(lambda _: self.show_result_of())
        self.cf_panel.compare_check.toggled.connect(self._set_compare)
        self.analysis_panel.plot.brushed.connect(lambda lo, hi: self.link_region(lo, hi))
        self.viewer.mouse_drag_callbacks.append(self._on_canvas_click)

        self.run_bar = RunBar()
        root.addWidget(self.run_bar)
        root.addStretch(1)
        self.run_bar.cancel_btn.clicked.connect(self.cancel)
        self.run_bar.export_btn.clicked.connect(self._export_dialog)
        # the dock as wide as its content (the scroll area only scrolls vertically)
        self.setMinimumWidth(max(inner.sizeHint().width(), DOCK_WIDTH)
                             + scroll.verticalScrollBar().sizeHint().width())
        mp, sp, cp, ap = self.model_panel, self.scan_panel, self.cf_panel, self.analysis_panel
        self._busy_widgets = [mp.cf_combo, mp.seg_combo, mp.device_combo, sp.scan_combo,
                              sp.infer_btn, cp.generate_btn, ap.segment_btn, ap.run_all_btn,
                              cp.strength_slider, ap.reducer_combo, self.run_bar.export_btn,
                              *sp.parent_combos.values()]

    @property
    def chromap_checks(self) -> dict[str, QCheckBox]:
        """The CHRO-map layer toggles of the last finished run, by view key."""
        return self.analysis_panel.chromap_checks

    @property
    def ui_timings(self) -> list[tuple[str, float]]:
        """``(item, seconds)`` of each partial result handled in the Qt thread this run."""
        return self.queue.timings

    # ------------------------------------------------------------ state ---

    @property
    def running(self) -> bool:
        return self._running_layer is not None

    def _refresh_scans(self, *_: Any) -> None:
        before = self.scan_panel.scan_combo.currentText()
        self.scan_panel.set_scans([
            ly.name for ly in self.viewer.layers
            if isinstance(ly, napari.layers.Image) and not is_derived(ly)
            and not ly.rgb and ly.ndim == 2])
        if self.scan_panel.scan_combo.currentText() != before and not self.running:
            self.show_result_of()

    def _on_layer_removed(self, event) -> None:
        gone = event.value
        self.results.pop(layer_key(gone), None)
        self._refresh_scans()

    def show_result_of(self, layer=None) -> None:
        """Show the last finished result of ``layer`` (default: the scan chosen) in every
        panel (parents, domain banner, counterfactual quality, table, CHRO-map toggles and
        plot), or empty panels when it has none. Nothing of another scan stays."""
        if self.running:
            return
        layer = layer if layer is not None else self.scan_layer()
        result = self.result_for(layer)
        self.scan_panel.show_parents(result)
        self.banner.show_domain(result.domain if result is not None else None)
        self.cf_panel.show_quality(result)
        if result is None:
            self.analysis_panel.clear()
            self.run_bar.status.setText("Ready" if layer is None else
                                f"{layer.name}: no result yet (Run all)")
            return
        self.analysis_panel.show_table(result.consistency)
        chromaps = {key: self.builder.get(layer, key, "chromap") for key in result.views}
        self.analysis_panel.show_chromap_controls(
            result, {k: ly for k, ly in chromaps.items() if ly is not None})

    # ------------------------------------------------------ linked CHRO-map ---

    def _on_canvas_click(self, viewer, event) -> None:
        if self.analysis_panel.link_check.isChecked() and event.type == "mouse_press":
            self.link_at(event.position)

    def _view_at(self, position) -> tuple[str, float, float] | None:
        """``(view key, row, col)`` of the native pixel under a world ``position`` (any tile)."""
        layer = self.scan_layer()
        result = self.result_for(layer)
        if result is None:
            return None
        scale = np.asarray(layer.scale[-2:], np.float64)
        h, w = layer.data.shape[-2:]
        for key in result.views:
            origin = np.asarray(self.builder.offset(layer, result, key)[-2:], np.float64)
            row, col = (np.asarray(position[-2:], np.float64) - origin) / scale
            if 0 <= row < h and 0 <= col < w:
                return key, float(row), float(col)
        return None

    def link_at(self, position) -> tuple[str, float, float] | None:
        """Link the pixel under world ``position``: its point is marked in the embedding plot
        and the pixels of the same feature (nearby in the embedding) in every view are
        highlighted. Returns the ``(view, row, col)`` hit, or None."""
        hit = self._view_at(position)
        result = self.result_for(self.scan_layer())
        if hit is None or result is None or result.chromap is None:
            return None
        key, row, col = hit
        cm = result.chromap
        idx = cm.index_of(list(result.views).index(key), row, col)
        self._show_linked(result, cm.select_near(idx))
        self.analysis_panel.plot.mark(cm.embedding[idx][None])
        self.run_bar.status.setText(f"linked: {key} pixel ({row:.0f}, {col:.0f}) and its "
                                    "feature in "
                            "every view")
        return hit

    def link_region(self, lo, hi) -> None:
        """Highlight the pixels of every view whose embedding lies in the box ``lo``..``hi``."""
        result = self.result_for(self.scan_layer())
        if result is None or result.chromap is None:
            return
        self._show_linked(result, result.chromap.select_region(lo, hi))
        self.analysis_panel.plot.mark(None, box=(tuple(lo), tuple(hi)))

    def _show_linked(self, result: PipelineResult, masks) -> None:
        layer = self.scan_layer()
        cm = result.chromap
        native = {key: cm.mask_native(masks[v], view.image.shape)
                  for v, (key, view) in enumerate(result.views.items())}
        self.builder.show_linked(layer, result, native)

    def _set_compare(self, on: bool) -> None:
        self.builder.compare = on
        for scan_layer, result in self.results.values():
            self.builder.set_compare(scan_layer, result, on)
            if len(result.views) > 1:
                self.builder.show_captions(scan_layer, result)
        self.viewer.reset_view()

    def scan_layer(self):
        """The image layer chosen as the scan, or None."""
        name = self.scan_panel.scan_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def select_scan(self, layer) -> None:
        self._refresh_scans()
        if layer is not None and self.scan_panel.scan_combo.findText(layer.name) >= 0:
            self.scan_panel.scan_combo.setCurrentText(layer.name)

    def result_for(self, layer) -> PipelineResult | None:
        entry = self.results.get(layer_key(layer)) if layer is not None else None
        return entry[1] if entry else None

    # -------------------------------------------------------------- run ---

    def run(self, mode: str = "all", interventions: tuple[str, ...] | None = None) -> bool:
        """Start a run: ``parents``, ``generate`` (counterfactuals), ``segment`` or ``all``.

        Returns False (with a notification) when nothing can start.
        """
        if self.running:
            show_warning("pcl-viewer: a run is already in progress")
            return False
        layer = self.scan_layer()
        if layer is None:
            show_warning("pcl-viewer: open a scan first (File > Open, or File > Open Sample)")
            return False
        try:
            scan = scan_from_layer(layer)
        except ValueError as exc:
            show_error(f"pcl-viewer: {exc}")
            return False
        self._finish_rollback()  # a cancelled run's layers are gone before the next starts
        request = self._request(mode, interventions)
        self._remember_settings()
        self._cancel.clear()
        self.cancel_latency = self.rollback_seconds = None
        self._cancel_t = 0.0
        self.queue.timings = []
        self._before = self.builder.snapshot(layer)
        done = self.result_for(layer)
        self.builder.tiles = max(len(done.views) if done else 0,
                                 1 + len(request.interventions))
        self._running_layer = layer
        self._set_busy(True)
        self.run_bar.progress.setValue(0)
        self.run_bar.status.setText(f"{mode}: starting…")
        self._last_step = None
        self._start_activity(mode)
        self._progress_timer.start()
        self._t0 = time.perf_counter()
        self.worker = _workers.start(lambda: self._job(scan, request),
                                     on_yield=self._enqueue_step, on_done=self._enqueue_done)
        return True

    def _request(self, mode: str, interventions: tuple[str, ...] | None) -> RunRequest:
        """The run ``mode`` asks for, read from the panels (in the Qt thread)."""
        if interventions is None:
            interventions = self.cf_panel.interventions()
        segment = mode in ("segment", "all")
        return RunRequest(bundles=self.model_panel.bundles(),
                          parents=self.scan_panel.overrides() or None,
                          interventions=() if mode == "parents" else tuple(interventions),
                          strength=self.cf_panel.strength(), segment=segment, chromap=segment,
                          reducer=self.analysis_panel.reducer_combo.currentText())

    def _job(self, scan: Scan, request: RunRequest) -> Generator[Step, None, PipelineResult]:
        """The worker's generator: load (cached) bundles, then the pipeline's stages."""
        pipeline = yield from AppState.load(*request.bundles)
        return (yield from pipeline.run(scan, parents=request.parents,
                                        interventions=request.interventions,
                                        strength=request.strength, segment=request.segment,
                                        chromap=request.chromap, reducer=request.reducer,
                                        cancel=self._cancel.is_set))

    def cancel(self) -> None:
        """Stop the run (the pipeline polls the flag between stages and within them); the
        partial results still queued for display are dropped, and when the run has
        stopped the scan's layers and panels go back to its last finished result."""
        if self.running:
            self._cancel_t = time.perf_counter()
            self._cancel.set()
            self.queue.drop(lambda label: not label.startswith("done"))
            self.run_bar.status.setText("Cancelling…")

    def _finish_rollback(self) -> None:
        """Remove the layers an unfinished run added and restore the ones it changed."""
        if self._rollback is None:
            return
        (layer, before), self._rollback = self._rollback, None
        self.builder.rollback(layer, before, self.result_for(layer),
                              difference=self.cf_panel.diff_check.isChecked())
        if self._cancel_t:
            self.rollback_seconds = time.perf_counter() - self._cancel_t

    def _start_activity(self, mode: str) -> None:
        """A progress bar in napari's activity dock as well (napari.utils.progress)."""
        from napari.utils import progress

        self._close_activity()
        self._nprogress = progress(total=1000, desc=f"pcl-viewer {mode}")

    def _close_activity(self, done: bool = False) -> None:
        if self._nprogress is not None:
            if done:
                self._nprogress.set_description("pcl-viewer: done")
                self._nprogress.update(self._nprogress.total - self._nprogress.n)
            self._nprogress.close()
            self._nprogress = None

    def preload(self):
        """Load the chosen bundles and warm the models up in the background (the launcher
        calls this once the window is up); returns the thread."""
        return AppState.preload(*self.model_panel.bundles())

    def _set_busy(self, busy: bool) -> None:
        for w in self._busy_widgets:
            w.setEnabled(not busy)
        self.run_bar.cancel_btn.setEnabled(busy)

    # Partial results go through the UiQueue; steps without one only record the progress.

    def _enqueue_step(self, step: Step) -> None:
        if not isinstance(step, Step):
            return
        self._last_step = step
        inline = _workers.synchronous()
        if inline:
            self._show_progress()
        if self._cancel.is_set():  # rolled back when the run stops: not worth showing
            return
        if isinstance(step, RESULT_EVENTS):
            self.queue.put(f"{step.stage} {step.i}/{step.n}", self._on_step, step, inline=inline)

    def _enqueue_done(self, status: str, value: Any) -> None:
        self.queue.put(f"done ({status})", self._on_done, status, value,
                       inline=_workers.synchronous(), last=True)

    def _show_progress(self) -> None:
        """Show the last reported step on the progress bar and the status line."""
        step = self._last_step
        if step is None or self._running_layer is None:
            return
        k = ALL_STAGES.index(step.stage) if step.stage in ALL_STAGES else 0
        frac = (k + (step.i / step.n if step.n else 1.0)) / len(ALL_STAGES)
        self.run_bar.progress.setValue(int(1000 * frac))
        bar = self._nprogress
        if bar is not None and int(1000 * frac) > bar.n:
            # set_description repaints the activity dock, which can let the run's end
            # close the bar (and clear self._nprogress) before the update below
            bar.set_description(f"pcl-viewer: {step.stage}")
            if self._nprogress is bar:
                bar.update(int(1000 * frac) - bar.n)
        text = f"{step.stage} {step.i}/{step.n}"
        if self.run_bar.status.text() != text:
            self.run_bar.status.setText(text)

    def _on_step(self, event: Step) -> None:
        """Show a partial result: the parents, a view's layers or the consistency table.

        ``self._pending`` is the Qt thread's own copy of the running result: the events'
        views and domain are added to it here, in the order the run made them.
        """
        if self._running_layer is None:
            return
        pending = self._pending
        try:
            if isinstance(event, ParentsReady):  # the panels now follow this run
                self._pending = event.result.snapshot()  # ours to fill in
                self.scan_panel.show_parents(self._pending)
                self.banner.show_domain(None)
                self.cf_panel.show_quality(None)
                self.analysis_panel.clear()
            elif pending is None:
                return
            elif isinstance(event, DomainReady):
                pending.domain = event.domain
                self.banner.show_domain(event.domain)
            elif isinstance(event, ViewReady):
                pending.views[event.view.key] = event.view
                self._show_view(pending, event)
            elif isinstance(event, QualityReady):
                pending.views.update({v.key: v for v in event.views})
                self.cf_panel.show_quality(pending)
            elif isinstance(event, TableReady):
                pending.consistency = list(event.rows)
                self.analysis_panel.show_table(pending.consistency)
        except Exception as exc:  # a display error must not kill the run silently
            show_error(f"pcl-viewer: could not show {event.stage} result: {exc}")

    def _show_view(self, result: PipelineResult, event: ViewReady) -> None:
        view = event.view
        chromap_visible = None
        if event.part == "chromap" and view.key in self.chromap_checks:
            chromap_visible = self.chromap_checks[view.key].isChecked()
        self.builder.show_view(self._running_layer, result, view,
                               difference=self.cf_panel.diff_check.isChecked(),
                               chromap_visible=chromap_visible)

    def _on_done(self, status: str, value: Any) -> None:
        self._progress_timer.stop()
        self._close_activity(done=status == "ok")
        layer, self._running_layer = self._running_layer, None
        self.last_outcome = (status, value)
        self.last_run_seconds = time.perf_counter() - self._t0
        self._set_busy(False)
        self._pending = None
        if status != "ok":
            # The scan's layers go back to its last finished result in the next event-loop
            # turn: removing layers repaints the canvas each time (seconds under load), and
            # the controls and panels should come back first.
            self._rollback = (layer, self._before)
            self._rollback_timer.start()
        if status == "ok":
            self.run_bar.progress.setValue(1000)
            self.results[layer_key(layer)] = (layer, value)
            self.builder.remove_kind(layer, "linked")  # they belonged to the old CHRO-map
            if len(value.views) > 1:
                self.builder.show_captions(layer, value)
                self.viewer.layers.selection.active = layer  # not the captions
            self.show_result_of(layer)
            if self.builder.compare and layer_key(layer) not in self._tiled and len(value.views) > 1:
                self._tiled.add(layer_key(layer))
                self.viewer.reset_view()  # fit the camera to the tiles once per scan
            total = sum(value.timings.values())
            self.run_bar.status.setText(f"Done in {self.last_run_seconds:.2f} s "
                                        f"(model work {total:.2f} s)."
                                + AppState.load_notice())
        elif status == "cancelled":
            self.cancel_latency = time.perf_counter() - self._cancel_t
            self.run_bar.progress.setValue(0)
            self.show_result_of(layer)
            self.run_bar.status.setText("Cancelled: the scan shows its last finished result"
                                + (" (none yet)." if self.result_for(layer) is None else "."))
        else:
            self.show_result_of(layer)
            self.run_bar.progress.setValue(0)
            message = f"pcl-viewer: {type(value).__name__}: {value}" if not isinstance(
                value, ValueError | OSError) else f"pcl-viewer: {value}"
            self.run_bar.status.setText(message)
            show_error(message)
        self.finished.emit(status)

    def set_chromap_visible(self, key: str, visible: bool) -> None:
        self.chromap_checks[key].setChecked(visible)

    # --------------------------------------------------------- strength ---

    def _apply_strength(self) -> None:
        """Live update: rescale the cached residuals of the scan's counterfactuals (no model run)."""
        layer = self.scan_layer()
        result = self.result_for(layer)
        pipe = AppState.pipeline
        if result is None or pipe is None or self.running:
            return
        s = self.cf_panel.strength()
        for key, view in list(result.views.items()):
            if key == FACTUAL or view.residual is None:
                continue
            new = pipe.decode(result, key, view.do, s)
            # labels and CHRO-maps were made at the old strength: only images follow live
            shown = View(new.key, new.do, new.strength, new.parents, new.image, new.residual)
            self.builder.show_view(layer, result, shown,
                                   difference=self.cf_panel.diff_check.isChecked())
        self.run_bar.status.setText(f"strength {s:.2f}: press Segment to update labels and "
                                    "CHRO-maps")

    # ------------------------------------------------------- open/export ---

    def open_scan(self, path: str | Path) -> list:
        """Open a scan file as a new layer; a broken file gives a notification and changes nothing."""
        from pcl_viewer.data.scan import ScanReadError
        from pcl_viewer_napari._reader import read_layers

        try:
            layer_data = read_layers(str(path))
        except ScanReadError as exc:
            show_error(f"pcl-viewer: cannot open {exc}")
            return []
        layers = [self.viewer.add_image(data, **kwargs) for data, kwargs, _ in layer_data]
        if layers:
            self.select_scan(layers[-1])
        return layers

    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Open scan", "", "Scans (*.dcm *.dicom *.png *.jpg *.jpeg *.tif *.tiff *.nii *.nii.gz)")
        if path:
            self.open_scan(path)

    def _export_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export the scan's layers to")
        if folder:
            self.export(folder, background=True)

    def export(self, folder: str | Path, background: bool = False):
        """Write the consistency CSV and every layer of the current scan into ``folder``.

        ``background``: in a worker thread (PNG/NIfTI encoding of a large scan takes
        seconds); returns the worker, and a notification says when it is done. Otherwise
        returns the paths written.
        """
        from pcl_viewer_napari._export import export_scan

        layer = self.scan_layer()
        if layer is None:
            show_warning("pcl-viewer: no scan to export")
            return []
        args = (folder, layer, self.builder.layers_of(layer), self.result_for(layer))
        if not background:
            written = export_scan(*args)
            show_info(f"pcl-viewer: exported {len(written)} files to {folder}")
            return written
        from napari.qt.threading import create_worker

        self.run_bar.status.setText(f"Exporting to {folder}…")
        worker = create_worker(export_scan, *args, _start_thread=False)
        worker.returned.connect(lambda w: (show_info(f"pcl-viewer: exported {len(w)} files "
                                                     f"to {folder}"),
                                           self.run_bar.status.setText(f"Exported {len(w)} files.")))
        worker.errored.connect(lambda exc: show_error(f"pcl-viewer: export failed: {exc}"))
        self.export_worker = worker
        worker.start()
        return worker

    def _remember_settings(self) -> None:
        self.settings = Settings(*self.model_panel.bundles(),
                                 self.analysis_panel.reducer_combo.currentText())
        self.settings.save()
