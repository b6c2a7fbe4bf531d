"""``pcl segment``: segment the lungs of one scan with a segmentation bundle."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("scan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bundle", default=None, help="Segmentation bundle folder or name (default seg-cpu).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Label image to write (.png or .nii.gz): 0 background, 1 right, 2 left lung.")
def segment(scan: Path, bundle: str | None, out: Path) -> None:
    """Segment the lungs of SCAN (any size); labels are written at the scan's native size."""
    from pcl_viewer.data.readers import read_scan, write_labels
    from pcl_viewer.data.scan import ScanReadError
    from pcl_viewer.evaluate.phantom_eval import load_segmenter, segment_image
    from pcl_viewer.models.bundle import BundleError

    try:
        model, size, info = load_segmenter(bundle)
        image = read_scan(scan).image
    except (BundleError, ScanReadError) as exc:
        raise click.ClickException(str(exc)) from exc
    labels = segment_image(image, model, size)
    write_labels(out, labels)
    area = {k: float((labels == v).mean()) for k, v in (("right", 1), ("left", 2))}
    click.echo(f"{scan.name}: {image.shape[1]}x{image.shape[0]} px, bundle {info.name} "
               f"({info.fingerprint}); lung area right {100 * area['right']:.1f} % "
               f"left {100 * area['left']:.1f} % -> {out}")
