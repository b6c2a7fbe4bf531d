"""Speed and responsiveness of the viewer: ``python -m pcl_viewer_napari.bench``.

Prints, on a 2048 x 2048 scan (parents, three counterfactuals, four
segmentations, CHRO-maps with pca):
- per-stage times of the pipeline called synchronously (no GUI);
- the same run through the dock widget, synchronously (``PCL_VIEWER_SYNC=1``,
  layers built inline) and in the napari worker, alternating so that both see the
  same load: totals, per-stage times, the Qt thread's CPU time, and their ratio;
- the largest gap of a 10 ms QTimer heartbeat during the worker runs.
``--cold`` first starts fresh processes (``--cold-runs``, default 1) and measures what a
user meets on a cold start: launch to a usable window (the process starting, torch,
napari, the window with the dock widget and the scan, its first events handled) and the
first *Run all* after that (bundles loaded in the worker, first layers of each kind).
Targets: window <= 5 s, first full result <= 3 s after the click, worker <= 1.2x
synchronous, heartbeat gap <= 100 ms. Needs a display (``xvfb-run -a`` on a server).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass


def big_scan(size: int):
    import cv2

    from pcl_viewer.data.scan import Scan
    from pcl_viewer_napari._sample_data import sample_scan

    s = sample_scan("imagingdynamics-effusion")
    img = cv2.resize(s.image, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    return Scan(img, spacing=(0.2, 0.2), name=f"scan{size}", metadata=dict(s.metadata))


def make_random_bundles(folder: str, preset: str = "cpu") -> tuple[str, str]:
    """Random-weight CF (HVAE + classifiers) and segmentation bundles of ``preset``."""
    from pathlib import Path

    import torch

    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.classifiers import build_classifiers
    from pcl_viewer.models.hvae import build_hvae
    from pcl_viewer.models.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    root = Path(folder)
    hvae, clf, unet = build_hvae(preset), build_classifiers(preset), build_unet(preset)
    save_bundle(root / f"cf-random-{preset}", {"name": f"cf-random-{preset}", "version": "0",
                                               "kind": "counterfactual"},
                {"hvae": ("hvae", {"hvae": hvae.cfg.to_dict()}, hvae),
                 "classifier": ("attribute-classifier", {"classifier": clf.cfg.to_dict()}, clf)})
    save_bundle(root / f"seg-random-{preset}", {"name": f"seg-random-{preset}", "version": "0",
                                                "kind": "segmentation"},
                {"unet": ("dense-unet", {"unet": UNetConfig.for_preset(preset).to_dict(),
                                         "heads": ["seg"]}, unet)})
    return str(root / f"cf-random-{preset}"), str(root / f"seg-random-{preset}")


def reference_unet_ms(repeats: int = 10) -> float:
    """Median wall time of one 128 px inference of the 'cpu' U-Net (about 16 ms on an
    idle 2-core machine: the baseline the bench divides by to estimate the load)."""
    import torch

    from pcl_viewer.models.unet import build_unet

    net = build_unet("cpu").eval()
    x = torch.rand(1, 1, 128, 128)
    times = []
    with torch.inference_mode():
        net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcl_viewer_napari.bench")
    p.add_argument("--bundle", default=None, help="counterfactual bundle (default cf-cpu)")
    p.add_argument("--seg-bundle", default=None, help="segmentation bundle (default seg-cpu)")
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-gui", action="store_true")
    p.add_argument("--cold", action="store_true",
                   help="also measure cold starts in fresh processes (window, first Run all)")
    p.add_argument("--cold-runs", type=int, default=1)
    p.add_argument("--cold-only", action="store_true", help="only the cold starts")
    p.add_argument("--cold-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preload-wait", type=float, default=None, metavar="S",
                   help="cold start: preload the bundles once the window is up (as pcl-viewer "
                        "does) and click Run all after at most S seconds")
    p.add_argument("--device", default="auto")
    p.add_argument("--random-bundles", metavar="DIR",
                   help="time randomly initialised 'cpu'-preset bundles written to DIR "
                        "(same networks as the shipped ones, before they exist)")
    args = p.parse_args(argv)
    if args.cold_child:
        return _cold_child(args)
    if args.cold or args.cold_only:
        _cold(args)
        if args.cold_only:
            return 0
    import torch  # noqa: F401  (before Qt)

    if args.random_bundles:
        args.bundle, args.seg_bundle = make_random_bundles(args.random_bundles)

    from pcl_viewer.pipeline import DEFAULT_CF_BUNDLE, DEFAULT_SEG_BUNDLE, Pipeline

    cf, seg = args.bundle or DEFAULT_CF_BUNDLE, args.seg_bundle or DEFAULT_SEG_BUNDLE
    pipe = Pipeline.from_bundles(cf, seg, args.device, strict=False)
    for err in pipe.load_errors:
        print(f"warning: {err}")
    if pipe.cf is None and pipe.seg is None:
        print("no bundle could be loaded; nothing to measure")
        return 1
    scan = big_scan(args.size)
    print(f"scan {scan.shape[0]}x{scan.shape[1]}, device {pipe.device}, torch threads "
          f"{torch.get_num_threads()}, bundles: "
          + ", ".join(f"{k}={b.name}" for k, b in pipe.bundles.items()))
    pipe.run_sync(scan)  # warm-up (allocators, first abduction)
    runs = []
    for _ in range(args.repeats):
        pipe._abductions.clear()  # time the full run, abduction and quality included
        pipe._qualities.clear()
        t0 = time.perf_counter()
        res = pipe.run_sync(scan)
        runs.append((time.perf_counter() - t0, res.timings, res.cpu_timings))
    runs.sort(key=lambda r: r[0])
    sync_s, timings, cpu = runs[len(runs) // 2]
    print(f"pipeline, synchronous, median of {args.repeats}: {sync_s:.3f} s wall, "
          f"{sum(cpu.values()):.3f} s CPU (all threads)")
    print(f"  {'stage':<12s} {'wall ms':>9s} {'CPU ms':>9s}")
    for stage, sec in timings.items():
        print(f"  {stage:<12s} {1000 * sec:9.1f} {1000 * cpu.get(stage, 0.0):9.1f}")
    print(f"  load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    ref = reference_unet_ms()
    print(f"  reference (one 128 px 'cpu' U-Net inference, 16 ms on an idle machine): "
          f"{ref:.0f} ms now -> slowdown x{ref / 16:.1f}; "
          f"full run estimated on an idle machine: {sync_s * 16 / ref:.2f} s")
    if args.no_gui:
        return 0
    return _gui(pipe, scan, cf, seg, sync_s, args.repeats)


@dataclass
class WidgetRun:
    """One full run through the dock widget."""

    seconds: float  # until the widget's run ended (``finished``)
    on_screen: float  # until the window had also painted the result
    max_gap_ms: float
    stages: dict[str, float]  # the pipeline's wall time per stage (s)
    qt_cpu: float  # CPU time of the Qt thread during the run (s): layers, paints, events
    layer_updates: list[tuple[str, float]]  # (item, s) partial results shown in the Qt thread


def _median(values) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


def _widget_run(widget, pipe, sync: bool) -> WidgetRun:
    from qtpy.QtWidgets import QApplication

    from pcl_viewer_napari._timing import run_and_measure

    os.environ["PCL_VIEWER_SYNC"] = "1" if sync else "0"
    pipe._abductions.clear()  # time the full run, abduction and quality included
    pipe._qualities.clear()
    cpu0 = time.thread_time()
    timing = run_and_measure(widget, "all")
    # A synchronous run freezes the window and paints only now; a worker run has painted
    # as it went. Two passes of the event loop: the pending repaints run in the first.
    end = time.perf_counter()
    for _ in range(2):
        QApplication.processEvents()
    on_screen = timing.seconds + time.perf_counter() - end
    qt_cpu = time.thread_time() - cpu0
    if timing.status != "ok":
        raise RuntimeError(f"widget run ended with {timing.status}: {widget.last_outcome}")
    result = widget.last_outcome[1]
    return WidgetRun(timing.seconds, on_screen, timing.max_gap_ms, dict(result.timings), qt_cpu,
                     list(widget.ui_timings))


def _gui(pipe, scan, cf, seg, sync_s: float, repeats: int) -> int:
    import napari

    from pcl_viewer_napari._reader import scan_layer_data
    from pcl_viewer_napari._state import AppState
    from pcl_viewer_napari._widget import PCLViewerWidget
    from pcl_viewer_napari._workers import worker_threads

    viewer = napari.Viewer(title="pcl-viewer bench")
    widget = PCLViewerWidget(viewer)
    viewer.window.add_dock_widget(widget, area="right")
    widget.model_panel.cf_combo.setCurrentText(cf)
    widget.model_panel.seg_combo.setCurrentText(seg)
    AppState.set(pipe, cf, seg, widget.model_panel.device_combo.currentText())
    data, kwargs, _ = scan_layer_data(scan)
    widget.select_scan(viewer.add_image(data, **kwargs))

    # Warm-up: the first layers of each kind cost texture and shader set-up. Then the
    # two modes alternate, so that both see the same load of a shared machine.
    _widget_run(widget, pipe, sync=False)
    _widget_run(widget, pipe, sync=True)
    runs: dict[str, list[WidgetRun]] = {"synchronous": [], "worker": []}
    for _ in range(repeats):
        runs["synchronous"].append(_widget_run(widget, pipe, sync=True))
        runs["worker"].append(_widget_run(widget, pipe, sync=False))
    os.environ.pop("PCL_VIEWER_SYNC", None)
    viewer.close()

    stages = list(runs["worker"][0].stages)
    print(f"widget, run all, {repeats} alternating pairs (medians; torch threads in a "
          f"widget run: {worker_threads()}):")
    print(f"  {'mode':<12s} {'total s':>8s} {'painted':>8s} {'Qt CPU s':>9s} {'layers s':>9s} "
          + " ".join(f"{st[:8]:>8s}" for st in stages))
    for mode, rs in runs.items():
        print(f"  {mode:<12s} {_median(r.seconds for r in rs):8.3f} "
              f"{_median(r.on_screen for r in rs):8.3f} "
              f"{_median(r.qt_cpu for r in rs):9.3f} "
              f"{_median(sum(s for _, s in r.layer_updates) for r in rs):9.3f} "
              + " ".join(f"{1000 * _median(r.stages.get(st, 0.0) for r in rs):8.0f}"
                         for st in stages))
    print("  (painted: until the window shows the result; stages in ms, synchronously with "
          "the layers built inside them, the chromap layers inside 'consistency')")
    sync_med = _median(r.seconds for r in runs["synchronous"])
    work_med = _median(r.seconds for r in runs["worker"])
    pairs = [w.seconds / s.seconds for s, w in zip(runs["synchronous"], runs["worker"])]
    painted = (_median(r.on_screen for r in runs["worker"])
               / _median(r.on_screen for r in runs["synchronous"]))
    print(f"worker / widget-synchronous: {work_med / sync_med:.2f}x (per pair: "
          + ", ".join(f"{x:.2f}" for x in pairs) + f"), until painted {painted:.2f}x; "
          f"worker / pipeline-synchronous: {work_med / sync_s:.2f}x")
    gaps = [r.max_gap_ms for r in runs["worker"]]
    print(f"heartbeat (10 ms QTimer) largest gap during worker runs: {max(gaps):.0f} ms "
          f"(median run {_median(gaps):.0f} ms)")
    slowest = sorted(((sec, item) for r in runs["worker"] for item, sec in r.layer_updates),
                     reverse=True)[:4]
    print("slowest layer updates in the Qt thread: "
          + ", ".join(f"{item} {1000 * sec:.0f} ms" for sec, item in slowest))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


def _preload_seconds():
    from pcl_viewer_napari._state import AppState

    return AppState.preload_seconds


def _cold(args) -> None:
    """Start ``--cold-runs`` fresh processes of :func:`_cold_child` and print their numbers."""
    import json
    import subprocess

    rows = []
    for _ in range(args.cold_runs):
        cmd = [sys.executable, "-m", "pcl_viewer_napari.bench", "--cold-child",
               "--size", str(args.size), "--device", args.device]
        if args.preload_wait is not None:
            cmd += ["--preload-wait", str(args.preload_wait)]
        for flag, value in (("--bundle", args.bundle), ("--seg-bundle", args.seg_bundle)):
            if value:
                cmd += [flag, value]
        load0 = os.getloadavg()[0]
        env = {**os.environ, "PCL_BENCH_T0": repr(time.time())}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        line = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if out.returncode != 0 or not line:
            print(f"cold start failed (rc {out.returncode}): {out.stderr[-2000:]}")
            return
        rows.append({**json.loads(line[-1]), "load": (load0, os.getloadavg()[0])})
    print(f"cold start, {len(rows)} fresh process(es), scan {args.size} px "
          "(targets: window <= 5 s, first full result <= 3 s after the click):")
    for r in rows:
        print(f"  window usable {r['window_s']:.2f} s (imports {r['imports_s']:.2f} s); first "
              f"Run all {r['first_run_s']:.2f} s after the click ({r['status']}, model work "
              f"{r['model_s']:.2f} s, heartbeat gap {r['gap_ms']:.0f} ms); second Run all "
              f"{r['second_run_s']:.2f} s; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}")
        if r.get("preload_s") is not None:
            print(f"    preload (bundles + warm-up, after the window was up): "
                  f"{r['preload_s']:.2f} s before the click")
        print("    first run, stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items()))


def _cold_child(args) -> int:
    """One cold start, as ``pcl-viewer`` does it; prints one JSON line of timings."""
    import json

    t0 = float(os.environ.get("PCL_BENCH_T0", time.time()))
    import napari  # noqa: F401  (imported here so its import time is measured)
    import torch  # noqa: F401  (before Qt)
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from pcl_viewer_napari._commands import new_viewer_with_widget
    from pcl_viewer_napari._reader import scan_layer_data
    from pcl_viewer_napari._timing import run_and_measure

    imports = time.time() - t0
    viewer, widget = new_viewer_with_widget(args.bundle, args.seg_bundle, args.device)
    data, kwargs, _ = scan_layer_data(big_scan(args.size))
    widget.select_scan(viewer.add_image(data, **kwargs))
    viewer.window._qt_window.show()
    usable: list[float] = []
    timer = QTimer(singleShot=True, interval=0)  # runs once the shown window's events are done
    timer.timeout.connect(lambda: usable.append(time.time() - t0))
    timer.start()
    while not usable:
        QApplication.processEvents()
    if args.preload_wait is not None:  # as pcl-viewer: bundles load while the user looks

        thread = widget.preload()
        t_wait = time.perf_counter()
        while thread.is_alive() and time.perf_counter() - t_wait < args.preload_wait:
            QApplication.processEvents()
            time.sleep(0.01)
    first = run_and_measure(widget, "all", timeout_s=600)
    result = widget.last_outcome[1] if first.status == "ok" else None
    second = run_and_measure(widget, "all", timeout_s=600)
    print(json.dumps({"window_s": usable[0], "imports_s": imports, "first_run_s": first.seconds,
                      "status": first.status, "gap_ms": first.max_gap_ms,
                      "model_s": sum(result.timings.values()) if result else float("nan"),
                      "stages": {k: round(v, 3) for k, v in (result.timings if result else {}).items()},
                      "second_run_s": second.seconds,
                      "preload_s": _preload_seconds()}))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
