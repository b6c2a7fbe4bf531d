"""``pcl phantom ...``: priors, generate, silver, montage, samples."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def phantom() -> None:
    """The phantom chest X-ray structural causal model and its datasets."""


@phantom.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: the shipped resources/priors).")
@click.option("--source", type=click.Path(path_type=Path), default=None,
              help="torchxrayvision data folder (default: found in the installed package).")
def priors(out: Path | None, source: Path | None) -> None:
    """Rebuild the lung shape model and the PadChest probability tables."""
    from pcl_viewer.data.phantom.build_priors import build_all

    report = build_all(out, source)
    click.echo(json.dumps(report, indent=1))


@phantom.command()
@click.option("--n", "n", type=int, default=200, show_default=True, help="Number of images.")
@click.option("--size", type=int, default=128, show_default=True, help="Image size (pixels).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--counterfactuals/--no-counterfactuals", default=False,
              help="Also write the three true counterfactuals of every image.")
@click.option("--effusion-oversample", type=float, default=1.0, show_default=True,
              help="Multiplies the odds of effusion (1 = calibrated to PadChest).")
@click.option("--styles", default="philips,imagingdynamics", show_default=True,
              help="Comma-separated acquisition styles (add 'portable' for OOD data).")
@click.option("--severe", is_flag=True, help="Only moderate-to-large effusions.")
@click.option("--studies-per-patient", type=int, default=2, show_default=True,
              help="Maximum number of studies per patient.")
@click.option("--workers", type=int, default=None, help="Processes (default: up to 2).")
@click.option("--regime", type=click.Choice(["realistic", "easy"]), default="realistic",
              show_default=True,
              help="realistic: radiograph-like difficulty; easy: the earlier look (regression).")
def generate(n: int, size: int, seed: int, out: Path, counterfactuals: bool,
             effusion_oversample: float, styles: str, severe: bool, studies_per_patient: int,
             workers: int | None, regime: str) -> None:
    """Write a phantom dataset in the PadChest/CheXmask-like layout."""
    from tqdm import tqdm

    from pcl_viewer.data.phantom.generate import default_workers
    from pcl_viewer.data.phantom.generate import generate as run

    style_t = tuple(s.strip() for s in styles.split(",") if s.strip())
    bar = tqdm(total=n, desc="phantom", unit="img")

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    summary = run(out, n, size, seed, counterfactuals=counterfactuals,
                  oversample=effusion_oversample, styles=style_t, severe=severe,
                  studies_per_patient=studies_per_patient,
                  workers=workers or default_workers(), progress=progress, regime=regime)
    bar.close()
    click.echo(f"wrote {n} images ({summary['n_patients']} patients, effusion "
               f"{summary['effusion_rate']:.1%}) to {out}")
    extra = " (4 views each)" if counterfactuals else ""
    click.echo(f"speed: {summary['images_per_second']:.1f} images/s{extra} at {size} px "
               f"with {summary['workers']} worker(s) (wall clock)")
    click.echo(f"cost: {summary['cpu_ms_per_image']:.1f} CPU-ms per image "
               f"= {summary['images_per_cpu_second']:.0f} images/s per free core "
               "(the wall-clock figure drops when other jobs share the cores)")


@phantom.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), required=True)
@click.option("--n-train", type=int, default=200, show_default=True,
              help="Gold normal images of one scanner the silver segmenter trains on.")
@click.option("--scanner", default="philips", show_default=True)
@click.option("--steps", type=int, default=800, show_default=True, help="Training steps.")
@click.option("--threshold", type=float, default=0.7, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def silver(data: Path, n_train: int, scanner: str, steps: int, threshold: float,
           seed: int) -> None:
    """AI-generated silver masks with a quality score, as CheXmask."""
    from pcl_viewer.data.phantom.silver import make_silver

    report = make_silver(data, n_train=n_train, scanner=scanner, steps=steps,
                         threshold=threshold, seed=seed, echo=click.echo)
    click.echo(json.dumps(report["dice"], indent=1))


@phantom.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("docs/figures/phantom.png"),
              show_default=True)
@click.option("--size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--regime", type=click.Choice(["realistic", "easy"]), default="realistic",
              show_default=True,
              help="realistic: radiograph-like difficulty; easy: the earlier look (regression).")
def montage(out: Path, size: int, seed: int, regime: str) -> None:
    """Figure: scanners and findings, gold contour, true counterfactuals."""
    from pcl_viewer.data.phantom.montage import make_montage

    make_montage(out, size=size, seed=seed, regime=regime)
    click.echo(f"wrote {out}")


@phantom.command()
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder (default: the shipped resources/samples).")
@click.option("--size", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--regime", type=click.Choice(["realistic", "easy"]), default="realistic",
              show_default=True)
def samples(out: Path | None, size: int, seed: int, regime: str) -> None:
    """Write the shipped 512-px sample scans and samples.json."""
    from pcl_viewer.data.phantom.montage import write_samples
    from pcl_viewer.paths import samples_dir

    info = write_samples(out or samples_dir(), size=size, seed=seed, regime=regime)
    click.echo(f"wrote {len(info)} samples to {out or samples_dir()}")


@phantom.command()
@click.option("--data", "data_root", type=click.Path(path_type=Path),
              default=Path(".cache/data/calibration"), show_default=True,
              help="Where the benchmark's gold set is generated.")
@click.option("--out", type=click.Path(path_type=Path),
              default=Path("docs/results/phantom_calibration.csv"), show_default=True,
              help="Calibration history (appended).")
@click.option("--description", required=True, help="The renderer parameters of this run.")
@click.option("--folds", default="0,1", show_default=True, help="Benchmark folds to run.")
@click.option("--budgets", default="all,32,8", show_default=True, help="Label budgets.")
@click.option("--regime", type=click.Choice(["realistic", "easy"]), default=None,
              help="Phantom regime (default realistic).")
@click.option("--threads", default=1, show_default=True, help="Torch threads.")
def calibrate(data_root: Path, out: Path, description: str, folds: str, budgets: str,
              regime: str | None, threads: int) -> None:
    """Score the random-init row (the benchmark's cpu protocol) on the phantom: the
    difficulty calibration. Never run on the contrastive rows."""
    from pcl_viewer.device import configure_threads
    from pcl_viewer.evaluate.calibration import calibrate_none_row, summarise

    configure_threads(threads)
    rows = calibrate_none_row(data_root, out, description,
                              folds=tuple(int(f) for f in folds.split(",")),
                              budgets=tuple(budgets.split(",")), regime=regime, echo=click.echo)
    for b, m in summarise(rows).items():
        click.echo(f"budget {b}: Dice overall {m['dice']:.2f}  nf {m['dice_nf']:.2f}  "
                   f"pe {m['dice_pe']:.2f}")


@phantom.command()
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--n", "n", type=int, default=200, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", type=int, default=128, show_default=True)
def independent(out: Path, n: int, seed: int, size: int) -> None:
    """A validation set drawn by a second, deliberately different renderer around the
    phantom's gold masks (images/, masks/, labels.csv for `pcl evaluate --images`).
    For validation only: never train on it."""
    from pcl_viewer.evaluate.independent import write_independent_set

    info = write_independent_set(out, n, seed, size)
    click.echo(f"wrote {info['n']} images (effusion {info['effusion_share']:.0%}) to {out}")



@phantom.command()
@click.option("--n", type=int, default=300, show_default=True)
@click.option("--seed", type=int, default=9001, show_default=True)
@click.option("--size", type=int, default=128, show_default=True)
@click.option("--bundle", default=None,
              help="Also score this segmentation bundle on the same studies, against the gold "
                   "and against the consensus masks (its error without the label noise).")
def ceiling(n: int, seed: int, size: int, bundle: str | None) -> None:
    """Best Dice any model can reach on the realistic gold labels (annotator noise)."""
    from pcl_viewer.evaluate.phantom_eval import annotator_ceiling, load_segmenter
    from pcl_viewer.models.bundle import BundleError

    model = model_size = None
    if bundle:
        try:
            model, model_size, _ = load_segmenter(bundle)
            model.eval()
        except (BundleError, FileNotFoundError) as exc:
            raise click.BadParameter(str(exc), param_hint="--bundle") from exc
    r = annotator_ceiling(n, seed, size, model=model, model_size=model_size)

    def line(name: str, d: dict) -> str:
        return (f"{name}, seed {seed}: Dice % overall {d['dice']:.2f} (n={r['n']})  "
                f"nf {d['dice_nf']:.2f} (n={r['n_nf']})  pe {d['dice_pe']:.2f} (n={r['n_pe']})")

    click.echo(line("consensus annotator vs gold", r))
    if model is not None:
        click.echo(line(f"{bundle} vs gold", r["model_vs_gold"]))
        click.echo(line(f"{bundle} vs consensus", r["model_vs_consensus"]))
