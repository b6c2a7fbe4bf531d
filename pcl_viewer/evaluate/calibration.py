"""Calibrate the phantom's difficulty on the random-init ("None") row only.

The realistic regime is tuned so that a randomly initialised U-Net, fine-tuned with
the benchmark's cpu protocol (same gold set, patient folds, label budgets and
fine-tuning recipe), lands where the published baseline lands on real PadChest
(85-90 % Dice overall at the full budget, effusion at least 6 points below
no-finding). The contrastive rows are never looked at here: they are what the
benchmark tests.

Every run appends one line per (fold, budget) to a CSV, with a free-text
description of the renderer parameters it was run with, so the calibration
history is part of the record (``docs/results/phantom_calibration.csv``).
"""

from __future__ import annotations

import csv
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

COLUMNS = ["run", "regime", "phantom_version", "fold", "budget", "n_train", "n_test",
           "effusion_share_test", "dice", "dice_nf", "dice_pe", "hd95", "asd", "steps",
           "seconds", "description"]


def calibrate_none_row(data_root: Path, out_csv: Path, description: str, folds=(0, 1),
                       budgets=("all", "32", "8"), regime: str | None = None,
                       echo=print) -> list[dict]:
    """Fine-tune random-init U-Nets on the benchmark's cpu gold set and score them.

    Args:
        data_root: where the gold set is generated (reused when it exists for the
            current phantom version and regime).
        out_csv: the calibration history (appended).
        description: what renderer parameters this run used.
        folds: which of the benchmark's 5 patient folds to run.
        budgets: label budgets (``"all"`` or a number of images).
        regime: phantom regime (default: the default regime).

    Returns:
        one dict per (fold, budget) with Dice (%) overall / nf / pe, HD95 and ASD (px).
    """
    from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
    from pcl_viewer.evaluate.benchmark import (
        ROW_BY_SLUG,
        BenchSets,
        bench_preset,
        plan_cells,
        score_subsets,
    )
    from pcl_viewer.evaluate.benchmark_inputs import SEEDS, generate_phantom, load_arrays
    from pcl_viewer.train.finetune import finetune

    regime = regime or DEFAULT_REGIME
    # the benchmark's cpu protocol: its gold set, folds, label budgets and fine-tuning
    preset = replace(bench_preset("cpu"), folds=tuple(folds), budgets=tuple(budgets))
    size = preset.image_size
    root = generate_phantom(Path(data_root) / f"gold-{regime}", preset.gold_n, SEEDS["gold"],
                            size, effusion_oversample=18.0, regime=regime)
    arr = load_arrays(root, size)
    eff = arr["effusion"].astype(bool)
    sets = BenchSets(arr["image"], arr["gold"], eff, arr["patients"], ood={},
                     description=f"phantom v{PHANTOM_VERSION} {regime}")
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    for c in plan_cells(preset, sets, [ROW_BY_SLUG["none"]]):
        t0 = time.perf_counter()
        # the benchmark's fine-tuning seed of this fold, so the cells match its None row
        cfg = replace(preset.finetune, seed=preset.finetune.seed + 1000 * c.fold)
        model, log = finetune(arr["image"][c.train_idx], arr["gold"][c.train_idx],
                              preset.unet_config(), cfg, device="cpu")
        r = score_subsets(model, sets, c.test_idx, ood=False)
        row = {"run": run, "regime": regime, "phantom_version": PHANTOM_VERSION,
               "fold": c.fold, "budget": c.budget, "n_train": len(c.train_idx),
               "n_test": len(c.test_idx),
               "effusion_share_test": round(float(eff[c.test_idx].mean()), 3),
               "dice": round(r["overall"]["dice"], 2), "dice_nf": round(r["nf"]["dice"], 2),
               "dice_pe": round(r["pe"]["dice"], 2), "hd95": round(r["overall"]["hd95"], 2),
               "asd": round(r["overall"]["asd"], 2), "steps": log.get("steps"),
               "seconds": round(time.perf_counter() - t0, 1), "description": description}
        rows.append(row)
        echo(f"fold {c.fold} budget {c.budget}: Dice {row['dice']:.2f} nf {row['dice_nf']:.2f} "
             f"pe {row['dice_pe']:.2f} (test pe share {row['effusion_share_test']:.2f}, "
             f"{row['seconds']:.0f} s)")
        _append(out_csv, row)
    return rows


def _append(path: Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean Dice overall / nf / pe per budget over the folds of ``rows``."""
    out: dict[str, dict[str, float]] = {}
    for b in sorted({r["budget"] for r in rows}):
        sel = [r for r in rows if r["budget"] == b]
        out[b] = {k: float(np.mean([r[k] for r in sel])) for k in ("dice", "dice_nf", "dice_pe")}
    return out
