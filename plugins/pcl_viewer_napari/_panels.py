"""The dock widget's control panels (Qt thread only; nothing here computes).

Each group box owns its controls and how they read and show values; the dock
widget (:mod:`._widget`) wires them to runs and layers.
"""

from __future__ import annotations

import html
import math
from typing import Any

from qtpy.QtCore import Qt, Signal
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

from pcl_viewer.colors import legend_html
from pcl_viewer.parents import PARENT_NAMES, PARENT_VALUES
from pcl_viewer.pipeline import FACTUAL, MAX_STRENGTH, ConsistencyRow, PipelineResult, View
from pcl_viewer_napari._plot import EmbeddingPlot
from pcl_viewer_napari._progress import ProgressBar

INTERVENTIONS = {"scanner": "do(scanner) flip", "effusion": "do(effusion) flip",
                 "both": "both", "sex": "do(sex) (explore)"}
TABLE_COLUMNS = ("view", "Dice", "Dice R", "Dice L", "ΔArea R", "ΔArea L")


class ModelPanel(QGroupBox):
    """Counterfactual and segmentation bundles, device, and the notice about them."""

    def __init__(self, cf_bundle: str, seg_bundle: str, device: str,
                 parent: QWidget | None = None) -> None:
        super().__init__("Model", parent)
        form = QFormLayout(self)
        self.cf_combo = _bundle_combo(cf_bundle)
        self.seg_combo = _bundle_combo(seg_bundle)
        form.addRow("CF bundle", _with_browse(self, self.cf_combo))
        form.addRow("Seg bundle", _with_browse(self, self.seg_combo))
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cuda", "mps", "cpu"])
        self.device_combo.setCurrentText(device)
        form.addRow("Device", self.device_combo)
        self.notice = QLabel(wordWrap=True)
        self.notice.setStyleSheet("color: #f0c060;")
        form.addRow(self.notice)
        for w in (self.cf_combo, self.seg_combo, self.device_combo):
            w.currentTextChanged.connect(self.update_notice)
        self.update_notice()

    def bundles(self) -> tuple[str, str, str]:
        """``(cf bundle, seg bundle, device)`` as chosen."""
        return (self.cf_combo.currentText().strip(), self.seg_combo.currentText().strip(),
                self.device_combo.currentText())

    def update_notice(self, *_: Any) -> None:
        """The device in use (the persistent CPU notice) and any bundle that is missing."""
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


class ScanPanel(QGroupBox):
    """The scan layer to work on, and its parents: inferred (with probabilities) or set."""

    open_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Scan and parents", parent)
        grid = QGridLayout(self)
        self.scan_combo = QComboBox()
        open_btn = QPushButton("Open…")
        open_btn.clicked.connect(self.open_requested.emit)
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
        grid.addWidget(self.infer_btn, len(PARENT_NAMES) + 1, 0, 1, 4)

    def set_scans(self, names: list[str]) -> None:
        """Offer ``names``; keep the current choice if it is still there, else take the last."""
        current = self.scan_combo.currentText()
        self.scan_combo.blockSignals(True)
        self.scan_combo.clear()
        self.scan_combo.addItems(names)
        if current in names:
            self.scan_combo.setCurrentText(current)
        elif names:
            self.scan_combo.setCurrentIndex(len(names) - 1)
        self.scan_combo.blockSignals(False)

    def overrides(self) -> dict[str, str]:
        """The parents the user set (those not on *auto*)."""
        return {n: c.currentText() for n, c in self.parent_combos.items()
                if c.currentText() != "auto"}

    def show_parents(self, result: PipelineResult | None) -> None:
        """Each parent used, with the classifier's probability of that value ("–" for none)."""
        probs = (result.probabilities if result is not None else None) or {}
        for name, label in self.prob_labels.items():
            if result is None or result.parents is None:
                label.setText("–")
                continue
            value = getattr(result.parents, name)
            p1 = probs.get(name)
            if p1 is None:
                label.setText(f"{value}")
                continue
            p = p1 if value == PARENT_VALUES[name][1] else 1.0 - p1
            label.setText(f"{value} (p={p:.2f})")


class CounterfactualPanel(QGroupBox):
    """Which interventions to generate, difference layers, and the strength slider."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Counterfactuals", parent)
        grid = QGridLayout(self)
        self.intervention_checks: dict[str, QCheckBox] = {}
        for i, (key, label) in enumerate(INTERVENTIONS.items()):
            check = QCheckBox(label)
            check.setChecked(key != "sex")
            self.intervention_checks[key] = check
            grid.addWidget(check, i // 2, i % 2)
        self.diff_check = QCheckBox("difference layers")
        grid.addWidget(self.diff_check, 2, 0)
        self.compare_check = QCheckBox("compare side by side")
        self.compare_check.setChecked(True)
        self.compare_check.setToolTip("each view in its own tile beside the scan; off: all "
                                      "views on top of the scan")
        grid.addWidget(self.compare_check, 4, 0, 1, 2)
        self.strength_slider = QSlider(Qt.Orientation.Horizontal)
        self.strength_slider.setRange(0, int(MAX_STRENGTH * 100))
        self.strength_slider.setValue(100)
        self.strength_slider.valueChanged.connect(self._on_strength)
        self.strength_label = QLabel("strength 1.00")
        grid.addWidget(self.strength_label, 3, 0)
        grid.addWidget(self.strength_slider, 3, 1)
        self.generate_btn = QPushButton("Generate")
        grid.addWidget(self.generate_btn, 2, 1)
        self.quality_label = QLabel(wordWrap=True)
        self.quality_label.setTextFormat(Qt.TextFormat.RichText)
        grid.addWidget(self.quality_label, 5, 0, 1, 2)

    def show_quality(self, result: PipelineResult | None) -> None:
        """Per counterfactual: reversibility, the classifiers' read-back of the intervened
        parent (against the bundle's targets), and its caveat while it misses them."""
        views = [v for k, v in (result.views.items() if result else ()) if k != FACTUAL
                 and v.quality is not None]
        self.quality_label.setText("<br>".join(_quality_html(v) for v in views))

    def interventions(self) -> tuple[str, ...]:
        return tuple(k for k, c in self.intervention_checks.items() if c.isChecked())

    def strength(self) -> float:
        return self.strength_slider.value() / 100.0

    def _on_strength(self, value: int) -> None:
        self.strength_label.setText(f"strength {value / 100.0:.2f}"
                                    + (" (extrap.)" if value > 100 else ""))


class AnalysisPanel(QGroupBox):
    """Segment / Run all, the consistency table, the CHRO-map toggles and embedding plot."""

    def __init__(self, reducer: str, parent: QWidget | None = None) -> None:
        super().__init__("Segmentation and CHRO-map", parent)
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.reducer_combo = QComboBox()
        self.reducer_combo.addItems(["pca", "umap"])
        self.reducer_combo.setCurrentText(reducer)
        self.reducer_combo.setToolTip("pca: instant; umap: the reference, ~30 s on a CPU")
        self.segment_btn = QPushButton("Segment")
        self.run_all_btn = QPushButton("Run all")
        self.run_all_btn.setToolTip("parents, counterfactuals, segmentations and CHRO-maps")
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
        self.legend = QLabel(f"Lung labels: {legend_html()}")
        self.legend.setTextFormat(Qt.TextFormat.RichText)
        lay.addWidget(self.legend)
        self.chromap_box = QWidget()
        self.chromap_layout = QHBoxLayout(self.chromap_box)
        self.chromap_layout.setContentsMargins(0, 0, 0, 0)
        self.chromap_checks: dict[str, QCheckBox] = {}
        lay.addWidget(QLabel("CHRO-map layers"))
        lay.addWidget(self.chromap_box)
        self.link_check = QCheckBox("link: click a pixel or drag a box on the plot")
        self.link_check.setToolTip("marks the pixel's point in the embedding and the pixels "
                                   "of the same feature in every view")
        lay.addWidget(self.link_check)
        self.plot = EmbeddingPlot(self)
        lay.addWidget(self.plot)

    def clear(self) -> None:
        """No result for the scan shown: empty table, no CHRO-map toggles, empty plot."""
        self.show_table([])
        self.show_chromap_controls(None, {})

    def show_table(self, rows: list[ConsistencyRow]) -> None:
        """One row per counterfactual: Dice vs the factual labels and lung-area changes."""
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

    def show_chromap_controls(self, result: PipelineResult | None,
                              layers: dict[str, Any]) -> None:
        """A checkbox per CHRO-map layer (``{view key: layer}``), both ways in sync with the
        layer's visibility, and the embedding plot."""
        while self.chromap_layout.count():
            w = self.chromap_layout.takeAt(0).widget()
            if w is not None:
                w.deleteLater()
        for layer, callback in getattr(self, "_links", []):  # the old boxes' layer links
            try:
                layer.events.visible.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):
                pass
        self._links: list[tuple[Any, Any]] = []
        self.chromap_checks = {}
        if result is None or result.chromap is None:
            self.plot.clear()
            return
        for key, cm_layer in layers.items():
            check = QCheckBox(key)
            check.setChecked(cm_layer.visible)
            check.toggled.connect(lambda on, ly=cm_layer: setattr(ly, "visible", on))

            def follow(event, c=check, ly=cm_layer) -> None:
                c.setChecked(ly.visible)

            cm_layer.events.visible.connect(follow)
            self._links.append((cm_layer, follow))
            self.chromap_checks[key] = check
            self.chromap_layout.addWidget(check)
        self.plot.show_result(result)


class RunBar(QWidget):
    """The progress bar with Cancel and Export…, and the status line under them."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(4)
        row = QHBoxLayout()
        self.progress = ProgressBar(maximum=1000)
        self.progress.setValue(0)
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.export_btn = QPushButton("Export…")
        row.addWidget(self.progress)
        row.addWidget(self.cancel_btn)
        row.addWidget(self.export_btn)
        lay.addLayout(row)
        self.status = QLabel("Ready", wordWrap=True)
        lay.addWidget(self.status)


def _bundle_combo(current: str) -> QComboBox:
    """An editable combo of the bundles under resources/models, ``current`` first."""
    from pcl_viewer.paths import models_dir

    combo = QComboBox(editable=True)
    names = sorted(p.name for p in models_dir().glob("*") if (p / "card.json").is_file())
    combo.addItems(list(dict.fromkeys([current, *names])))
    combo.setCurrentText(current)
    return combo


def _with_browse(parent: QWidget, combo: QComboBox) -> QWidget:
    """``combo`` with a "…" button that picks a bundle folder into it."""
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    lay.addWidget(combo, 1)
    btn = QPushButton("…")
    btn.setMaximumWidth(28)
    btn.setToolTip("choose a bundle folder")

    def browse() -> None:
        folder = QFileDialog.getExistingDirectory(parent, "Model bundle folder")
        if folder:
            combo.setCurrentText(folder)

    btn.clicked.connect(browse)
    lay.addWidget(btn)
    return w


class DomainBanner(QLabel):
    """A persistent line at the top of the widget: the scan is outside the models' world
    (red), or the domain check cannot say (grey). Hidden for typical scans."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent, wordWrap=True)
        self.setVisible(False)
        self.out_of_domain: bool | None = None

    def show_domain(self, domain) -> None:
        """``domain``: a ``DomainResult`` or None (no check ran: hidden)."""
        self.out_of_domain = None if domain is None else domain.out_of_domain
        if domain is None or domain.out_of_domain is False:
            self.setVisible(False)
            self.setText("")
            return
        if domain.out_of_domain:
            self.setStyleSheet("background:#8b1e1e;color:white;padding:4px;font-weight:600;")
        else:
            self.setStyleSheet("background:#3a3f47;color:#d0d0d0;padding:4px;")
        self.setText(domain.message)
        self.setVisible(True)


def _quality_html(view: View) -> str:
    """One line per counterfactual: reversibility and read-back against the bundle's targets
    (a cross marks a missed one), then its caveat, if any, in amber."""
    q = view.quality
    tgt = q.targets
    rev = f"reversibility {q.reversibility_mae:.3f}"
    if "reversibility_mae" in tgt:
        ok = q.reversibility_mae <= tgt["reversibility_mae"]
        rev += f" ({'&le;' if ok else '&gt;'} {tgt['reversibility_mae']:g}{'' if ok else ' &#10007;'})"
    reads = []
    for name, p in q.readback.items():
        mark = ("" if "effectiveness" not in tgt or p >= tgt["effectiveness"]
                else " &#10007;")
        reads.append(f"{html.escape(getattr(view.parents, name))} p={p:.2f}{mark}")
    line = f"<b>{html.escape(view.key)}</b>: {rev}"
    if reads:
        line += "; read-back " + ", ".join(reads)
    held_out = [m.removeprefix("held-out ") for m in q.misses if m.startswith("held-out")]
    if held_out and not q.caveat:
        line += f"; held-out misses: {html.escape(', '.join(held_out))}"
    if q.caveat and "effusion" in view.do:
        line += ('<br><span style="color:#f0a040">&#9888; do(effusion) is a stress test: it '
                 f"misses {html.escape(', '.join(held_out) or 'its targets')}; read lung "
                 "changes under it with care.</span>")
    return line


def _pct(x: float | None) -> str:
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.1f}%"
