"""``pcl evaluate``: score a segmentation bundle on fresh phantom data."""

from __future__ import annotations

import csv
from pathlib import Path

import click

from pcl_viewer.commands.bench import _device
from pcl_viewer.device import DEVICES


@click.command()
@click.option("--bundle", default=None, help="Segmentation bundle folder or name (default seg-cpu).")
@click.option("--phantom-n", "n", default=120, show_default=True, help="Images per style.")
@click.option("--seed", default=7, show_default=True, help="Phantom seed (use one never trained on).")
@click.option("--style", "styles", multiple=True,
              help="Scanner style(s): imagingdynamics, philips, portable. Default: the two "
                   "training scanners together, then portable.")
@click.option("--effusion-oversample", default=8.0, show_default=True,
              help="Oversampling of effusion so the pe subgroup is large enough.")
@click.option("--severe", is_flag=True, help="Severe effusion only.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Where the network runs (auto: cuda, else mps, else cpu; bfloat16 on cuda).")
@click.option("--regime", type=click.Choice(["realistic", "easy"]), default="realistic",
              show_default=True, help="Phantom regime of the fresh images.")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Score a labelled folder instead of fresh phantom images.")
@click.option("--masks", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Label PNGs named like the scans (0 bg, 1 right, 2 left lung).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Optional CSV with columns file,effusion (0/1) for nf / pe.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Per-image CSV (folder mode).")
def evaluate(bundle: str | None, n: int, seed: int, styles: tuple[str, ...],
             effusion_oversample: float, severe: bool, device: str, regime: str,
             images: Path | None, masks: Path | None, labels: Path | None,
             out: Path | None) -> None:
    """Print Dice (%) overall / nf / pe, and HD95, ASD: on fresh phantom images, or on a
    labelled folder (--images DIR --masks DIR)."""
    from pcl_viewer.evaluate.phantom_eval import evaluate_on_phantom, load_segmenter, summary_line
    from pcl_viewer.models.bundle import BundleError

    if (images is None) != (masks is None):
        raise click.UsageError("--images and --masks go together")
    if out is not None and images is None:
        raise click.UsageError("--out writes the per-image CSV of the folder mode (--images)")
    dev = _device(device)
    try:
        model, size, info = load_segmenter(bundle)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    if images is not None:
        _evaluate_folder(model, size, info, images, masks, labels, out)
        return
    groups = [list(styles)] if styles else [["imagingdynamics", "philips"], ["portable"]]
    click.echo(f"bundle {info.path} ({info.fingerprint}), {size} px, seed {seed}, n {n} per group"
               f", device {dev}")
    for r in evaluate_on_phantom(model, size, n, seed, groups, effusion_oversample, severe,
                                 device=dev, regime=regime):
        click.echo(f"{r['styles']:28s} {summary_line(r)}")


def _evaluate_folder(model, size: int, info, images: Path, masks: Path, labels: Path | None,
                     out: Path | None) -> None:
    from pcl_viewer.data.scan import ScanReadError
    from pcl_viewer.evaluate.phantom_eval import evaluate_folder, summary_line

    effusion = None
    if labels is not None:
        with open(labels, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or not {"file", "effusion"} <= set(rows[0]):
            raise click.ClickException(f"{labels}: needs the columns file,effusion")
        effusion = {r["file"]: r["effusion"].strip() in ("1", "true", "True", "yes") for r in rows}
    try:
        r, per = evaluate_folder(model, size, images, masks, effusion)
    except (ValueError, ScanReadError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"bundle {info.path} ({info.fingerprint}), {size} px, folder {images}")
    click.echo(f"{'folder':28s} {summary_line(r)}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["file", "effusion", "dice", "hd95", "asd"])
            w.writeheader()
            w.writerows({k: (round(v, 3) if isinstance(v, float) else v) for k, v in p.items()}
                        for p in per)
        click.echo(f"per-image scores -> {out}")
