"""``pcl-viewer``: napari with the pcl-viewer widget docked, a scan (or a sample) loaded.

    pcl-viewer [SCAN ...] [--bundle B] [--seg-bundle B] [--device D] [--screenshot PNG]
    pcl-viewer --benchmark          (same as python -m pcl_viewer_napari.bench)

``--screenshot`` runs the whole pipeline, saves a picture of the real window in its
default compare layout and exits (needs a display; use xvfb-run on a server).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pcl_viewer.device import DEVICES

DEFAULT_SAMPLE = "imagingdynamics-effusion"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pcl-viewer", description=__doc__.split("\n\n")[0])
    p.add_argument("scans", nargs="*", help="scan files (DICOM, PNG/JPEG/TIFF, NIfTI)")
    p.add_argument("--bundle", help="counterfactual bundle (folder or name; default cf-cpu)")
    p.add_argument("--seg-bundle", help="segmentation bundle (folder or name; default seg-cpu)")
    p.add_argument("--device", choices=DEVICES, help="torch device")
    p.add_argument("--sample", default=DEFAULT_SAMPLE, help="sample shown when no scan is given")
    p.add_argument("--screenshot", metavar="PNG", help="run everything, save the window, exit")
    p.add_argument("--benchmark", action="store_true", help="print speed/responsiveness, exit")
    return p


def usage_error(args: argparse.Namespace) -> str | None:
    """The one-line reason the arguments cannot work, checked before anything is imported."""
    from pcl_viewer_napari._sample_data import SAMPLES

    if args.sample not in SAMPLES:
        return f"unknown sample {args.sample!r}; choose one of {', '.join(SAMPLES)}"
    missing = [s for s in args.scans if not Path(s).exists()]
    if missing:
        return f"no such scan: {', '.join(missing)}"
    return None


def no_display() -> bool:
    """True on Linux without an X or Wayland display (Qt would abort with a long message)."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("QT_QPA_PLATFORM", "").startswith(("offscreen", "minimal", "vnc")):
        return False
    return not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = usage_error(args)
    if problem:
        print(f"pcl-viewer: {problem}", file=sys.stderr)
        return 2
    if no_display() and not args.benchmark:
        print("pcl-viewer: no display (DISPLAY and WAYLAND_DISPLAY are unset); run it on a "
              "desktop, or under xvfb-run for --screenshot", file=sys.stderr)
        return 2
    import torch  # noqa: F401  (torch before any QApplication exists)

    if args.benchmark:
        from pcl_viewer_napari import bench

        return bench.main([*(["--bundle", args.bundle] if args.bundle else []),
                           *(["--seg-bundle", args.seg_bundle] if args.seg_bundle else [])])
    import napari

    from pcl_viewer_napari._commands import new_viewer_with_widget

    viewer, widget = new_viewer_with_widget(args.bundle, args.seg_bundle, args.device)
    opened = [ly for path in args.scans for ly in widget.open_scan(path)]
    if args.scans and not opened:
        print(f"pcl-viewer: could not open {', '.join(args.scans)}", file=sys.stderr)
        viewer.close()
        return 1
    if not opened:
        from pcl_viewer_napari._sample_data import sample_layers

        for data, kwargs, _ in sample_layers(args.sample):
            widget.select_scan(viewer.add_image(data, **kwargs))
    notice = widget.model_panel.notice.text()
    if "No " in notice:
        from napari.utils.notifications import show_warning

        print(f"pcl-viewer: {notice}", file=sys.stderr)
        show_warning(f"pcl-viewer: {notice}")
    if args.screenshot:
        return _screenshot(viewer, widget, args.screenshot)
    from qtpy.QtCore import QTimer

    # the bundles load and warm up while the user looks at the window
    preload = QTimer(singleShot=True, interval=300)
    preload.timeout.connect(widget.preload)
    preload.start()
    napari.run()
    return 0


def _screenshot(viewer, widget, path: str) -> int:
    """Run everything on the scan shown, then save the window as it is by default (the
    compare layout: one tile per view with its lungs) and exit."""
    from pcl_viewer_napari._timing import run_and_measure

    viewer.window._qt_window.resize(1600, 1000)
    settle()
    timing = run_and_measure(widget, "all", timeout_s=600)
    print(f"pcl-viewer: run {timing.status} in {timing.seconds:.2f} s, "
          f"heartbeat gap {timing.max_gap_ms:.0f} ms")
    settle()
    viewer.reset_view()
    settle()
    viewer.screenshot(path, canvas_only=False, flash=False)
    print(f"pcl-viewer: screenshot saved to {path}")
    viewer.close()
    return 0 if timing.status == "ok" else 1


def settle(n: int = 10) -> None:
    """Let Qt handle pending events and paints."""
    from qtpy.QtWidgets import QApplication

    for _ in range(n):
        QApplication.processEvents()


if __name__ == "__main__":
    sys.exit(main())
