"""The fine-tuning benchmark grid: rows x pre-training seeds x folds x label budgets.

Each cell fine-tunes one row's initialisation (pre-trained with one seed) on the
labelled training images of one fold under one label budget, and scores the model
on the fold's test images (overall, no-finding, effusion) and on the
out-of-distribution sets (``portable`` scanner style, severe effusion), which
never train anything. The fold split and the fine-tuning seed of a fold are the
same for every row and every pre-training seed, so cells of two rows pair by
(seed, fold, budget).

Resumable: a cell's result is one JSON file written atomically
(``CELLS/<row>/seed<s>/fold<k>-<budget>.json``); a cell whose file exists is never
recomputed, so the grid can be killed and restarted, across sessions.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from pcl_viewer.atomic import atomic_write_text
from pcl_viewer.evaluate.folds import BUDGETS, label_budget, patient_folds
from pcl_viewer.evaluate.metrics import segmentation_scores
from pcl_viewer.models.unet import UNetConfig
from pcl_viewer.train.finetune import FinetuneConfig, finetune, predict

SUBSETS: tuple[str, ...] = ("overall", "nf", "pe", "portable", "severe")
# The effusion share of the paper's test set, implied by its overall, nf and pe Dice
# (None row: 87.05 = w * 84.76 + (1 - w) * 93.59 gives w = 0.74); the "w74" score
# re-weights a fold's nf and pe means to it, so our numbers sit beside the paper's.
PAPER_EFFUSION_SHARE = 0.74


class RowUnavailable(RuntimeError):
    """A row that cannot be initialised here (e.g. no counterfactual model yet)."""


@dataclass(frozen=True)
class Row:
    """One initialisation of the benchmark table.

    kind: ``"none"`` (random init), ``"pretrain"`` (the contrastive library),
    ``"segmentation"`` (a U-Net trained on the pool's ``labels``).
    views: counterfactual views for pre-training: ``"model"``, ``"true"`` (oracle),
    ``"real"`` (augmented copies of the real image in their place: the control that
    changes only the views) or None (the method's own real views; dagger rows).
    """

    name: str
    slug: str
    kind: str
    method: str | None = None
    views: str | None = None
    augment: bool = True
    labels: str | None = None
    paper: dict | None = None


def _p(dsc: float, nf: float | None = None, pe: float | None = None,
       hd95: float | None = None, asd: float | None = None) -> dict:
    return {"dsc": dsc, "dsc_nf": nf, "dsc_pe": pe, "hd95": hd95, "asd": asd}


ROWS: tuple[Row, ...] = (
    Row("None", "none", "none", paper=_p(87.05, 93.59, 84.76, 21.9, 5.39)),
    Row("SimCLR", "simclr", "pretrain", "simclr", "model", paper=_p(90.90, 96.71, 88.61, 11.9, 3.64)),
    Row("VADeR", "vader", "pretrain", "vader", None, paper=_p(92.26, 97.22, 90.33, 10.4, 2.79)),
    Row("Segmentation (silver)", "seg-silver", "segmentation", labels="silver",
        paper=_p(93.65, 97.81, 92.02, 7.3, 2.46)),
    Row("SSDCL", "ssdcl", "pretrain", "ssdcl", None, paper=_p(92.91, 97.58, 91.10, 15.3, 3.31)),
    Row("DVD-CL", "dvd-cl", "pretrain", "dvd-cl", "model", paper=_p(92.76, 97.36, 91.08, 10.5, 2.86)),
    Row("MVD-CL", "mvd-cl", "pretrain", "mvd-cl", "model", paper=_p(92.27, 97.18, 90.36, 9.1, 2.61)),
    Row("S-DVD-CL", "s-dvd-cl", "pretrain", "s-dvd-cl", "model", paper=_p(93.15, 97.62, 91.43, 8.0, 2.96)),
    Row("S-MVD-CL", "s-mvd-cl", "pretrain", "s-mvd-cl", "model", paper=_p(93.93, 97.75, 92.43, 7.3, 2.05)),
    # Controls: the counterfactual method's loss, number of views and augmentation, with
    # augmented copies of the real image in place of the counterfactual views.
    Row("DVD-aug", "dvd-aug", "pretrain", "dvd-cl", "real"),
    Row("MVD-aug", "mvd-aug", "pretrain", "mvd-cl", "real"),
    Row("S-DVD-aug", "s-dvd-aug", "pretrain", "s-dvd-cl", "real"),
    Row("S-MVD-aug", "s-mvd-aug", "pretrain", "s-mvd-cl", "real"),
    Row("DVD-CL†", "dvd-cl-dagger", "pretrain", "dvd-cl", None, augment=False, paper=_p(85.80)),
    Row("MVD-CL†", "mvd-cl-dagger", "pretrain", "mvd-cl", None, augment=False, paper=_p(87.34)),
    Row("S-DVD-CL†", "s-dvd-cl-dagger", "pretrain", "s-dvd-cl", None, augment=False, paper=_p(92.14)),
    Row("S-MVD-CL†", "s-mvd-cl-dagger", "pretrain", "s-mvd-cl", None, augment=False, paper=_p(91.96)),
    Row("S-MVD-CL (oracle CF)", "s-mvd-cl-oracle", "pretrain", "s-mvd-cl", "true"),
    Row("Segmentation (gold)", "seg-gold", "segmentation", labels="gold"),
)
ROW_BY_SLUG: dict[str, Row] = {r.slug: r for r in ROWS}
# Each counterfactual method and its dagger row (no counterfactuals, no augmentations).
DAGGER_PAIRS: tuple[tuple[str, str], ...] = (
    ("dvd-cl", "dvd-cl-dagger"), ("mvd-cl", "mvd-cl-dagger"),
    ("s-dvd-cl", "s-dvd-cl-dagger"), ("s-mvd-cl", "s-mvd-cl-dagger"),
)
# Each counterfactual method and its control with augmented real views (only the views differ).
CONTROL_PAIRS: tuple[tuple[str, str], ...] = (
    ("dvd-cl", "dvd-aug"), ("mvd-cl", "mvd-aug"),
    ("s-dvd-cl", "s-dvd-aug"), ("s-mvd-cl", "s-mvd-aug"),
)
# The rows of the paper's table (the "best overall" claim ranks S-MVD-CL among them).
PAPER_ROWS: tuple[str, ...] = tuple(r.slug for r in ROWS if r.paper is not None)


@dataclass
class BenchPreset:
    """Sizes and schedules of one benchmark preset."""

    name: str
    image_size: int
    n_folds: int = 5
    budgets: tuple[str, ...] = BUDGETS
    fold_seed: int = 0
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    seg_pretrain: FinetuneConfig = field(default_factory=FinetuneConfig)
    gold_n: int = 240
    ood_n: int = 100
    pool_n: int = 2000
    pretrain_options: dict = field(default_factory=dict)
    silver_steps: int = 800  # training steps of the pool's silver segmenter (200 gold normal images)
    # CheXmask-style filter: silver masks kept where the quality estimate > this.
    # smoke sets 0 (its 3-step silver segmenter is deliberately poor; the path is what it tests).
    silver_min_quality: float = 0.7
    # Pre-training seeds of every row with a pre-training (the None row has none: its
    # one "seed" is the fine-tuning seed of each fold, shared by every row).
    seeds: tuple[int, ...] = (0, 1, 2)
    # Folds that run (None: all n_folds); a subset of the same split, so a grid run on
    # folds (0, 1, 2) is extended later to all five by resuming.
    folds: tuple[int, ...] | None = None

    def unet_config(self) -> UNetConfig:
        return UNetConfig.for_preset(self.name)

    def fold_ids(self) -> tuple[int, ...]:
        return tuple(range(self.n_folds)) if self.folds is None else tuple(self.folds)

    def row_seeds(self, row: Row) -> tuple[int, ...]:
        """Pre-training seeds of ``row``; the None row has nothing to pre-train and runs
        once, as seed 0, whichever seeds a run asks for (so a run adding seeds 1 and 2
        later does not repeat it, and its cells pair with every seed of the others)."""
        return (0,) if row.kind == "none" else self.seeds

    def n_cells(self, rows: Iterable[Row]) -> int:
        return sum(len(self.row_seeds(r)) for r in rows) * len(self.fold_ids()) * len(self.budgets)


def bench_preset(name: str) -> BenchPreset:
    """The benchmark presets (docs/benchmark.md: measured costs and the projection of the
    grid). The fine-tuning protocol (``finetune``, budgets, folds) is the None row's, on
    which the phantom's difficulty is calibrated; do not change it for one grid only."""
    if name == "smoke":
        ft = FinetuneConfig(epochs=1, min_steps=2, max_steps=3, batch_size=4)
        return BenchPreset("smoke", 64, n_folds=2, finetune=ft,
                           seg_pretrain=replace(ft, max_steps=3), gold_n=16, ood_n=4, pool_n=32,
                           pretrain_options={"epochs": 1, "max_steps_per_epoch": 1,
                                             "batch_size": 2, "pixels": 32, "probe_train": 4,
                                             "probe_eval": 2, "probe_steps": 2},
                           silver_steps=3, silver_min_quality=0.0, seeds=(0, 1))
    if name == "cpu":
        # Sized from measured CPU time per step (1 thread): fine-tune 0.40 CPU-s/step at batch 8
        # (0.59 s wall on a quiet 2-core machine); docs/benchmark.md projects the grid
        # at about 8.5 h of one core, 4.3 h as two processes.
        ft = FinetuneConfig(epochs=12, min_steps=80)
        # Pre-training: 300 steps as 6 epochs of 50 (the same warm-up of 75 steps and cosine
        # as the former 3 x 100), so the linear probe scores the run every 50 steps and the
        # pre-training curve (pretrain_curves.csv) shows whether it converged.
        return BenchPreset("cpu", 128, finetune=ft, seg_pretrain=FinetuneConfig(epochs=4),
                           gold_n=240, ood_n=100, pool_n=2000,
                           pretrain_options={"epochs": 6, "max_steps_per_epoch": 50,
                                             "pixels": 250, "probe_steps": 100})
    if name == "paper":
        return BenchPreset("paper", 224, finetune=FinetuneConfig(epochs=100),
                           seg_pretrain=FinetuneConfig(epochs=20), gold_n=240, ood_n=200,
                           pool_n=20000)
    raise ValueError(f"unknown benchmark preset {name!r}")


@dataclass
class BenchSets:
    """The arrays of one benchmark, all at the preset's image size.

    gold_*: the gold evaluation set (folds are drawn from it); ood: name ->
    (images ``(M,1,S,S)``, masks ``(M,S,S)``), never trained on.
    """

    gold_images: np.ndarray
    gold_masks: np.ndarray
    effusion: np.ndarray
    patients: np.ndarray
    ood: dict[str, tuple[np.ndarray, np.ndarray]]
    description: str = ""  # where the sets come from (phantom version and regime, or a folder)


def cell_path(cells: Path, row: str, seed: int, fold: int, budget: str) -> Path:
    """``CELLS/<row>/seed<s>/fold<k>-<budget>.json``."""
    return Path(cells) / row / f"seed{seed}" / f"fold{fold}-{budget}.json"


def score_subsets(model, sets: BenchSets, test_idx: np.ndarray, ood: bool = True) -> dict[str, dict]:
    """Mean Dice (%), HD95 and ASD (pixels of the model grid) per subset, with image counts.

    ``ood=False`` skips the out-of-distribution sets (the few-label cells: the
    label-efficiency table reports overall and pe only, and surface distances of
    the OOD sets are most of a cell's scoring time).
    """
    out: dict[str, dict] = {}
    pred = predict(model, sets.gold_images[test_idx])
    s = segmentation_scores(pred, sets.gold_masks[test_idx])
    eff = sets.effusion[test_idx].astype(bool)
    for name, mask in (("overall", None), ("nf", ~eff), ("pe", eff)):
        m = s.mean(mask)
        n = int(len(test_idx) if mask is None else mask.sum())
        out[name] = {"dice": 100 * m["dice"], "hd95": m["hd95"], "asd": m["asd"], "n": n}
    if ood:
        out.update(score_ood(model, sets))
    return out


def score_ood(model, sets: BenchSets) -> dict[str, dict]:
    """Mean Dice (%), HD95 and ASD of ``model`` on each out-of-distribution set."""
    out: dict[str, dict] = {}
    for name, (imgs, masks) in sets.ood.items():
        m = segmentation_scores(predict(model, imgs), masks).mean()
        out[name] = {"dice": 100 * m["dice"], "hd95": m["hd95"], "asd": m["asd"], "n": len(imgs)}
    return out


def score_bundle_on_folds(preset: BenchPreset, sets: BenchSets, model) -> list[dict]:
    """Scores of a trained segmenter on the test images of every fold the preset runs: the
    same images, subsets and metrics as the full-budget cells (:func:`score_subsets`), so
    a model trained elsewhere (e.g. the shipped one) sits beside the table's rows.

    Returns one ``{"fold": k, "overall": {...}, "nf": ..., "pe": ..., <ood>: ...}`` per fold.
    The out-of-distribution sets do not depend on the fold: they are scored once and
    their scores repeated in every fold's record.
    """
    folds = patient_folds(sets.effusion, sets.patients, preset.n_folds, preset.fold_seed)
    ood = score_ood(model, sets)
    return [{"fold": k, **score_subsets(model, sets, folds[k][1], ood=False),
             **{name: dict(v) for name, v in ood.items()}} for k in preset.fold_ids()]


@dataclass
class Cell:
    row: Row
    seed: int
    fold: int
    budget: str
    train_idx: np.ndarray
    test_idx: np.ndarray


def plan_cells(preset: BenchPreset, sets: BenchSets, rows: Iterable[Row]) -> list[Cell]:
    """All cells in run order: seed-major, then folds, the full budget first, then rows,
    so an interrupted grid has whole (seed, fold) pairs of every row before the next
    seed, and the main table before the few-label settings."""
    folds = patient_folds(sets.effusion, sets.patients, preset.n_folds, preset.fold_seed)
    order = sorted(preset.budgets, key=lambda b: (b != "all", b))
    rows = list(rows)
    cells = []
    for seed in sorted(set(preset.seeds) | {0}):
        for k in preset.fold_ids():
            tr, te = folds[k]
            for b in order:
                lab = label_budget(tr, sets.effusion, b, seed=preset.fold_seed, fold=k)
                cells.extend(Cell(r, seed, k, b, lab, te) for r in rows
                             if seed in preset.row_seeds(r))
    return cells


def run_grid(
    preset: BenchPreset,
    sets: BenchSets,
    cells_dir: str | os.PathLike,
    init_for: Callable[[Row, int], Path | None],
    rows: Iterable[Row] = ROWS,
    show_progress: bool = True,
    extra: dict | None = None,
    max_cells: int | None = None,
    pretrain_first: bool = False,
) -> dict[str, int]:
    """Run every cell whose result file is missing.

    Args:
        init_for: (row, pre-training seed) -> bundle to start from (None = random init);
            called lazily, once per (row, seed), only when a cell of it must run.
        extra: fields stored in every new result (command, git commit ...).
        max_cells: stop after this many new cells (None: run them all).
        pretrain_first: initialise (pre-train) every row with a missing cell before
            fine-tuning any cell, so all pre-trainings (and their probe scores) finish
            first. Results do not depend on the order.

    Returns:
        ``{"done": cells already present, "ran": computed now, "left": still missing}``.
    """
    from tqdm import tqdm

    cells_dir = Path(cells_dir)
    cells = plan_cells(preset, sets, rows)
    missing = [c for c in cells
               if not cell_path(cells_dir, c.row.slug, c.seed, c.fold, c.budget).is_file()]
    todo = missing if max_cells is None else missing[:max_cells]
    cfg = preset.finetune
    # The bar counts optimiser steps of the remaining cells, so its ETA weighs the
    # full-budget cells (many steps) and the 8-image cells (few) correctly.
    total = sum(cfg.n_steps(len(c.train_idx)) for c in todo)
    bar = tqdm(total=total, unit="step", desc=f"bench {preset.name}", disable=not show_progress,
               dynamic_ncols=True)
    inits: dict[tuple[str, int], Path | None] = {}
    skipped: dict[str, str] = {}
    ran = 0

    def initialise(row: Row, seed: int) -> None:
        bar.set_postfix_str(f"pre-training {row.name} seed {seed}")
        try:
            inits[(row.slug, seed)] = init_for(row, seed)
        except RowUnavailable as exc:
            skipped[row.slug] = str(exc)
            bar.write(f"skipping row {row.name}: {exc}")

    if pretrain_first:
        for c in todo:
            if c.row.slug not in skipped and (c.row.slug, c.seed) not in inits:
                initialise(c.row, c.seed)
    for i, c in enumerate(todo):
        key = (c.row.slug, c.seed)
        if c.row.slug not in skipped and key not in inits:
            initialise(c.row, c.seed)
        if c.row.slug in skipped:
            bar.update(cfg.n_steps(len(c.train_idx)))
            continue
        bar.set_postfix_str(f"{i + 1}/{len(todo)} {c.row.name} seed {c.seed} fold {c.fold} "
                            f"budget {c.budget}")
        t0, c0 = time.perf_counter(), time.process_time()
        # The fine-tuning seed depends on the fold only: every row and every pre-training
        # seed fine-tunes a fold with the same batches and augmentations (paired cells).
        ft = replace(cfg, seed=cfg.seed + 1000 * c.fold)
        model, log = finetune(sets.gold_images[c.train_idx], sets.gold_masks[c.train_idx],
                              preset.unet_config(), ft, pretrained=inits[key],
                              progress=lambda s, n: bar.update(1))
        scores = score_subsets(model, sets, c.test_idx, ood=c.budget == "all")
        out = cell_path(cells_dir, c.row.slug, c.seed, c.fold, c.budget)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps({
            "method": c.row.name, "row": c.row.slug, "seed": c.seed, "fold": c.fold,
            "budget": c.budget, "n_train": int(len(c.train_idx)), "n_test": int(len(c.test_idx)),
            "scores": scores, "finetune": ft.to_dict(), "train_log": log,
            "init": None if inits[key] is None else str(inits[key]),
            "init_fingerprint": init_fingerprint(inits[key]),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "preset": preset.name,
            "data": sets.description, **(extra or {}),
        }, indent=1))
        ran += 1
    bar.close()
    return {"done": len(cells) - len(missing), "ran": ran, "left": len(missing) - ran,
            "skipped_rows": skipped}


def init_fingerprint(bundle: Path | None) -> str | None:
    """Fingerprint of a row's starting weights, from its card (``None``: random init)."""
    if bundle is None:
        return None
    from pcl_viewer.models.bundle import CARD, ModelBundle

    try:
        card = json.loads((Path(bundle) / CARD).read_text())
        return ModelBundle(Path(bundle), card).fingerprint
    except (OSError, ValueError, KeyError):
        return None


def load_cells(cells_dir: str | os.PathLike) -> list[dict]:
    """Every finished cell result under ``cells_dir`` (``<row>/seed<s>/fold*.json``).

    Cells of the single-seed layout (``<row>/fold*.json``) read as seed 0.
    """
    paths = sorted(Path(cells_dir).glob("*/seed*/fold*.json")) + sorted(
        Path(cells_dir).glob("*/fold*.json"))
    out = []
    for p in paths:
        c = json.loads(p.read_text())
        c.setdefault("seed", 0)
        out.append(c)
    return out


def projected_seconds(preset: BenchPreset, rows: Iterable[Row], cell_s: dict[str, float],
                      pretrain_s: Callable[[Row], float]) -> float:
    """Projected processor seconds (one thread) of a grid from measured costs.

    Args:
        cell_s: budget -> seconds of one cell (fine-tuning and scoring).
        pretrain_s: row -> seconds of one initialisation (pre-training, Segmentation
            row's training; 0 for None), paid once per pre-training seed.

    Returns:
        the sum over rows, their seeds and the preset's folds and budgets; with
        ``--jobs J`` on J free cores the wall time is about this / J.
    """
    total = 0.0
    for row in rows:
        per_seed = pretrain_s(row) + len(preset.fold_ids()) * sum(cell_s[b] for b in preset.budgets)
        total += len(preset.row_seeds(row)) * per_seed
    return total
