"""``pcl pretrain``: dense contrastive pre-training (docs/method.md §3).

Examples::

    pcl pretrain --method dvd-cl --views true --data .cache/data/pool128 --preset cpu --out runs/dvd
    pcl pretrain --method s-mvd-cl --dagger --data DIR --preset smoke --out runs/smoke
    torchrun --nproc_per_node=2 -m pcl_viewer.cli pretrain --method mvd-cl ...

Writes RUN/config.json, RUN/log.jsonl, RUN/checkpoints/{last,best}, RUN/probe.json
and RUN/bundle (kind "pretrained"). Re-running the same command resumes.
"""

from __future__ import annotations

import shlex

import click

METHOD_NAMES = ("dvd-cl", "mvd-cl", "s-dvd-cl", "s-mvd-cl", "vader", "simclr", "ssdcl")


def _command_line(ctx: click.Context) -> str:
    """The invocation as ``pcl pretrain ...`` rebuilt from the parsed options (for the card)."""
    parts = ["pcl", "pretrain"]
    for name, value in ctx.params.items():
        if value is None or value is False or name == "progress":
            continue
        flag = "--data" if name == "data_dir" else "--" + name.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


@click.command("pretrain")
@click.option("--method", type=click.Choice(METHOD_NAMES), required=True)
@click.option("--dagger", is_flag=True, help="No counterfactuals (real image instead) and no augmentation.")
@click.option("--views", "views", type=click.Choice(["model", "true", "real"]), default="model",
              show_default=True,
              help="Counterfactual views: the CF model's precomputed views, the phantom's true "
                   "ones, or 'real': augmented copies of the real image in their place (the "
                   "augmented-views control: same loss, number of views and augmentation).")
@click.option("--cf-bundle", default=None, help="CF model bundle for --views model (default: shipped).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False), required=True)
@click.option("--preset", type=click.Choice(["smoke", "cpu", "paper"]), default="cpu", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Run folder.")
@click.option("--epochs", type=int, default=None, help="Default: 20 (smoke: 2).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Global batch in images (default 8).")
@click.option("--pixels", type=int, default=None, help="Sampled pixels per image (default 1000).")
@click.option("--max-steps", type=int, default=None, help="Cap on steps per epoch (timing, smoke).")
@click.option("--progress/--no-progress", default=True, show_default=True)
def pretrain(method, dagger, views, cf_bundle, data_dir, preset, out, epochs, seed, batch_size,
             pixels, max_steps, progress) -> None:
    """Dense contrastive pre-training of the U-Net (DVD-CL, MVD-CL, ... and baselines)."""
    from pcl_viewer.presets import IMAGE_SIZE
    from pcl_viewer.train.pretrain import METHODS, PretrainConfig, PretrainData
    from pcl_viewer.train.pretrain import pretrain as run

    cfg = PretrainConfig.for_preset(preset, method=method, dagger=dagger, views=views,
                                    epochs=epochs, seed=seed, batch_size=batch_size,
                                    pixels=pixels, max_steps_per_epoch=max_steps)
    m = METHODS[method]
    need_cf = m.views != "real" and not dagger and views != "real"
    try:
        data = PretrainData.from_dataset(data_dir, IMAGE_SIZE[preset], views=views, bundle=cf_bundle,
                                         need_counterfactuals=need_cf)
        summary = run(cfg, data, out, command=_command_line(click.get_current_context()),
                      progress=progress, echo=click.echo)
    except (ValueError, FileNotFoundError, ImportError) as exc:
        raise click.ClickException(str(exc)) from exc
    if summary:
        dice = summary["probe_dice"]
        click.echo(
            f"{method}{' (dagger)' if dagger else ''}: best epoch {summary['best_epoch']}, "
            f"probe Dice {'n/a' if dice is None else f'{dice:.4f}'}, "
            f"{summary['images_per_s']:.2f} images/s ({summary['s_per_step']:.2f} s/step); "
            f"bundle {out}/bundle"
        )
