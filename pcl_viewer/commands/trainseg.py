"""``pcl train-seg``: train the shipped lung segmentation bundle on the phantom."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pcl_viewer.device import DEVICES


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle folder to write (e.g. resources/models/seg-cpu).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".cache/data/ship"), show_default=True,
              help="Where the training pools are generated.")
@click.option("--n", "n", default=2000, show_default=True, help="Realistic gold-labelled pool.")
@click.option("--seed", default=201, show_default=True, help="Seed of that pool.")
@click.option("--easy-share", default=0.2, show_default=True,
              help="Extra easy-regime images as a share of --n.")
@click.option("--effusion-oversample", type=click.FloatRange(1.0, 1000.0), default=6.0,
              show_default=True,
              help="How much more likely a study of the realistic pool is to have effusion "
                   "(6: about 16 % of the pool).")
@click.option("--epochs", default=None, type=int, help="Epochs (default: the recipe's, 10).")
@click.option("--average-from", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.0,
              show_default=True,
              help="Average the weights from this share of the steps on (every 100 steps, "
                   "batch-norm statistics recomputed) and ship the average; 0: the last weights.")
@click.option("--eval-n", default=200, show_default=True, help="Fresh images per eval group.")
@click.option("--checkpoint", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of the resumable training state, kept in its subfolder last/ "
                   "(default: one under --cache named after the pool and recipe); run the same "
                   "command again to resume. Removed once the bundle is written.")
@click.option("--threads", default=None, type=int, help="Torch threads (default: all cores).")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
def train_seg(out: Path, cache: Path, n: int, seed: int, easy_share: float,
              effusion_oversample: float, epochs: int | None, average_from: float, eval_n: int,
              checkpoint: Path | None, threads: int | None, device: str) -> None:
    """Random-init U-Net, strong MONAI augmentation, realistic + easy phantom gold labels;
    scored on fresh images of both regimes and the unseen portable style. A killed run
    resumes from its checkpoint (every 500 steps) when started again."""
    from tqdm import tqdm

    from pcl_viewer.device import configure_threads
    from pcl_viewer.evaluate.benchmark_inputs import git_commit
    from pcl_viewer.evaluate.ship import train_shipped_segmenter

    if threads:
        configure_threads(threads)
    commit = git_commit()
    bar = tqdm(unit="step", desc="train-seg")

    def progress(step: int, total: int) -> None:
        bar.total = total
        bar.update(step - bar.n)

    try:
        train_shipped_segmenter(out, cache, n=n, seed=seed, easy_share=easy_share,
                                epochs=epochs, effusion_oversample=effusion_oversample,
                                average_from=average_from,
                                eval_n=eval_n, checkpoint=checkpoint,
                                command="pcl " + " ".join(sys.argv[1:]), echo=click.echo,
                                device=device, commit=commit, progress=progress)
    except ValueError as exc:  # a checkpoint of another run, a bad device: say so, no trace
        raise click.ClickException(str(exc)) from exc
    bar.close()
    click.echo(f"wrote {out}")
