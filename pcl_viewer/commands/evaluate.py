"""``pcl evaluate``: score a segmentation bundle on fresh phantom data."""

from __future__ import annotations

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
def evaluate(bundle: str | None, n: int, seed: int, styles: tuple[str, ...],
             effusion_oversample: float, severe: bool, device: str) -> None:
    """Generate fresh phantom images and print Dice (%) overall / nf / pe, and HD95, ASD."""
    from pcl_viewer.evaluate.phantom_eval import evaluate_on_phantom, load_segmenter, summary_line
    from pcl_viewer.models.bundle import BundleError

    dev = _device(device)
    try:
        model, size, info = load_segmenter(bundle)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    groups = [list(styles)] if styles else [["imagingdynamics", "philips"], ["portable"]]
    click.echo(f"bundle {info.path} ({info.fingerprint}), {size} px, seed {seed}, n {n} per group"
               f", device {dev}")
    for r in evaluate_on_phantom(model, size, n, seed, groups, effusion_oversample, severe,
                                 device=dev):
        click.echo(f"{r['styles']:28s} {summary_line(r)}")
