"""``pcl segment``: segment the lungs of one scan with a segmentation bundle."""

from __future__ import annotations

from pathlib import Path

import click

OUT_SUFFIXES = (".png", ".nii", ".nii.gz", ".dcm")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@click.command()
@click.argument("scan", type=click.Path(path_type=Path))
@click.option("--bundle", default=None, help="Segmentation bundle folder or name (default seg-cpu).")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Label file to write: .png or .nii/.nii.gz (0 background, 1 right, 2 left "
                   "lung), or .dcm: a DICOM SEG referencing SCAN (SCAN must be DICOM).")
def segment(scan: Path, bundle: str | None, out: Path) -> None:
    """Segment the lungs of SCAN (any size); labels are written at the scan's native size.

    Every user error (missing or unreadable scan, bad bundle, unsupported output)
    is one line on stderr and exit status 1.
    """
    from pcl_viewer.data.readers import read_scan, write_labels
    from pcl_viewer.data.scan import ScanReadError

    name = out.name.lower()
    if not name.endswith(OUT_SUFFIXES):
        raise click.ClickException(f"{out}: unsupported output extension; supported: "
                                   f"{', '.join(OUT_SUFFIXES)}")
    try:
        the_scan = read_scan(scan)
    except ScanReadError as exc:
        raise click.ClickException(str(exc)) from None
    dicom_out = name.endswith(".dcm")
    if dicom_out and the_scan.metadata.get("format") != "dicom":
        raise click.ClickException(f"{out}: a DICOM SEG references its source image, but {scan} "
                                   "is not DICOM; write .png or .nii.gz instead")
    from pcl_viewer.pipeline import DEFAULT_SEG_BUNDLE, Pipeline

    try:
        pipe = Pipeline.from_bundles(cf_bundle=None, seg_bundle=bundle or DEFAULT_SEG_BUNDLE,
                                     device="cpu")
    except Exception as exc:  # BundleError and whatever a malformed bundle raises: one line
        raise click.ClickException(f"cannot load the segmentation bundle "
                                   f"{bundle or '(default)'}: {_first_line(exc)}") from None
    info = pipe.bundles["seg"]
    image = the_scan.image
    labels = pipe.segment([image]).labels[0]
    try:
        if dicom_out:
            from pcl_viewer.data.dicom_seg import write_dicom_seg

            write_dicom_seg(out, labels, scan)
        else:
            write_labels(out, labels, spacing=the_scan.spacing)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{out}: cannot write: {_first_line(exc)}") from None
    area = {k: float((labels == v).mean()) for k, v in (("right", 1), ("left", 2))}
    click.echo(f"{scan.name}: {image.shape[1]}x{image.shape[0]} px, bundle {info.name} "
               f"({info.fingerprint}); lung area right {100 * area['right']:.1f} % "
               f"left {100 * area['left']:.1f} % -> {out}")
