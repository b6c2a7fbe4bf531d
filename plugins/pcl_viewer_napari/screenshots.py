"""The app's screenshots in the docs, made from the real window.

    xvfb-run -a -s "-screen 0 1920x1200x24" python -m pcl_viewer_napari.screenshots docs/figures

(or ``make screenshots``) writes, with the shipped bundles and the ImagingDynamics
effusion sample:

- ``viewer.png``: the default window after *Run all* (compare layout: the scan and its
  counterfactuals side by side, lung labels on each, quality and caveats in the dock);
- ``linked_chromap.png``: the linked CHRO-map after a click in the scan's left lung (the
  feature highlighted in every view, its point marked in the embedding plot), with the
  factual CHRO-map shown;
- ``domain_banner.png``: the persistent out-of-domain banner on a photograph.
"""

from __future__ import annotations

import sys
from pathlib import Path

SAMPLE = "imagingdynamics-effusion"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/figures")
    out.mkdir(parents=True, exist_ok=True)
    import napari
    import numpy as np
    import torch  # noqa: F401  (torch before any QApplication exists)

    from pcl_viewer_napari._commands import dock_widget
    from pcl_viewer_napari._sample_data import sample_layers
    from pcl_viewer_napari._timing import run_and_measure
    from pcl_viewer_napari.launcher import settle

    viewer = napari.Viewer(title="pcl-viewer")
    viewer.window._qt_window.resize(1600, 1150)
    widget = dock_widget(viewer)
    (scan,) = [viewer.add_image(d, **k) for d, k, _ in sample_layers(SAMPLE)]
    widget.select_scan(scan)
    settle()
    timing = run_and_measure(widget, "all", timeout_s=600)
    if timing.status != "ok":
        print(f"screenshots: the run ended with {timing.status}", file=sys.stderr)
        return 1
    settle()
    viewer.reset_view()
    settle()
    shot(viewer, out / "viewer.png")

    result = widget.result_for(scan)
    labels = result.views["factual"].labels
    rows, cols = np.nonzero(labels == 2)  # a pixel inside the left lung
    pick = len(rows) // 3
    pixel = np.array([rows[pick], cols[pick]], np.float64)
    widget.analysis_panel.link_check.setChecked(True)
    widget.set_chromap_visible("factual", True)
    widget.link_at(np.asarray(scan.translate) + np.asarray(scan.scale) * pixel)
    bar = widget.scroll.verticalScrollBar()
    bar.setValue(bar.maximum())  # the embedding plot with the pixel's point
    settle()
    shot(viewer, out / "linked_chromap.png")

    from skimage import data

    widget.analysis_panel.link_check.setChecked(False)
    photo = viewer.add_image(data.camera().astype(np.float32) / 255.0, name="camera photo")
    for ly in viewer.layers:
        ly.visible = ly is photo
    widget.select_scan(photo)
    run_and_measure(widget, "parents", timeout_s=600)
    widget.scroll.verticalScrollBar().setValue(0)
    viewer.reset_view()
    settle()
    shot(viewer, out / "domain_banner.png")
    viewer.close()
    return 0


def shot(viewer, path: Path) -> None:
    viewer.screenshot(str(path), canvas_only=False, flash=False)
    print(f"screenshots: {path}")


if __name__ == "__main__":
    sys.exit(main())
