"""The dock widget: counterfactuals by scanner or pathology, lung segmentation, CHRO-maps.

Model work runs in :mod:`._workers` (a napari generator worker); this module
only reads the controls, starts a run, shows progress and hands partial
results to :class:`._layers.LayerBuilder`. Nothing here computes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import napari
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from pcl_viewer.parents import PARENT_NAMES, PARENT_VALUES
from pcl_viewer.pipeline import FACTUAL, MAX_STRENGTH, STAGES, PipelineResult, Step, View
from pcl_viewer_napari import _workers
from pcl_viewer_napari._layers import LayerBuilder, is_derived, layer_key, scan_from_layer
from pcl_viewer_napari._plot import EmbeddingPlot
from pcl_viewer_napari._progress import ProgressBar
from pcl_viewer_napari._settings import Settings
from pcl_viewer_napari._state import AppState

WIDGET_NAME = "Counterfactuals & CHRO-map"


def _guard_none_refcount() -> list | None:
    """PySide6 6.12 drops references to None it does not own: once per
    ``QTimer.singleShot(ms, callable)`` and a few times per napari layer update or
    worker yield (measured: about -25 per ``layer.data = ...``). On Python 3.11 None
    is not immortal, so a long session (or a test suite) ends in "Fatal Python error:
    none_dealloc" during garbage collection. Holding two million extra references
    (16 MB) keeps None alive for about 80,000 layer updates."""
    try:
        from qtpy import API_NAME
    except ImportError:
        return None
    import sys

    if API_NAME != "PySide6" or sys.version_info >= (3, 12):  # 3.12+: None is immortal
        return None
    import PySide6

    # The project pins PySide6 < 6.12; the guard is for users whose napari brings 6.12.
    if tuple(int(v) for v in PySide6.__version__.split(".")[:2]) < (6, 12):
        return None
    return [None] * 2_000_000


_NONE_REFS = _guard_none_refcount()
INTERVENTIONS = {"scanner": "do(scanner) flip", "effusion": "do(effusion) flip",
                 "both": "both", "sex": "do(sex) (explore)"}
ALL_STAGES = ("load", *STAGES)
# Progress is painted at most this often (ms): with napari's OpenGL canvas in the window,
# any repaint composites the whole window (software GL: tens of ms of the Qt thread).
PROGRESS_INTERVAL_MS = 200
TABLE_COLUMNS = ("view", "Dice", "Dice R", "Dice L", "ΔArea R", "ΔArea L")


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
        self._ui_queue: deque = deque()
        self.ui_timings: list[tuple[str, float]] = []  # (item, seconds) handled in the Qt thread
        self._drain_scheduled = False
        self._t0 = 0.0
        self._build_ui()
        self._strength_timer = QTimer(self, singleShot=True, interval=40)
        self._strength_timer.timeout.connect(self._apply_strength)
        self.viewer.layers.events.inserted.connect(self._refresh_scans)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        self._refresh_scans()
        self._update_model_notice()
        # Timer objects, not QTimer.singleShot(ms, callable): see _guard_none_refcount.
        self._prewarm_timer = QTimer(self, singleShot=True, interval=0)
        self._prewarm_timer.timeout.connect(_prewarm_labels)
        self._prewarm_timer.start()
        self._drain_timer = QTimer(self, singleShot=True, interval=0)
        self._drain_timer.timeout.connect(self._drain_one)
        self._last_step: Step | None = None
        self._progress_timer = QTimer(self, interval=PROGRESS_INTERVAL_MS)
        self._progress_timer.timeout.connect(self._show_progress)

    # --------------------------------------------------------------- UI ---

    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        root.setSpacing(4)

        box = QGroupBox("Model")
        form = QFormLayout(box)
        self.cf_combo = self._bundle_combo(self.settings.cf_bundle)
        self.seg_combo = self._bundle_combo(self.settings.seg_bundle)
        form.addRow("CF bundle", self._with_browse(self.cf_combo))
        form.addRow("Seg bundle", self._with_browse(self.seg_combo))
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cuda", "mps", "cpu"])
        self.device_combo.setCurrentText(self.settings.device)
        form.addRow("Device", self.device_combo)
        self.notice = QLabel(wordWrap=True)
        self.notice.setStyleSheet("color: #f0c060;")
        form.addRow(self.notice)
        for w in (self.cf_combo, self.seg_combo, self.device_combo):
            w.currentTextChanged.connect(self._update_model_notice)
        root.addWidget(box)

        box = QGroupBox("Scan and parents")
        grid = QGridLayout(box)
        self.scan_combo = QComboBox()
        open_btn = QPushButton("Open…")
        open_btn.clicked.connect(self._open_dialog)
        grid.addWidget(QLabel("Scan"), 0, 0)
        grid.addWidget(self.scan_combo, 0, 1, 1, 2)
        grid.addWidget(open_btn, 0, 3)
        self.parent_combos: dict[str, QComboBox] = {}
        self.prob_labels: dict[str, QLabel] = {}
        for r, name in enumerate(PARENT_NAMES, start=1):
            combo = QComboBox()
            combo.addItems(["auto", *PARENT_VALUES[name]])
            combo.setToolTip("auto: the classifier's value; pick a value to override it")
            self.parent_combos[name] = combo
            self.prob_labels[name] = QLabel("–")
            grid.addWidget(QLabel(name), r, 0)
            grid.addWidget(combo, r, 1)
            grid.addWidget(self.prob_labels[name], r, 2, 1, 2)
        self.infer_btn = QPushButton("Infer parents")
        self.infer_btn.clicked.connect(lambda: self.run("parents"))
        grid.addWidget(self.infer_btn, len(PARENT_NAMES) + 1, 0, 1, 4)
        root.addWidget(box)

        box = QGroupBox("Counterfactuals")
        grid = QGridLayout(box)
        self.intervention_checks: dict[str, QCheckBox] = {}
        for i, (key, label) in enumerate(INTERVENTIONS.items()):
            check = QCheckBox(label)
            check.setChecked(key != "sex")
            self.intervention_checks[key] = check
            grid.addWidget(check, i // 2, i % 2)
        self.diff_check = QCheckBox("difference layers")
        grid.addWidget(self.diff_check, 2, 0)
        self.strength_slider = QSlider(Qt.Orientation.Horizontal)
        self.strength_slider.setRange(0, int(MAX_STRENGTH * 100))
        self.strength_slider.setValue(100)
        self.strength_slider.valueChanged.connect(self._on_strength)
        self.strength_label = QLabel("strength 1.00")
        grid.addWidget(self.strength_label, 3, 0)
        grid.addWidget(self.strength_slider, 3, 1)
        self.generate_btn = QPushButton("Generate")
        self.generate_btn.clicked.connect(lambda: self.run("generate"))
        grid.addWidget(self.generate_btn, 2, 1)
        root.addWidget(box)

        box = QGroupBox("Segmentation and CHRO-map")
        lay = QVBoxLayout(box)
        row = QHBoxLayout()
        self.reducer_combo = QComboBox()
        self.reducer_combo.addItems(["pca", "umap"])
        self.reducer_combo.setCurrentText(self.settings.reducer)
        self.reducer_combo.setToolTip("pca: instant; umap: the reference, ~30 s on a CPU")
        self.segment_btn = QPushButton("Segment")
        self.segment_btn.clicked.connect(lambda: self.run("segment"))
        self.run_all_btn = QPushButton("Run all")
        self.run_all_btn.setToolTip("parents, counterfactuals, segmentations and CHRO-maps")
        self.run_all_btn.clicked.connect(lambda: self.run("all"))
        row.addWidget(QLabel("reducer"))
        row.addWidget(self.reducer_combo)
        row.addWidget(self.segment_btn)
        row.addWidget(self.run_all_btn)
        lay.addLayout(row)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.table.setMinimumHeight(96)
        self.table.setMaximumHeight(110)
        self.table.horizontalHeader().setMinimumSectionSize(36)
        self.table.horizontalHeader().setStretchLastSection(True)
        lay.addWidget(self.table)
        self.chromap_box = QWidget()
        self.chromap_layout = QHBoxLayout(self.chromap_box)
        self.chromap_layout.setContentsMargins(0, 0, 0, 0)
        self.chromap_checks: dict[str, QCheckBox] = {}
        lay.addWidget(QLabel("CHRO-map layers"))
        lay.addWidget(self.chromap_box)
        self.plot = EmbeddingPlot(self)
        lay.addWidget(self.plot)
        root.addWidget(box)

        row = QHBoxLayout()
        self.progress = ProgressBar(maximum=1000)
        self.progress.setValue(0)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.cancel_btn.clicked.connect(self.cancel)
        self.export_btn = QPushButton("Export…")
        self.export_btn.clicked.connect(self._export_dialog)
        row.addWidget(self.progress)
        row.addWidget(self.cancel_btn)
        row.addWidget(self.export_btn)
        root.addLayout(row)
        self.status = QLabel("Ready", wordWrap=True)
        root.addWidget(self.status)
        root.addStretch(1)
        self._busy_widgets = [self.cf_combo, self.seg_combo, self.device_combo, self.scan_combo,
                              self.infer_btn, self.generate_btn, self.segment_btn,
                              self.run_all_btn, self.strength_slider, self.reducer_combo,
                              self.export_btn, *self.parent_combos.values()]

    def _bundle_combo(self, current: str) -> QComboBox:
        from pcl_viewer.paths import models_dir

        combo = QComboBox(editable=True)
        names = sorted(p.name for p in models_dir().glob("*") if (p / "card.json").is_file())
        combo.addItems(list(dict.fromkeys([current, *names])))
        combo.setCurrentText(current)
        return combo

    def _with_browse(self, combo: QComboBox) -> QWidget:
        w = QWidget()
        lay = QHBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(combo, 1)
        btn = QPushButton("…")
        btn.setMaximumWidth(28)
        btn.setToolTip("choose a bundle folder")

        def browse() -> None:
            folder = QFileDialog.getExistingDirectory(self, "Model bundle folder")
            if folder:
                combo.setCurrentText(folder)

        btn.clicked.connect(browse)
        lay.addWidget(btn)
        return w

    # ------------------------------------------------------------ state ---

    @property
    def running(self) -> bool:
        return self._running_layer is not None

    def _update_model_notice(self, *_: Any) -> None:
        from pcl_viewer.device import choose_device, device_notice
        from pcl_viewer.models.bundle import BundleError, find_bundle

        lines = []
        try:
            device = choose_device(self.device_combo.currentText())
            notice = device_notice(device)
            lines.append(notice or f"Running on {device}.")
        except ValueError as exc:
            lines.append(str(exc))
        for label, combo in (("counterfactual", self.cf_combo), ("segmentation", self.seg_combo)):
            try:
                find_bundle(combo.currentText())
            except BundleError:
                lines.append(f"No {label} bundle {combo.currentText()!r} here: "
                             f"{label}s are disabled until one is chosen.")
        self.notice.setText("\n".join(lines))

    def _refresh_scans(self, *_: Any) -> None:
        current = self.scan_combo.currentText()
        names = [ly.name for ly in self.viewer.layers
                 if isinstance(ly, napari.layers.Image) and not is_derived(ly)
                 and not ly.rgb and ly.ndim == 2]
        self.scan_combo.blockSignals(True)
        self.scan_combo.clear()
        self.scan_combo.addItems(names)
        if current in names:
            self.scan_combo.setCurrentText(current)
        elif names:
            self.scan_combo.setCurrentIndex(len(names) - 1)
        self.scan_combo.blockSignals(False)

    def _on_layer_removed(self, event) -> None:
        gone = event.value
        self.results.pop(layer_key(gone), None)
        self._refresh_scans()

    def scan_layer(self):
        """The image layer chosen as the scan, or None."""
        name = self.scan_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def select_scan(self, layer) -> None:
        self._refresh_scans()
        if layer is not None and self.scan_combo.findText(layer.name) >= 0:
            self.scan_combo.setCurrentText(layer.name)

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
        params = self._params(mode, interventions)
        self._remember_settings()
        self._cancel.clear()
        self.ui_timings = []
        self._running_layer = layer
        self._set_busy(True)
        self.progress.setValue(0)
        self.status.setText(f"{mode}: starting…")
        self._last_step = None
        self._progress_timer.start()
        self._t0 = time.perf_counter()
        self.worker = _workers.start(lambda: self._job(scan, params),
                                     on_yield=self._enqueue_step, on_done=self._enqueue_done)
        return True

    def _params(self, mode: str, interventions: tuple[str, ...] | None) -> dict[str, Any]:
        overrides = {n: c.currentText() for n, c in self.parent_combos.items()
                     if c.currentText() != "auto"}
        if interventions is None:
            interventions = tuple(k for k, c in self.intervention_checks.items() if c.isChecked())
        if mode == "parents":
            interventions = ()
        return {
            "bundles": (self.cf_combo.currentText().strip(), self.seg_combo.currentText().strip(),
                        self.device_combo.currentText()),
            "run": {"parents": overrides or None, "interventions": interventions,
                    "strength": self.strength_slider.value() / 100.0,
                    "segment": mode in ("segment", "all"), "chromap": mode in ("segment", "all"),
                    "reducer": self.reducer_combo.currentText()},
            "difference": self.diff_check.isChecked(),
        }

    def _job(self, scan, params):
        """The worker's generator: load (cached) bundles, then the pipeline's stages."""
        pipeline = yield from AppState.load(*params["bundles"])
        return (yield from pipeline.run(scan, cancel=self._cancel.is_set, **params["run"]))

    def cancel(self) -> None:
        """Stop the run between two stages; finished layers stay, nothing is half-built."""
        if self.running:
            self._cancel.set()
            self.status.setText("Cancelling…")

    def _set_busy(self, busy: bool) -> None:
        for w in self._busy_widgets:
            w.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)

    # The worker can yield faster than layers are built. Each partial result is queued and
    # handled in its own event-loop turn (a 0 ms timer), so timers, paints and input run
    # between two layer updates instead of after a burst of them. Steps without a result
    # only record the progress, which a timer paints a few times a second.

    def _enqueue_step(self, step: Step) -> None:
        if not isinstance(step, Step):
            return
        self._last_step = step
        if _workers.synchronous():
            self._show_progress()
        if isinstance(step.item, PipelineResult | View | list):
            self._ui_queue.append((self._on_step, (step,)))
            self._schedule_drain()

    def _enqueue_done(self, status: str, value: Any) -> None:
        self._ui_queue.append((self._on_done, (status, value)))
        self._schedule_drain()

    def _schedule_drain(self) -> None:
        if _workers.synchronous():  # inline runs: handle at once, in order
            while self._ui_queue:
                func, args = self._ui_queue.popleft()
                func(*args)
        elif not self._drain_scheduled:
            self._drain_scheduled = True
            self._drain_timer.start()

    def _drain_one(self) -> None:
        self._drain_scheduled = False
        if self._ui_queue:
            func, args = self._ui_queue.popleft()
            t0 = time.perf_counter()
            func(*args)
            step = args[0] if isinstance(args[0], Step) else None
            label = f"{step.stage} {step.i}/{step.n}" if step else f"done ({args[0]})"
            self.ui_timings.append((label, time.perf_counter() - t0))
        if self._ui_queue:
            self._schedule_drain()

    def _show_progress(self) -> None:
        """Show the last reported step on the progress bar and the status line."""
        step = self._last_step
        if step is None or self._running_layer is None:
            return
        k = ALL_STAGES.index(step.stage) if step.stage in ALL_STAGES else 0
        frac = (k + (step.i / step.n if step.n else 1.0)) / len(ALL_STAGES)
        self.progress.setValue(int(1000 * frac))
        text = f"{step.stage} {step.i}/{step.n}"
        if self.status.text() != text:
            self.status.setText(text)

    def _on_step(self, step: Step) -> None:
        """Show a partial result: the parents, a view's layers or the consistency table."""
        if self._running_layer is None:
            return
        item = step.item
        try:
            if isinstance(item, PipelineResult):
                self._pending = item
                self._show_parents(item)
            elif isinstance(item, View):
                self._show_view(item, step.stage)
            elif isinstance(item, list):
                self._show_table(item)
        except Exception as exc:  # a display error must not kill the run silently
            show_error(f"pcl-viewer: could not show {step.stage} result: {exc}")

    def _show_view(self, view: View, stage: str) -> None:
        result = self._pending
        if result is None:
            return
        if stage == "decode" or (stage == "parents" and view.key == FACTUAL):
            shown = View(view.key, view.do, view.strength, view.parents, view.image, view.residual)
        elif stage == "segment":
            shown = View(view.key, view.do, view.strength, view.parents, view.image,
                         view.residual, labels=view.labels)
        else:
            shown = view
        chromap_visible = None
        if stage == "chromap" and view.key in self.chromap_checks:
            chromap_visible = self.chromap_checks[view.key].isChecked()
        self.builder.show_view(self._running_layer, result, shown,
                               difference=self.diff_check.isChecked(),
                               chromap_visible=chromap_visible)

    def _on_done(self, status: str, value: Any) -> None:
        self._progress_timer.stop()
        layer, self._running_layer = self._running_layer, None
        self.last_outcome = (status, value)
        self.last_run_seconds = time.perf_counter() - self._t0
        self._set_busy(False)
        self._pending = None
        if status == "ok":
            self.progress.setValue(1000)
            self.results[layer_key(layer)] = (layer, value)
            self._show_parents(value)
            self._show_table(value.consistency)
            self._show_chromap_controls(layer, value)
            total = sum(value.timings.values())
            self.status.setText(f"Done in {self.last_run_seconds:.2f} s (model work {total:.2f} s)."
                                + self._load_notice())
        elif status == "cancelled":
            self.progress.setValue(0)
            self.status.setText("Cancelled: layers made before the cancel are complete; "
                                "the last finished result is kept.")
        else:
            self.progress.setValue(0)
            message = f"pcl-viewer: {type(value).__name__}: {value}" if not isinstance(
                value, ValueError | OSError) else f"pcl-viewer: {value}"
            self.status.setText(message)
            show_error(message)
        self.finished.emit(status)

    def _load_notice(self) -> str:
        pipe = AppState.pipeline
        if pipe is not None and pipe.load_errors:
            return "\n" + "\n".join(e if len(e) < 300 else e[:300] + "…" for e in pipe.load_errors)
        return ""

    # -------------------------------------------------------- read-outs ---

    def _show_parents(self, result: PipelineResult) -> None:
        probs = result.probabilities or {}
        for name, label in self.prob_labels.items():
            if result.parents is None:
                label.setText("–")
                continue
            value = getattr(result.parents, name)
            p1 = probs.get(name)
            if p1 is None:
                label.setText(f"{value}")
                continue
            p = p1 if value == PARENT_VALUES[name][1] else 1.0 - p1
            label.setText(f"{value} (p={p:.2f})")

    def _show_table(self, rows) -> None:
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            cells = [row.view, f"{row.dice:.3f}", f"{row.dice_right:.3f}", f"{row.dice_left:.3f}",
                     _pct(row.area_right_change), _pct(row.area_left_change)]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                if c == 0:
                    item.setToolTip(row.intervention)
                self.table.setItem(r, c, item)
        self.table.resizeColumnsToContents()

    def _show_chromap_controls(self, layer, result: PipelineResult) -> None:
        while self.chromap_layout.count():
            w = self.chromap_layout.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        self.chromap_checks = {}
        if result.chromap is None:
            self.plot.clear()
            return
        for key in result.views:
            cm_layer = self.builder.get(layer, key, "chromap")
            if cm_layer is None:
                continue
            check = QCheckBox(key)
            check.setChecked(cm_layer.visible)
            check.toggled.connect(lambda on, ly=cm_layer: setattr(ly, "visible", on))
            cm_layer.events.visible.connect(
                lambda e, c=check, ly=cm_layer: c.setChecked(ly.visible))
            self.chromap_checks[key] = check
            self.chromap_layout.addWidget(check)
        self.plot.show_result(result)

    def set_chromap_visible(self, key: str, visible: bool) -> None:
        self.chromap_checks[key].setChecked(visible)

    # --------------------------------------------------------- strength ---

    def _on_strength(self, value: int) -> None:
        s = value / 100.0
        self.strength_label.setText(f"strength {s:.2f}" + (" (extrap.)" if value != 100 else ""))
        self._strength_timer.start()

    def _apply_strength(self) -> None:
        """Live update: rescale the cached residuals of the scan's counterfactuals (no model run)."""
        layer = self.scan_layer()
        result = self.result_for(layer)
        pipe = AppState.pipeline
        if result is None or pipe is None or self.running:
            return
        s = self.strength_slider.value() / 100.0
        for key, view in list(result.views.items()):
            if key == FACTUAL or view.residual is None:
                continue
            new = pipe.decode(result, key, view.do, s)
            # labels and CHRO-maps were made at the old strength: only images follow live
            shown = View(new.key, new.do, new.strength, new.parents, new.image, new.residual)
            self.builder.show_view(layer, result, shown, difference=self.diff_check.isChecked())
        self.status.setText(f"strength {s:.2f}: press Segment to update labels and CHRO-maps")

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
            self.export(folder)

    def export(self, folder: str | Path) -> list[Path]:
        """Write the consistency CSV and every layer of the current scan into ``folder``."""
        from pcl_viewer_napari._export import export_scan

        layer = self.scan_layer()
        if layer is None:
            show_warning("pcl-viewer: no scan to export")
            return []
        written = export_scan(folder, layer, self.builder.layers_of(layer), self.result_for(layer))
        show_info(f"pcl-viewer: exported {len(written)} files to {folder}")
        return written

    def _remember_settings(self) -> None:
        self.settings = Settings(self.cf_combo.currentText().strip(),
                                 self.seg_combo.currentText().strip(),
                                 self.device_combo.currentText(),
                                 self.reducer_combo.currentText())
        self.settings.save()


def _prewarm_labels() -> None:
    """Build one throwaway Labels model while the user looks at the window: the first one
    in a process pays seconds of imports and set-up, which would otherwise freeze the
    window in the middle of the first segmentation."""
    import numpy as np
    from napari.utils.colormaps import CyclicLabelColormap

    from pcl_viewer_napari._layers import LUNG_COLOURS

    napari.layers.Labels(np.zeros((2, 2), np.uint8),
                         colormap=CyclicLabelColormap(colors=LUNG_COLOURS, background_value=0))


def _pct(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"
