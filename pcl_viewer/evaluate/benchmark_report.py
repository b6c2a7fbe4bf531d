"""Aggregation of benchmark cells into the tables, the claim verdicts and the figures.

Mean and (sample) standard deviation over folds. Dice in %, HD95 and ASD in
pixels of the model grid (128 px for ``cpu``; the paper's are at 224 px, so
its distances are about 1.75x ours for the same relative error).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from pcl_viewer.evaluate.benchmark import DAGGER_PAIRS, ROW_BY_SLUG, ROWS

# benchmark.csv: one row per method at the full label budget.
MAIN_COLUMNS: tuple[str, ...] = (
    "method", "dsc", "dsc_std", "dsc_nf", "dsc_nf_std", "dsc_pe", "dsc_pe_std",
    "dsc_portable", "dsc_portable_std", "dsc_severe", "dsc_severe_std",
    "hd95", "hd95_std", "asd", "asd_std", "n_folds",
)
EFFICIENCY_COLUMNS: tuple[str, ...] = ("method", "budget", "dsc", "dsc_std", "dsc_pe", "n_folds")
_METRIC_OF = {"dsc": ("overall", "dice"), "dsc_nf": ("nf", "dice"), "dsc_pe": ("pe", "dice"),
              "dsc_portable": ("portable", "dice"), "dsc_severe": ("severe", "dice"),
              "hd95": ("overall", "hd95"), "asd": ("overall", "asd")}


def _stat(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _by(cells: list[dict]) -> dict[tuple[str, str], dict[int, dict]]:
    """(row slug, budget) -> {fold: scores}."""
    out: dict[tuple[str, str], dict[int, dict]] = defaultdict(dict)
    for c in cells:
        out[(c["row"], c["budget"])][int(c["fold"])] = c["scores"]
    return out


def _value(scores: dict, key: str) -> float | None:
    subset, metric = _METRIC_OF[key]
    return scores.get(subset, {}).get(metric)


def aggregate(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """Cells -> (main table rows at budget "all", label-efficiency rows), in ROWS order."""
    by = _by(cells)
    main, eff = [], []
    for row in ROWS:
        folds = by.get((row.slug, "all"))
        if folds:
            rec: dict = {"method": row.name, "n_folds": len(folds)}
            for key in _METRIC_OF:
                mean, std = _stat([_value(s, key) for s in folds.values()])
                rec[key], rec[f"{key}_std"] = mean, std
            main.append(rec)
        for budget in sorted({b for (r, b) in by if r == row.slug}, key=_budget_key):
            folds = by[(row.slug, budget)]
            mean, std = _stat([_value(s, "dsc") for s in folds.values()])
            pe, _ = _stat([_value(s, "dsc_pe") for s in folds.values()])
            eff.append({"method": row.name, "budget": budget, "dsc": mean, "dsc_std": std,
                        "dsc_pe": pe, "n_folds": len(folds)})
    return main, eff


def _budget_key(b: str) -> float:
    return float("inf") if b == "all" else float(b)


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})


def paired_difference(cells: list[dict], a: str, b: str, key: str = "dsc",
                      budget: str = "all") -> dict | None:
    """Per-fold paired difference ``a - b`` of ``key``: mean, std, folds, verdict.

    "holds" when the mean difference is positive; "clear" when it also exceeds
    two standard errors of the paired fold differences.
    """
    by = _by(cells)
    fa, fb = by.get((a, budget), {}), by.get((b, budget), {})
    common = sorted(set(fa) & set(fb))
    if not common:
        return None
    d = np.array([_value(fa[k], key) - _value(fb[k], key) for k in common], float)
    std = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    se = std / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    mean = float(d.mean())
    verdict = "holds" if mean > 0 else "does not hold"
    if mean > 0 and mean > 2 * se:
        verdict = "holds (clear: > 2 SE)"
    elif mean <= 0 and -mean > 2 * se:
        verdict = "does not hold (clear: reversed, > 2 SE)"
    return {"a": a, "b": b, "key": key, "mean": mean, "std": std, "folds": len(d),
            "verdict": verdict}


def claims(cells: list[dict]) -> list[tuple[str, dict | None]]:
    """The paper's claims as paired comparisons on our folds."""
    out: list[tuple[str, dict | None]] = [
        ("DVD-CL beats VADeR (counterfactual dense CL beats plain dense CL)",
         paired_difference(cells, "dvd-cl", "vader")),
        ("S-MVD-CL beats Segmentation (silver)",
         paired_difference(cells, "s-mvd-cl", "seg-silver")),
        ("S-MVD-CL beats Segmentation (silver) on effusion (pe)",
         paired_difference(cells, "s-mvd-cl", "seg-silver", "dsc_pe")),
    ]
    for cf, dag in DAGGER_PAIRS:
        name, dname = ROW_BY_SLUG[cf].name, ROW_BY_SLUG[dag].name
        out.append((f"{name} beats {dname}", paired_difference(cells, cf, dag)))
        out.append((f"{name} beats {dname} on effusion (pe)",
                    paired_difference(cells, cf, dag, "dsc_pe")))
        out.append((f"{name} beats {dname} on the portable scanner",
                    paired_difference(cells, cf, dag, "dsc_portable")))
    out.append(("Oracle counterfactual views beat model views (S-MVD-CL)",
                paired_difference(cells, "s-mvd-cl-oracle", "s-mvd-cl")))
    return out


def _fmt(v: float | None, std: float | None = None, digits: int = 2) -> str:
    if v is None or not np.isfinite(v):
        return "-"
    if std is None or not np.isfinite(std):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({std:.{digits}f})"


def markdown(main: list[dict], eff: list[dict], cells: list[dict], header: str) -> str:
    """benchmark.md: our table beside the paper's, label efficiency, claim verdicts."""
    lines = [header, "", "## Main table (all training labels of each fold)", "",
             "Dice % mean (std over folds); HD95/ASD in pixels of our grid. Paper columns "
             "from METHOD §4 (224 px, real PadChest).", "",
             "| method | folds | DSC | nf | pe | portable | severe | HD95 | ASD "
             "| paper DSC | paper nf | paper pe | paper HD95 | paper ASD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    by_name = {r.name: r for r in ROWS}
    for m in main:
        p = by_name[m["method"]].paper or {}
        lines.append("| " + " | ".join([
            m["method"], str(m["n_folds"]), _fmt(m["dsc"], m["dsc_std"]),
            _fmt(m["dsc_nf"], m["dsc_nf_std"]), _fmt(m["dsc_pe"], m["dsc_pe_std"]),
            _fmt(m["dsc_portable"], m["dsc_portable_std"]), _fmt(m["dsc_severe"], m["dsc_severe_std"]),
            _fmt(m["hd95"], m["hd95_std"], 1), _fmt(m["asd"], m["asd_std"], 2),
            _fmt(p.get("dsc")), _fmt(p.get("dsc_nf")), _fmt(p.get("dsc_pe")),
            _fmt(p.get("hd95"), None, 1), _fmt(p.get("asd"))]) + " |")
    lines += ["", "## Label efficiency (Dice %, mean (std) over folds)", "",
              "| method | budget | folds | DSC | pe |", "|---|---|---|---|---|"]
    for e in eff:
        lines.append(f"| {e['method']} | {e['budget']} | {e['n_folds']} | "
                     f"{_fmt(e['dsc'], e['dsc_std'])} | {_fmt(e['dsc_pe'])} |")
    lines += ["", "## The paper's claims on our data", "",
              "Paired per-fold differences (A - B), mean (std over folds). 'holds' = mean > 0; "
              "'clear' = beyond two standard errors of the fold differences.", "",
              "| claim | A - B | folds | verdict |", "|---|---|---|---|"]
    for text, c in claims(cells):
        if c is None:
            lines.append(f"| {text} | - | 0 | not measured |")
        else:
            lines.append(f"| {text} | {_fmt(c['mean'], c['std'])} | {c['folds']} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def plot_benchmark(main: list[dict], path: Path) -> None:
    """Grouped bars: Dice by method and subgroup, error bars = fold std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("dsc", "overall"), ("dsc_nf", "nf"), ("dsc_pe", "pe"),
            ("dsc_portable", "portable"), ("dsc_severe", "severe")]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(main) + 2), 4.5))
    x = np.arange(len(main))
    w = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        ax.bar(x + (j - 2) * w, [m[k] for m in main], w, yerr=[m[f"{k}_std"] for m in main],
               label=label, capsize=2)
    vals = [m[k] for m in main for k, _ in keys if np.isfinite(m[k])]
    ax.set_ylim(max(0, min(vals, default=0) - 5), 100)
    ax.set_xticks(x, [m["method"] for m in main], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.legend(ncol=5, fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_label_efficiency(eff: list[dict], path: Path) -> None:
    """Dice against the number of labelled images, one line per method (log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    methods = list(dict.fromkeys(e["method"] for e in eff))
    budgets = sorted({e["budget"] for e in eff}, key=_budget_key)
    pos = {b: i for i, b in enumerate(budgets)}
    for m in methods:
        es = sorted((e for e in eff if e["method"] == m), key=lambda e: _budget_key(e["budget"]))
        ax.errorbar([pos[e["budget"]] for e in es], [e["dsc"] for e in es],
                    yerr=[e["dsc_std"] for e in es], marker="o", capsize=2, label=m,
                    linestyle="--" if "†" in m else "-")
    ax.set_xticks(range(len(budgets)), [f"{b} images" if b != "all" else "all" for b in budgets])
    ax.set_xlabel("labelled training images per fold")
    ax.set_ylabel("Dice (%)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cells: list[dict], results_dir: Path, figures_dir: Path, header: str) -> dict:
    """Write benchmark.csv, label_efficiency.csv, benchmark.md and both figures."""
    main, eff = aggregate(cells)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results_dir / "benchmark.csv", main, MAIN_COLUMNS)
    write_csv(results_dir / "label_efficiency.csv", eff, EFFICIENCY_COLUMNS)
    (results_dir / "benchmark.md").write_text(markdown(main, eff, cells, header))
    if main:
        plot_benchmark(main, figures_dir / "benchmark.png")
    if eff:
        plot_label_efficiency(eff, figures_dir / "label_efficiency.png")
    return {"methods": len(main), "cells": len(cells)}
