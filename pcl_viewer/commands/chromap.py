"""``pcl chromap``: the CHRO-map figure of one scan and its counterfactuals, and its benchmark.

Examples::

    pcl chromap scan.png --out docs/figures/chromap.png
    pcl chromap scan.dcm --views factual,effusion --reducer umap --seed 0 --out fig.png
    pcl chromap --benchmark
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from pcl_viewer.chromap import MODES, REDUCERS
from pcl_viewer.parents import VIEW_KINDS

VIEW_NAMES: tuple[str, ...] = ("factual", *VIEW_KINDS)


def parse_views(text: str) -> list[str]:
    """``"factual,scanner"`` -> ``["factual", "scanner"]``; unknown or repeated names raise ValueError."""
    views = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEW_NAMES]
    if bad or not views or len(set(views)) != len(views):
        raise ValueError(f"--views takes distinct names from {', '.join(VIEW_NAMES)}; got {text!r}")
    return views


def chromap_inputs(pipe, scan, views: list[str]):
    """Run the pipeline for ``views`` and collect what the figure needs.

    Returns ``(names, images, features, classes, geometry)``: view titles, native
    ``(H, W)`` images, ``(V, 32, S, S)`` decoder features, ``(V, S, S)`` uint8
    predicted classes, and the native <-> segmentation-model :class:`Geometry`.
    """
    from pcl_viewer.pipeline import FACTUAL

    cf_views = [v for v in views if v != FACTUAL]
    result = pipe.run_sync(scan, interventions=cf_views, segment=False, chromap=False)
    missing = [v for v in views if v not in result.views]
    if missing:
        raise click.ClickException(f"the pipeline made no {missing} view(s): {result.errors}")
    chosen = [result.views[v] for v in views]
    seg = pipe.segment([view.image for view in chosen])
    return ([view.name for view in chosen], [view.image for view in chosen], seg.features,
            seg.classes, seg.geometries[0])


def _load_pipeline(seg_bundle: str, cf_bundle: str | None, device: str):
    from pcl_viewer.pipeline import Pipeline

    try:
        return Pipeline.from_bundles(cf_bundle=cf_bundle, seg_bundle=seg_bundle, device=device)
    except Exception as exc:  # BundleError, a CF module that does not exist yet, ...
        which = "counterfactual" if cf_bundle and str(cf_bundle) in str(exc) else "segmentation"
        hint = (" Counterfactual views need a CF bundle (train one with `pcl train-cf`), or "
                "draw the factual view alone with --views factual." if which == "counterfactual"
                else " Train one with `pcl bench` or pass --bundle PATH.")
        raise click.ClickException(f"cannot load the {which} bundle: {exc}.{hint}") from exc


@click.command("chromap")
@click.argument("scan", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bundle", "seg_bundle", default="seg-cpu", show_default=True,
              help="Segmentation bundle whose U-Net features are mapped (name or folder).")
@click.option("--cf-bundle", default="cf-cpu", show_default=True,
              help="Counterfactual bundle for the scanner/effusion/both views.")
@click.option("--views", default=",".join(VIEW_NAMES), show_default=True,
              help="Comma-separated views, from factual, scanner, effusion, both.")
@click.option("--reducer", type=click.Choice(REDUCERS), default="pca", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Colour weight of the blend (the reference uses 0.5).")
@click.option("--mode", type=click.Choice(MODES), default="blend", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Figure PNG.")
@click.option("--benchmark", is_flag=True, help="Time pca and umap against the reference UMAP.")
@click.option("--native", type=int, default=2048, show_default=True,
              help="Benchmark: native side the overlays are upsampled to.")
@click.option("--skip-reference", is_flag=True, help="Benchmark: skip the slow reference UMAP.")
def chromap(scan: Path | None, seg_bundle: str, cf_bundle: str, views: str, reducer: str,
            seed: int, alpha: float, mode: str, device: str, out: Path | None, benchmark: bool,
            native: int, skip_reference: bool) -> None:
    """CHRO-map figure of SCAN: the 2-D embedding beside the CHRO-maps of each view."""
    if benchmark:
        run_benchmark(seg_bundle, native=native, seed=seed, reference=not skip_reference)
        return
    if scan is None or out is None:
        raise click.UsageError("give SCAN and --out FIG.png (or --benchmark)")
    try:
        wanted = parse_views(views)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--views") from exc
    from pcl_viewer.chromap import ChroMap
    from pcl_viewer.chromap_figure import draw_chromap_figure
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError

    try:
        the_scan = read_scan(scan)
    except ScanReadError as exc:
        raise click.ClickException(str(exc)) from exc
    needs_cf = any(v != "factual" for v in wanted)
    pipe = _load_pipeline(seg_bundle, cf_bundle if needs_cf else None, device)
    t0 = time.perf_counter()
    names, images, feats, classes, geometry = chromap_inputs(pipe, the_scan, wanted)
    t1 = time.perf_counter()
    cmap = ChroMap.fit(feats, reducer=reducer, seed=seed, geometry=geometry)
    t2 = time.perf_counter()
    title = (f"{the_scan.name}: CHRO-map ({reducer}, seed {seed}), "
             f"features of {Path(pipe.bundles['seg'].path).name}")
    draw_chromap_figure(cmap, images, names, out, classes=classes, alpha=alpha, mode=mode,
                        title=title, seed=seed)
    click.echo(f"views {', '.join(names)}: features {t1 - t0:.2f} s, CHRO-map fit "
               f"{t2 - t1:.2f} s, figure {time.perf_counter() - t2:.2f} s -> {out}")


# -------------------------------------------------------------- benchmark ---


def benchmark_features(seg_bundle: str | None, native: int, seed: int = 0):
    """Four views of a synthetic ``native x native`` chest and their U-Net features.

    Features come from the segmentation bundle when it exists, else from a
    randomly initialised ``cpu``-preset U-Net (128 px, 32 channels). Views: the
    image and three stand-ins for counterfactuals (brighter; darker lower third;
    both), shaped like the CF residuals. Returns ``(images, features (4, 32, S, S),
    geometry, source)``.
    """
    import torch

    from pcl_viewer.models.unet import build_unet
    from pcl_viewer.pipeline import Pipeline

    net, source = None, "random cpu-preset U-Net"
    if seg_bundle:
        try:
            from pcl_viewer.models.bundle import ModelBundle, find_bundle

            path = find_bundle(seg_bundle)
            net, source = ModelBundle.load(path).build("unet"), f"bundle {path.name}"
        except Exception:  # no bundle yet: the timings do not depend on trained weights
            net = None
    if net is None:
        torch.manual_seed(seed)
        net = build_unet("cpu").eval()
    img = _synthetic_chest(native, seed)
    lower = np.zeros_like(img)
    lower[int(0.65 * native):] = 1.0
    images = [img, np.clip(img + 0.08, 0, 1), np.clip(img - 0.12 * lower, 0, 1),
              np.clip(img + 0.08 - 0.12 * lower, 0, 1)]
    seg = Pipeline(seg=net).segment(images)
    return images, seg.features, seg.geometries[0], source


def _synthetic_chest(n: int, seed: int) -> np.ndarray:
    """``(n, n)`` float32 [0, 1]: bright thorax, two dark lungs, mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    img = 0.55 + 0.25 * np.exp(-(((xx - 0.5) / 0.35) ** 2 + ((yy - 0.5) / 0.6) ** 2))
    for cx in (0.3, 0.7):
        img[(((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.3) ** 2) < 1] -= 0.35
    img += rng.normal(0, 0.02, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 1).astype(np.float32)


def _time_path(fit, images, repeats: int = 1) -> tuple[float, float]:
    """Best (wall, CPU) seconds over ``repeats`` of fit + one native overlay per view.

    CPU time is this process's, summed over its threads: on a shared machine it
    is what the wall time would be on an idle single core.
    """
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        cmap = fit()
        for v, img in enumerate(images):
            cmap.overlay(v, img)
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    return best


def run_benchmark(seg_bundle: str | None, native: int = 2048, seed: int = 0,
                  reference: bool = True) -> dict[str, float]:
    """Time the pca path, the subsample-umap path and the reference on the same features; print."""
    from pcl_viewer.chromap import ChroMap

    images, feats, geo, source = benchmark_features(seg_bundle, native, seed)
    v, c, s, _ = feats.shape
    click.echo(f"features: {v} views x {c} ch x {s}x{s} px ({v * s * s} pixels) from {source}; "
               f"overlays upsampled to {native}x{native}")
    times: dict[str, float] = {}

    def report(key: str, fit, repeats: int, note: str) -> None:
        times[key], times[f"{key}_cpu"] = _time_path(fit, images, repeats)
        click.echo(f"{key:10s} wall {times[key]:8.3f} s  CPU {times[f'{key}_cpu']:8.3f} s  {note}")

    report("pca", lambda: ChroMap.fit(feats, "pca", seed, geo), 3, "(best of 3; target < 0.5 s)")
    t0 = time.perf_counter()
    ChroMap.fit(feats[:, :, :16, :16], "umap", seed)  # numba JIT of umap-learn
    click.echo(f"umap warm-up {time.perf_counter() - t0:.1f} s (numba JIT, once per process; "
               "not counted)")
    report("umap", lambda: ChroMap.fit(feats, "umap", seed, geo), 1,
           "(seeded 4000-pixel fit, all pixels placed; warm; target < 20 s)")
    if reference:
        from pcl_viewer.chromap import reference_chromap

        t0 = time.perf_counter()
        reference_chromap(feats[:, :, :48, :48], seed)  # > 4096 points: JIT of pynndescent
        click.echo(f"reference warm-up {time.perf_counter() - t0:.1f} s (pynndescent JIT, "
                   "not counted)")
        report("reference", lambda: reference_chromap(feats, seed, geo), 1,
               f"(UMAP on all {v * s * s} pixels; warm)")
        for unit in ("", "_cpu"):
            click.echo(f"ratio ({'wall' if not unit else 'CPU'}): reference / umap "
                       f"{times['reference' + unit] / times['umap' + unit]:.1f}x, reference / pca "
                       f"{times['reference' + unit] / times['pca' + unit]:.0f}x")
    import os

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    click.echo(f"{os.cpu_count()} CPUs, 1-min load average {load:.1f} at the end (shared machines: "
               "compare ratios from one run)")
    return times
