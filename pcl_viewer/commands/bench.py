"""``pcl bench``: the fine-tuning benchmark and the shipped segmentation model."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import click

from pcl_viewer.device import DEVICES


def _device(device: str) -> str:
    """Resolve ``--device`` now, so an unavailable choice fails before any work."""
    from pcl_viewer.device import resolve_device

    try:
        return str(resolve_device(device))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--device") from None


def check_cell_devices(cells: list[dict], device: str, cells_dir: Path) -> None:
    """Refuse to add cells fine-tuned on another kind of device than the finished ones.

    A cell's device is ``train_log.device`` (cells written before devices existed ran on
    the CPU). CPU and CUDA runs differ (bfloat16 autocast, other kernels), so one table
    must not mix them.
    """
    kind = device.split(":")[0]
    other = sorted({str(c.get("train_log", {}).get("device", "cpu")).split(":")[0]
                    for c in cells} - {kind})
    if other:
        n = sum(str(c.get("train_log", {}).get("device", "cpu")).split(":")[0] != kind
                for c in cells)
        raise click.ClickException(
            f"{n} finished cells in {cells_dir} were fine-tuned on {', '.join(other)}, this run "
            f"would fine-tune on {kind}: one table must not mix devices. Pass --device "
            f"{other[0]} to continue the grid, or delete those cells to redo them on {kind}.")


def benchmark_line(table: Path, slug: str) -> dict | None:
    """The row ``slug``'s line of a ``benchmark.csv`` (strings as written), or None."""
    import csv

    from pcl_viewer.evaluate.benchmark import ROW_BY_SLUG

    if not table.is_file():
        return None
    with open(table, newline="") as fh:
        for line in csv.DictReader(fh):
            if line.get("method") == ROW_BY_SLUG[slug].name:
                return dict(line) | {"table": str(table)}
    return None


def load_sets(cfg, data_root: Path, runs: Path, cf_bundle: str | None, real: Path | None):
    """(evaluation and OOD sets, row initialiser) of the phantom or of a real folder."""
    from pcl_viewer.evaluate.benchmark_inputs import RowInitialiser, bench_sets, real_sets

    if real is None:
        return bench_sets(cfg, data_root), RowInitialiser(cfg, data_root, runs, cf_bundle=cf_bundle)
    try:
        sets, pool = real_sets(cfg, real)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    return sets, RowInitialiser(cfg, data_root, runs, cf_bundle=cf_bundle, real_pool=pool)


def _score_bundle(cfg, data_root: Path, runs: Path, real: Path | None, bundle: str) -> None:
    """Print a segmentation bundle's Dice (%) on each fold's test images and the mean, in
    the table's columns (w74: nf and pe re-weighted to 74 % effusion)."""
    import numpy as np

    from pcl_viewer.evaluate.benchmark import score_bundle_on_folds
    from pcl_viewer.evaluate.benchmark_report import dice_w74
    from pcl_viewer.evaluate.phantom_eval import load_segmenter
    from pcl_viewer.models.bundle import BundleError

    try:
        model, size, info = load_segmenter(bundle)
    except BundleError as exc:
        raise click.ClickException(str(exc)) from exc
    if size != cfg.image_size:
        raise click.ClickException(f"{info.path} takes {size} px images, the {cfg.name} "
                                   f"preset's are {cfg.image_size} px")
    sets, _ = load_sets(cfg, data_root, runs, None, real)
    rows = score_bundle_on_folds(cfg, sets, model)
    cols = ("overall", "nf", "pe", *sets.ood)
    click.echo(f"bundle {info.path} ({info.fingerprint}) on the {cfg.name} preset's test folds "
               f"({sets.description}); Dice %")
    click.echo("fold  " + "  ".join(f"{c:>9s}" for c in (*cols, "w74")))
    table = []
    for r in rows:
        w74 = dice_w74(r)
        vals = [r[c]["dice"] for c in cols] + [float("nan") if w74 is None else w74]
        table.append(vals)
        click.echo(f"{r['fold']:>4d}  " + "  ".join(f"{v:9.2f}" for v in vals))
    mean, std = np.mean(table, axis=0), np.std(table, axis=0, ddof=1) if len(table) > 1 else None
    click.echo("mean  " + "  ".join(f"{v:9.2f}" for v in mean))
    if std is not None:
        click.echo("std   " + "  ".join(f"{v:9.2f}" for v in std))


def prepare_inputs(cfg, data_root: Path, runs: Path, rows, cf_bundle: str | None,
                   real: Path | None = None) -> None:
    """Generate the gold/OOD sets and the pool, and cache the model views, once.

    Several ``pcl bench --rows ...`` processes may then share the cache without racing
    on the same files.
    """
    import time

    from pcl_viewer.data.cf_views import load_views

    t0 = time.perf_counter()
    sets, init = load_sets(cfg, data_root, runs, cf_bundle, real)
    click.echo(f"evaluation sets ready: {sets.description or data_root} "
               f"({time.perf_counter() - t0:.0f} s)")
    if all(r.kind == "none" for r in rows):
        return
    ds = init.pool_dataset()
    ds.arrays(cfg.image_size)  # the stacked-array cache every row process reads
    click.echo(f"pool ready: {len(ds)} images ({time.perf_counter() - t0:.0f} s)")
    if any(r.views == "model" for r in rows) and init.has_cf_model():
        views = load_views(ds, "model", cf_bundle)
        click.echo(f"model views ready: {views.shape} ({time.perf_counter() - t0:.0f} s)")


@click.command()
@click.option("--preset", type=click.Choice(["smoke", "cpu", "paper"]), default="cpu",
              show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results folder [default: docs/results; docs/results/<loss> with --loss "
                   "other than the preset's].")
@click.option("--figures", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Figures folder (default: docs/figures beside the results folder).")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=Path(".cache"),
              show_default=True, help="Data sets, pre-training runs and cell results.")
@click.option("--rows", default=None, help="Comma-separated row slugs (default: all rows).")
@click.option("--seeds", default=None,
              help="Comma-separated pre-training seeds (default: the preset's, 0,1,2 for cpu). "
                   "The None row runs once, as seed 0 (it has nothing to pre-train).")
@click.option("--folds", default=None,
              help="Comma-separated folds to run, of the preset's split (default: all); a "
                   "later run with more folds resumes and adds them.")
@click.option("--budgets", default=None,
              help="Comma-separated label budgets to run, of the preset's (8, 32, all; "
                   "default: all three); a later run with more budgets resumes and adds them.")
@click.option("--data", "real", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None,
              help="A real PadChest + CheXmask folder instead of the phantom (evaluation on "
                   "its gold masks, else on CheXmask masks of quality >= 0.9; the oracle row "
                   "is skipped: real data have no true counterfactuals).")
@click.option("--cf-bundle", default=None, help="Counterfactual bundle for the model views.")
@click.option("--report-only", is_flag=True, help="Only aggregate the finished cells.")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              default=None,
              help="Also put the README section (main table, claims, label-efficiency "
                   "figure) into this file, between its benchmark:begin/end markers; only "
                   "when every cell of the grid is done.")
@click.option("--prepare", is_flag=True,
              help="Only generate the data sets, the pool's silver labels and the model views "
                   "(cached), then stop: run this once before starting several row processes.")
@click.option("--max-cells", default=None, type=int, help="Stop after this many new cells.")
@click.option("--jobs", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Rows run in this many worker processes at once (each with --threads "
                   "torch threads); the inputs are prepared once first. 2 on a 2-core machine "
                   "halves the grid's wall time.")
@click.option("--loss", type=click.Choice(["ce", "dicece"]), default=None,
              help="Fine-tuning loss of the cells (default: the preset's, cross-entropy). "
                   "Another loss keeps its cells apart (cells-<loss>), for the CE vs Dice+CE "
                   "comparison.")
@click.option("--pretrain-first", is_flag=True,
              help="Pre-train every row before fine-tuning any cell (probe scores early).")
@click.option("--threads", default=1, show_default=True,
              help="torch threads. 1 by default: on a shared 2-core machine more threads spin "
                   "and run up to 10x slower (measured, docs/benchmark.md).")
@click.option("--ship", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Instead of the grid: train the shipped segmentation bundle at this folder.")
@click.option("--ship-row", default="none", show_default=True,
              help="Row whose initialisation the shipped model fine-tunes.")
@click.option("--ship-n", default=2000, show_default=True, help="Gold-labelled pool size.")
@click.option("--ship-seed", default=201, show_default=True, help="Seed of that pool.")
@click.option("--ship-epochs", default=None, type=int, help="Epochs (default: the recipe's).")
@click.option("--score-bundle", default=None,
              help="Instead of the grid: score this segmentation bundle (a folder or a name "
                   "under resources/models) on the test images of the chosen folds, with the "
                   "metrics of the full-budget cells, to set it beside the table's rows. It "
                   "must not have been trained on the benchmark's gold set.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="Fine-tuning and prediction device (cells, Segmentation rows, --ship): auto = "
                   "cuda, else mps, else cpu; bfloat16 autocast on cuda. Pre-training picks "
                   "its own device (CUDA when present).")
def bench(preset: str, out: Path | None, figures: Path | None, cache: Path, rows: str | None,
          seeds: str | None, folds: str | None, budgets: str | None, real: Path | None,
          cf_bundle: str | None, report_only: bool, readme: Path | None, prepare: bool,
          max_cells: int | None,
          jobs: int, loss: str | None,
          pretrain_first: bool, threads: int,
          ship: Path | None, ship_row: str, ship_n: int, ship_seed: int,
          ship_epochs: int | None, score_bundle: str | None, device: str) -> None:
    """Fine-tuning benchmark: every row x seed x fold x label budget not done yet.

    Resumable: finished cells (CACHE/runs/PRESET/DATA/cells/ROW/seedS/foldK-BUDGET.json,
    DATA = phantom-v<version>-<regime>-<renderer hash> or real-<folder>-<hash>) are never
    recomputed;
    pre-training runs are cached under CACHE/runs/PRESET/DATA/ROW/seedS/. Each cell
    records the device it was fine-tuned on (``train_log.device``).
    """
    from pcl_viewer.device import configure_threads, default_device

    configure_threads(threads)
    from pcl_viewer.evaluate.benchmark import ROW_BY_SLUG, ROWS, bench_preset, load_cells, run_grid
    from pcl_viewer.evaluate.benchmark_inputs import RowInitialiser, data_key, git_commit
    from pcl_viewer.evaluate.benchmark_report import provenance, write_report

    dev = _device(device)

    cfg = bench_preset(preset)
    cells_name = "cells"
    if loss is not None and loss != cfg.finetune.loss:
        cfg = replace(cfg, finetune=replace(cfg.finetune, loss=loss))
        cells_name = f"cells-{loss}"
    if out is None:  # another loss never overwrites the main tables by default
        out = Path("docs/results") if cells_name == "cells" else Path("docs/results") / loss
    try:
        chosen = ROWS if not rows else tuple(ROW_BY_SLUG[s.strip()] for s in rows.split(","))
    except KeyError as exc:
        raise click.BadParameter(f"unknown row {exc}; rows: {', '.join(ROW_BY_SLUG)}",
                                 param_hint="--rows") from None
    if seeds:
        cfg = replace(cfg, seeds=tuple(int(x) for x in seeds.split(",")))
    if folds:
        cfg = replace(cfg, folds=tuple(int(x) for x in folds.split(",")))
        if not set(cfg.folds) <= set(range(cfg.n_folds)):
            raise click.BadParameter(f"folds are 0..{cfg.n_folds - 1}", param_hint="--folds")
    if budgets:
        chosen_budgets = tuple(b.strip() for b in budgets.split(","))
        if not set(chosen_budgets) <= set(cfg.budgets):
            raise click.BadParameter(f"budgets are {', '.join(cfg.budgets)}",
                                     param_hint="--budgets")
        cfg = replace(cfg, budgets=tuple(b for b in cfg.budgets if b in chosen_budgets))
    if real is not None and ship is not None:
        raise click.BadParameter("--ship trains on the phantom", param_hint="--data")
    runs = cache / "runs" / preset / data_key(real)
    cells_dir = runs / cells_name
    command = os.environ.get("PCL_BENCH_COMMAND") or (
        "pcl " + " ".join(sys.argv[1:]) if sys.argv and "pcl" in sys.argv[0] else
        f"pcl bench --preset {preset} --out {out}")
    commit = git_commit()
    if ship is not None:
        from pcl_viewer.evaluate.ship import ship_segmentation

        init = RowInitialiser(cfg, cache / "data" / preset, runs, cf_bundle=cf_bundle)
        with default_device(dev):  # the row initialiser's own fine-tuning (Segmentation rows)
            ship_segmentation(cfg, ship, cache / "data" / preset, init, row=ship_row, n=ship_n,
                              seed=ship_seed, epochs=ship_epochs, command=command,
                              echo=click.echo, device=dev,
                              benchmark=benchmark_line(out / "benchmark.csv", ship_row),
                              commit=commit)
        click.echo(f"wrote {ship}")
        return
    if score_bundle is not None:
        with default_device(dev):
            _score_bundle(cfg, cache / "data" / preset, runs, real, score_bundle)
        return
    if prepare:
        prepare_inputs(cfg, cache / "data" / preset, runs, chosen, cf_bundle, real)
        return
    failed: list[str] = []
    expected = cfg.n_cells(chosen)
    if not report_only:
        if jobs > 1 and max_cells is not None:
            raise click.BadParameter("--max-cells needs --jobs 1", param_hint="--max-cells")
        check_cell_devices(load_cells(cells_dir), dev, cells_dir)
    if not report_only and jobs > 1:
        prepare_inputs(cfg, cache / "data" / preset, runs, chosen, cf_bundle, real)
        child = ["--preset", preset, "--cache", str(cache), "--threads", str(threads),
                 "--device", device, "--pretrain-first"]
        child += ["--loss", loss] if loss else []
        child += ["--cf-bundle", cf_bundle] if cf_bundle else []
        child += ["--data", str(real)] if real is not None else []
        child += ["--folds", ",".join(map(str, cfg.fold_ids())), "--budgets", ",".join(cfg.budgets)]
        from pcl_viewer.evaluate.parallel import run_rows_in_processes

        # One worker process per (row, seed): the most even split of the grid's work.
        # Seed-major: every row's seed 0 before any seed 1, so an interrupted grid has
        # complete (seed, fold) tables of every row for the claims.
        units = [(f"{r.slug}-seed{sd}", ["--rows", r.slug, "--seeds", str(sd)])
                 for sd in sorted(set(cfg.seeds) | {0}) for r in chosen
                 if sd in cfg.row_seeds(r)]
        status = run_rows_in_processes(units, jobs, child, cells_dir, expected, runs / "logs",
                                       command, echo=click.echo)
        failed = sorted(s for s, rc in status.items() if rc)
        click.echo(f"rows: {len(status) - len(failed)} finished, {len(failed)} failed"
                   + (f" ({', '.join(failed)}; logs in {runs / 'logs'})" if failed else ""))
    elif not report_only:
        sets, init = load_sets(cfg, cache / "data" / preset, runs, cf_bundle, real)
        # run_grid and the row initialiser call finetune/predict with device="auto":
        # inside this block that means --device.
        with default_device(dev):
            res = run_grid(cfg, sets, cells_dir, init, rows=chosen, max_cells=max_cells,
                           pretrain_first=pretrain_first,
                           extra={"command": command, "commit": commit})
        click.echo(f"cells: {res['done']} already done, {res['ran']} computed now, "
                   f"{res['left']} left")
        for slug, why in res["skipped_rows"].items():
            click.echo(f"skipped row {slug}: {why}")
    cells = load_cells(cells_dir)
    if not cells and report_only and (out / "cells.csv").is_file():
        # A clone without the cell cache: the committed evidence is enough for the report.
        from pcl_viewer.evaluate.benchmark_report import cells_from_csv

        cells = cells_from_csv(out / "cells.csv")
        click.echo(f"no cells under {cells_dir}: read {len(cells)} from {out / 'cells.csv'}")
    status = "" if len(cells) >= expected else " **PARTIAL: not a final table.**"
    title = f"# Fine-tuning benchmark, preset `{preset}`" + (
        "" if cells_name == "cells" else f", fine-tuning loss {cfg.finetune.loss}")
    data = sorted({str(c.get("data", "")) for c in cells} - {""})
    header = (f"{title}\n\nReport written by `{command}` at commit `{commit}` from {len(cells)} "
              f"of {expected} cells (row x pre-training seed x fold x budget).{status}\n\n"
              + (f"Data: {'; '.join(data)}.\n\n" if data else "") + provenance(cells))
    other = None
    if cells_name == "cells" and (runs / "cells-dicece").is_dir():
        other = ("Dice+CE", load_cells(runs / "cells-dicece"))
    if figures is None:
        figures = out.parent / "figures" if cells_name == "cells" else out / "figures"
    info = write_report(cells, out, figures, header, other_loss=other, runs=runs)
    click.echo(f"wrote {out}/benchmark.csv, label_efficiency.csv, cells.csv, claims.csv, "
               f"benchmark.md, benchmark_readme.md ({info['methods']} methods, {info['cells']} "
               f"cells, {info['claims']} claim lines, {info['curves']} pre-training epochs)")
    if readme is not None and (len(cells) < expected or failed):
        click.echo(f"{readme} left as it was: the report is partial ({len(cells)} of "
                   f"{expected} cells{'; rows failed' if failed else ''})")
    elif readme is not None:
        from pcl_viewer.evaluate.benchmark_report import splice_readme

        try:
            splice_readme(readme, (out / "benchmark_readme.md").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--readme") from exc
        click.echo(f"updated the benchmark section of {readme}")
    if real is not None and any(r.views == "true" for r in chosen):
        click.echo("note: the oracle row (true counterfactuals) is skipped on real data")
    if failed:
        raise click.ClickException(f"rows failed: {', '.join(failed)} (logs in {runs / 'logs'})")
