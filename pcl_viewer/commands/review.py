"""``pcl review``: batch robustness review of a folder or CSV of scans (see docs/review.md)."""

from __future__ import annotations

from pathlib import Path

import click


def rv_defaults() -> tuple[float, float]:
    """Defaults of --max-megapixels and --decode-timeout, from the review module."""
    from pcl_viewer.review import DEFAULT_DECODE_TIMEOUT_S, DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS / 1e6, DEFAULT_DECODE_TIMEOUT_S


def _bundle_arg(value: str | None) -> str | None:
    return None if value is None or value.lower() in ("none", "") else value


@click.command("review")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Report folder: report.csv, report.html, errors.csv and the resume journal.")
@click.option("--bundle", "cf_bundle", default="cf-cpu", show_default=True,
              help="Counterfactual bundle (name or path); 'none' reviews without counterfactuals.")
@click.option("--seg-bundle", default="seg-cpu", show_default=True,
              help="Segmentation bundle (name or path).")
@click.option("--threshold", default=0.9, show_default=True, type=click.FloatRange(0, 1),
              help="Flag a counterfactual whose lung Dice vs the factual is below this.")
@click.option("--area-threshold", default=0.1, show_default=True, type=click.FloatRange(0),
              help="Flag a lung-area change (fraction) beyond +/- this.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1),
              help="Scans per batch (inference and resume granularity).")
@click.option("--max-megapixels", default=rv_defaults()[0], show_default=True,
              type=click.FloatRange(1, 1000),
              help="Pixel budget (millions): the scans decoded at once (the batch in the models "
                   "plus the read-ahead) hold at most this many pixels; a larger scan is an "
                   "error row. Peak memory is about 0.5 GB + 24 bytes per pixel of budget.")
@click.option("--decode-timeout", default=rv_defaults()[1], show_default=True,
              type=click.FloatRange(0),
              help="Seconds one file may take to decode before it becomes an error row "
                   "(0: no limit).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1),
              help="Threads reading files ahead of the model.")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(["auto", "cuda", "mps", "cpu"]))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="torch intra-op threads on the CPU. One is fastest here: the batched small "
                   "convolutions scale poorly across threads, and file decoding uses the other "
                   "cores.")
@click.option("--restart", is_flag=True, help="Discard the journal in --out and start over.")
@click.option("--merge", is_flag=True,
              help="INPUTS are report folders (shards): merge their journals into --out.")
def review(inputs: tuple[str, ...], out: str, cf_bundle: str, seg_bundle: str, threshold: float,
           area_threshold: float, batch_size: int, max_megapixels: float, decode_timeout: float,
           workers: int, device: str, threads: int, restart: bool, merge: bool) -> None:
    """Review INPUT (a folder, searched recursively, or a CSV with a 'path' column).

    For each scan: inferred parents, counterfactuals by scanner and by effusion,
    lung segmentation of every view, Dice and lung-area change of each
    counterfactual's segmentation against the factual one. Re-running with the
    same --out resumes: finished scans are skipped.

    \b
    pcl review scans/ --out report/
    pcl review --merge report-node1/ report-node2/ --out report/
    """
    from pcl_viewer.atomic import LockedError, one_line_os_error

    try:
        _review(inputs, out, cf_bundle, seg_bundle, threshold, area_threshold, batch_size,
                max_megapixels, decode_timeout, workers, device, threads, restart, merge)
    except (LockedError, ValueError, FileNotFoundError) as exc:
        # e.g. another review writing --out, a journal made with other models or settings
        from pcl_viewer.review import display_text

        raise click.ClickException(display_text(exc)) from exc
    except OSError as exc:  # a full disk, a read-only folder: one line, no traceback
        raise click.ClickException(one_line_os_error(exc)) from exc


def _review(inputs: tuple[str, ...], out: str, cf_bundle: str, seg_bundle: str,
            threshold: float, area_threshold: float, batch_size: int, max_megapixels: float,
            decode_timeout: float, workers: int, device: str, threads: int, restart: bool,
            merge: bool) -> None:
    from pcl_viewer import review as rv

    cfg = rv.ReviewConfig(threshold=threshold, area_threshold=area_threshold,
                          batch_size=batch_size, read_workers=workers,
                          max_pixels=int(round(max_megapixels * 1e6)),
                          decode_timeout_s=decode_timeout or None)
    if merge:
        files = rv.merge(inputs, out, cfg)
        click.echo(f"merged {len(inputs)} reports into {rv.display_text(files['html'])}")
        return
    if len(inputs) != 1:
        raise click.UsageError("give one INPUT (folder or CSV), or --merge REPORT1 REPORT2 ...")
    out_path = Path(out)
    rv.fixed_mmap_threshold()  # freed native-size images go back to the system at once
    pipeline = _pipeline(cf_bundle, seg_bundle, device)
    if pipeline.device == "cpu":
        from pcl_viewer.device import configure_threads

        configure_threads(threads)
    bundles = {k: f"{b.name}@{b.fingerprint}" for k, b in pipeline.bundles.items()}
    for notice in _bundle_notices(pipeline):
        click.echo(f"note: {notice}", err=True)
    from tqdm import tqdm

    gen = rv.iter_review(inputs[0], out_path, pipeline, cfg, bundles=bundles, restart=restart)
    with tqdm(unit="scan", desc="review", dynamic_ncols=True) as bar:
        while True:
            try:
                step = next(gen)
            except StopIteration as stop:
                summary = stop.value
                break
            bar.total = step.total
            bar.update(step.done - bar.n)
    click.echo(
        f"reviewed {summary.processed} scans in {summary.seconds:.1f} s: "
        f"{summary.rate:.2f} scans/s ({summary.skipped} already done; "
        f"{summary.cpu_per_scan:.3f} CPU-s per scan); "
        f"{summary.flagged} flagged, {summary.errors} unreadable"
    )
    click.echo(f"report: {rv.display_text(summary.files['html'])}")


def _bundle_notices(pipeline) -> list[str]:
    """The "unverified bundle" line of every bundle in use that is not a pinned shipped one."""
    from pcl_viewer.models.bundle import BundleError, ModelBundle

    notices = []
    for info in pipeline.bundles.values():
        path = getattr(info, "path", None)
        if not path or not Path(path).is_dir():
            continue
        try:
            notice = ModelBundle.load(path).notice
        except BundleError as exc:
            notice = str(exc)
        if notice:
            notices.append(notice)
    return notices


def _pipeline(cf_bundle: str | None, seg_bundle: str | None, device: str):
    from pcl_viewer.models.bundle import BundleError
    from pcl_viewer.pipeline import Pipeline

    try:
        pipeline = Pipeline.from_bundles(_bundle_arg(cf_bundle), _bundle_arg(seg_bundle), device)
    except (BundleError, ValueError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    return pipeline
