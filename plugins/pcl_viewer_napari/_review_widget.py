"""Dock widget: robustness review of a whole folder, in a worker, with progress.

The computation is :func:`pcl_viewer.review.iter_review` (the same generator
``pcl review`` drives); it runs in a napari generator worker started by
:mod:`._workers`, so the Qt thread only updates the progress bar and the table
of flagged scans. Double-click a flagged scan (or press "Open selected") to
open it in the viewer; the counterfactual widget then picks it up. The review
is resumable like the CLI's: the same output folder continues where it stopped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import napari
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, Signal
from qtpy.QtWidgets import (
    QAbstractItemView,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from pcl_viewer.events import Step
from pcl_viewer.pipeline import DEFAULT_CF_BUNDLE, DEFAULT_SEG_BUNDLE
from pcl_viewer.review import ReviewConfig, ReviewProgress, ReviewSummary, flag_reason
from pcl_viewer_napari import _workers
from pcl_viewer_napari._state import AppState

REVIEW_WIDGET_NAME = "Folder robustness review"
COLUMNS = ("scan", "intervention", "Dice", "why")


class ReviewWidget(QWidget):
    """Review a folder of scans; list the flagged ones and open them in the viewer.

    ``finished`` is emitted with ``"ok"``, ``"cancelled"`` or ``"error"`` when a run ends.
    """

    finished = Signal(str)

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = napari_viewer
        self.worker = None
        self.summary: ReviewSummary | None = None
        self.flagged: list[tuple[str, str, float, str]] = []
        self._cancel = threading.Event()
        self._t0 = 0.0
        self._build_ui()

    # --------------------------------------------------------------- UI ---

    def _build_ui(self) -> None:
        root = QVBoxLayout(self)
        root.setContentsMargins(4, 4, 4, 4)
        form = QFormLayout()
        self.folder_edit = QLineEdit(placeholderText="folder of scans, or a CSV with a 'path' column")
        self.out_edit = QLineEdit(placeholderText="report folder (default: <folder>_review)")
        form.addRow("Input", self._with_browse(self.folder_edit, folder=True))
        form.addRow("Report", self._with_browse(self.out_edit, folder=True))
        self.cf_edit = QLineEdit(DEFAULT_CF_BUNDLE)
        self.seg_edit = QLineEdit(DEFAULT_SEG_BUNDLE)
        form.addRow("CF bundle", self.cf_edit)
        form.addRow("Seg bundle", self.seg_edit)
        self.threshold_spin = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.01, value=0.9)
        self.threshold_spin.setToolTip("Flag a counterfactual whose lung Dice vs the factual is lower")
        self.area_spin = QDoubleSpinBox(minimum=0.0, maximum=5.0, singleStep=0.05, value=0.1)
        self.area_spin.setToolTip("Flag a lung-area change (fraction) beyond +/- this")
        self.batch_spin = QSpinBox(minimum=1, maximum=256, value=16)
        form.addRow("Dice threshold", self.threshold_spin)
        form.addRow("Area threshold", self.area_spin)
        form.addRow("Batch size", self.batch_spin)
        root.addLayout(form)

        row = QHBoxLayout()
        self.run_btn = QPushButton("Review folder")
        self.run_btn.clicked.connect(self.run)
        self.cancel_btn = QPushButton("Cancel", enabled=False)
        self.cancel_btn.clicked.connect(self.cancel)
        row.addWidget(self.run_btn)
        row.addWidget(self.cancel_btn)
        root.addLayout(row)
        self.progress = QProgressBar(minimum=0, maximum=1, value=0)
        self.status = QLabel("Choose a folder and press Review folder.", wordWrap=True)
        root.addWidget(self.progress)
        root.addWidget(self.status)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSortingEnabled(True)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.open_row(r))
        root.addWidget(QLabel("Flagged scans (double-click to open):"))
        root.addWidget(self.table, stretch=1)
        row = QHBoxLayout()
        open_btn = QPushButton("Open selected")
        open_btn.clicked.connect(self.open_selected)
        self.report_btn = QPushButton("Open report.html", enabled=False)
        self.report_btn.clicked.connect(self.open_report)
        row.addWidget(open_btn)
        row.addWidget(self.report_btn)
        root.addLayout(row)

    def _with_browse(self, edit: QLineEdit, folder: bool) -> QWidget:
        box = QWidget()
        lay = QHBoxLayout(box)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(edit)
        btn = QPushButton("…", maximumWidth=28)

        def browse() -> None:
            path = (QFileDialog.getExistingDirectory(self, "Choose a folder") if folder else
                    QFileDialog.getOpenFileName(self, "Choose a CSV", "", "CSV (*.csv)")[0])
            if path:
                edit.setText(path)

        btn.clicked.connect(browse)
        lay.addWidget(btn)
        return box

    @property
    def running(self) -> bool:
        return self.worker is not None and self.cancel_btn.isEnabled()

    # -------------------------------------------------------------- run ---

    def run(self) -> bool:
        """Start the review of the input folder; False (with a notice) if it cannot start."""
        if self.running:
            show_warning("pcl-viewer: a review is already running")
            return False
        source = self.folder_edit.text().strip()
        if not source or not Path(source).exists():
            show_warning(f"pcl-viewer: no such folder or CSV: {source!r}")
            return False
        out = self.out_edit.text().strip() or str(Path(source).with_suffix("")) + "_review"
        self.out_edit.setText(out)
        cfg = ReviewConfig(threshold=self.threshold_spin.value(),
                           area_threshold=self.area_spin.value(),
                           batch_size=self.batch_spin.value())
        bundles = (self.cf_edit.text().strip(), self.seg_edit.text().strip(), "auto")
        self._cancel.clear()
        self.flagged.clear()
        self.table.setRowCount(0)
        self.summary = None
        self._set_busy(True)
        self.status.setText("Loading models…")
        self._t0 = time.perf_counter()
        self.worker = _workers.start(lambda: self._job(source, out, cfg, bundles),
                                     on_yield=self._on_step, on_done=self._on_done)
        return True

    def _job(self, source: str, out: str, cfg: ReviewConfig, bundles: tuple[str, str, str]):
        """Worker generator: (cached) models, then the review's batches."""
        from pcl_viewer.review import iter_review

        pipeline = yield from AppState.load(*bundles)
        names = {k: f"{b.name}@{b.fingerprint}" for k, b in pipeline.bundles.items()}
        self._cfg = cfg
        return (yield from iter_review(source, out, pipeline, cfg, bundles=names,
                                       cancel=self._cancel.is_set))

    def cancel(self) -> None:
        """Stop after the batch in flight; finished scans stay in the journal."""
        if self.running:
            self._cancel.set()
            self.status.setText("Cancelling after the current batch…")

    def _set_busy(self, busy: bool) -> None:
        for w in (self.run_btn, self.folder_edit, self.out_edit, self.cf_edit, self.seg_edit):
            w.setEnabled(not busy)
        self.cancel_btn.setEnabled(busy)

    def _on_step(self, step: Any) -> None:
        if isinstance(step, Step):
            self.status.setText(f"{step.stage} {step.i}/{step.n}")
            return
        if not isinstance(step, ReviewProgress):
            return
        self.progress.setMaximum(max(1, step.total))
        self.progress.setValue(step.done)
        elapsed = time.perf_counter() - self._t0
        rate = step.done / elapsed if elapsed > 0 else 0.0
        left = (step.total - step.done) / rate if rate > 0 else float("nan")
        self.status.setText(f"{step.done}/{step.total} scans, {rate:.1f} scans/s, "
                            f"about {left:.0f} s left")
        for rec in step.records:
            for row in rec.get("rows", []):
                reason = flag_reason(row, self._cfg)
                if reason:
                    self._add_flagged(rec["path"], row["key"], row["dice"], reason)

    def _add_flagged(self, path: str, key: str, dice: float, reason: str) -> None:
        self.flagged.append((path, key, dice, reason))
        self.table.setSortingEnabled(False)
        r = self.table.rowCount()
        self.table.insertRow(r)
        name = QTableWidgetItem(Path(path).name)
        name.setToolTip(path)
        name.setData(Qt.UserRole, path)
        dice_item = QTableWidgetItem()
        dice_item.setData(Qt.DisplayRole, round(float(dice), 3))
        for c, item in enumerate((name, QTableWidgetItem(key), dice_item, QTableWidgetItem(reason))):
            self.table.setItem(r, c, item)
        self.table.setSortingEnabled(True)

    def _on_done(self, status: str, value: Any) -> None:
        self._set_busy(False)
        if status == "ok":
            self.summary = value
            self.progress.setMaximum(1)
            self.progress.setValue(1)
            self.report_btn.setEnabled(True)
            self.status.setText(
                f"Reviewed {value.processed} scans ({value.skipped} already done) at "
                f"{value.rate:.1f} scans/s: {value.flagged} flagged, {value.errors} unreadable. "
                f"Report: {value.files.get('html')}")
            if value.errors:
                show_info(f"pcl-viewer: {value.errors} files could not be read; see errors.csv")
        elif status == "cancelled":
            self.status.setText("Cancelled: finished scans are kept; run again to resume.")
        else:
            message = f"pcl-viewer: review failed: {value}"
            self.status.setText(message)
            show_error(message)
        self.finished.emit(status)

    # ------------------------------------------------------------ open ---

    def open_row(self, row: int) -> list:
        """Open the scan of a table row in the viewer (one image layer)."""
        item = self.table.item(row, 0)
        return self.open_scan(item.data(Qt.UserRole)) if item is not None else []

    def open_selected(self) -> list:
        layers = []
        for r in sorted({i.row() for i in self.table.selectedItems()}):
            layers += self.open_row(r)
        return layers

    def open_scan(self, path: str) -> list:
        from pcl_viewer.data.scan import ScanReadError
        from pcl_viewer_napari._reader import read_layers

        try:
            data = read_layers(path)
        except ScanReadError as exc:
            show_error(f"pcl-viewer: cannot open {exc}")
            return []
        return [self.viewer.add_image(d, **kwargs) for d, kwargs, _ in data]

    def open_report(self) -> None:
        import webbrowser

        if self.summary is not None:
            webbrowser.open(self.summary.files["html"].resolve().as_uri())


def review_widget(viewer: napari.viewer.Viewer) -> ReviewWidget:
    """Factory for scripts: add the review widget to ``viewer``'s dock."""
    widget = ReviewWidget(viewer)
    viewer.window.add_dock_widget(widget, name=REVIEW_WIDGET_NAME, area="right")
    return widget
