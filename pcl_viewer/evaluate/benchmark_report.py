"""Aggregation of benchmark cells into the tables, the claim verdicts and the figures.

Mean and (sample) standard deviation over folds. Dice in %, HD95 and ASD in
pixels of the model grid (128 px for ``cpu``; the paper's are at 224 px, so
its distances are about 1.75x ours for the same relative error).
"""

from __future__ import annotations

import csv
import re
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
# loss_comparison.csv: one row per method and budget with paired cells of both losses.
LOSS_COLUMNS: tuple[str, ...] = ("method", "budget", "n_pairs", "same_init", "dsc_ce",
                                 "dsc_other", "diff", "diff_std", "diff_pe", "diff_portable")
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
    d = np.array(_pair_diffs(by.get((a, budget), {}), by.get((b, budget), {}), key), float)
    if d.size == 0:  # no common fold, or the metric was not scored (OOD at small budgets)
        return None
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


def claims(cells: list[dict], budget: str = "all") -> list[tuple[str, dict | None]]:
    """The paper's claims as paired comparisons on our folds, at one label budget.

    OOD (portable) scores exist only for full-budget cells, so the portable claims are
    listed at the full budget only.
    """
    def diff(a: str, b: str, key: str = "dsc") -> dict | None:
        return paired_difference(cells, a, b, key, budget=budget)

    out: list[tuple[str, dict | None]] = [
        ("DVD-CL beats VADeR (counterfactual dense CL beats plain dense CL)",
         diff("dvd-cl", "vader")),
        ("S-MVD-CL beats Segmentation (silver)", diff("s-mvd-cl", "seg-silver")),
        ("S-MVD-CL beats Segmentation (silver) on effusion (pe)",
         diff("s-mvd-cl", "seg-silver", "dsc_pe")),
    ]
    for cf, dag in DAGGER_PAIRS:
        name, dname = ROW_BY_SLUG[cf].name, ROW_BY_SLUG[dag].name
        out.append((f"{name} beats {dname}", diff(cf, dag)))
        out.append((f"{name} beats {dname} on effusion (pe)", diff(cf, dag, "dsc_pe")))
        if budget == "all":
            out.append((f"{name} beats {dname} on the portable scanner",
                        diff(cf, dag, "dsc_portable")))
    out.append(("Oracle counterfactual views beat model views (S-MVD-CL)",
                diff("s-mvd-cl-oracle", "s-mvd-cl")))
    return out


def provenance(cells: list[dict]) -> str:
    """Which commands, commits and devices computed the cells (markdown lines).

    A cell without a recorded device predates ``train_log.device``; those ran on the CPU
    (the convention of ``pcl bench``'s device check).
    """
    groups: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for c in cells:
        dev = str(c.get("train_log", {}).get("device", "cpu"))
        # Processes of one grid split by rows (scripts/device_bench.sh) differ only there.
        cmd = re.sub(r"--rows[ =]\S+", "--rows ROWS", str(c.get("command", "?")))
        cmd = re.sub(r"pcl-res-[\w.-]+", "pcl-res-ROWS", cmd)
        groups[(cmd, str(c.get("commit", "?")), dev)].append(float(c.get("seconds", float("nan"))))
    lines = ["Cells computed by:"]
    for (cmd, commit, dev), secs in sorted(groups.items()):
        lines.append(f"- {len(secs)} cells: `{cmd}` at commit `{commit}` on {dev}, "
                     f"{np.nansum(secs):.0f} s of fine-tuning and scoring in all")
    return "\n".join(lines)


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def _pair_diffs(fa: dict[int, dict], fb: dict[int, dict], key: str) -> list[float]:
    """``fa[k] - fb[k]`` of ``key`` over the folds ``k`` both have, where both are finite."""
    return [va - vb for k in sorted(set(fa) & set(fb))
            if _finite(va := _value(fa[k], key)) and _finite(vb := _value(fb[k], key))]


def _inits(cells: list[dict]) -> dict[str, set]:
    """Row -> the starting-weight fingerprints its cells recorded ("random"; None: unknown)."""
    out: dict[str, set] = defaultdict(set)
    for c in cells:
        out[c["row"]].add(c.get("init_fingerprint") if c.get("init") else "random")
    return out


def _same_init(a: set | None, b: set | None) -> str:
    """"yes" when both sides started every cell from the same weights, "no" when not,
    "unknown" when a side's cells did not record their starting weights."""
    if not a or not b or None in a or None in b:
        return "unknown"
    return "yes" if a == b and len(a) == 1 else "no"


def loss_comparison(ce: list[dict], other: list[dict]) -> list[dict]:
    """Paired (same row, fold, budget) Dice of cells fine-tuned with another loss vs CE.

    Only pairs whose Dice is finite on both sides count; ``diff`` = other - CE in Dice %,
    mean (and std) over the pairs; ``same_init`` says whether both sides started from
    the same weights. Rows in ROWS order, then a pooled line ("all rows") per budget.
    """
    a, b = _by(ce), _by(other)
    ia, ib = _inits(ce), _inits(other)
    out: list[dict] = []
    pooled: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in ROWS:
        for budget in sorted({k for (r, k) in b if r == row.slug}, key=_budget_key):
            fa, fb = a.get((row.slug, budget), {}), b.get((row.slug, budget), {})
            # The pairs: folds where both sides have a finite Dice.
            folds = [k for k in sorted(set(fa) & set(fb))
                     if _finite(_value(fa[k], "dsc")) and _finite(_value(fb[k], "dsc"))]
            if not folds:
                continue
            fa, fb = {k: fa[k] for k in folds}, {k: fb[k] for k in folds}
            rec: dict = {"method": row.name, "budget": budget, "n_pairs": len(folds),
                         "same_init": _same_init(ia.get(row.slug), ib.get(row.slug)),
                         "dsc_ce": _stat([_value(fa[k], "dsc") for k in folds])[0],
                         "dsc_other": _stat([_value(fb[k], "dsc") for k in folds])[0]}
            for key, col in (("dsc", "diff"), ("dsc_pe", "diff_pe"),
                             ("dsc_portable", "diff_portable")):
                d = _pair_diffs(fb, fa, key)
                pooled[budget][col] += d
                rec[col], std = _stat(d)
                if col == "diff":
                    rec["diff_std"] = std
            out.append(rec)
    for budget in sorted(pooled, key=_budget_key):
        p = pooled[budget]
        mean, std = _stat(p["diff"])
        out.append({"method": "all rows", "budget": budget, "n_pairs": len(p["diff"]),
                    "same_init": "", "dsc_ce": float("nan"), "dsc_other": float("nan"),
                    "diff": mean, "diff_std": std, "diff_pe": _stat(p["diff_pe"])[0],
                    "diff_portable": _stat(p["diff_portable"])[0]})
    return out


def loss_markdown(rows: list[dict], other: str, other_cells: list[dict]) -> str:
    """The CE vs ``other`` section of benchmark.md."""
    lines = [f"## Fine-tuning loss: {other} vs cross-entropy", "",
             f"Paired cells (same row, fold, budget); difference = {other} - CE in Dice %, "
             "mean (std over pairs; the pooled std treats cells of different rows as "
             "independent). 'same init': both sides fine-tuned the same starting weights "
             "(else pre-training run-to-run differences are part of the difference; "
             "'unknown' for cells that predate the recorded fingerprint).", "",
             provenance(other_cells), "",
             "| method | budget | pairs | same init | DSC CE | DSC " + other + " | difference "
             "| pe diff. | portable diff. |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['budget']} | {r['n_pairs']} | {r['same_init']} | "
                     f"{_fmt(r['dsc_ce'])} | {_fmt(r['dsc_other'])} | "
                     f"{_fmt(r['diff'], r['diff_std'])} | {_fmt(r['diff_pe'])} | "
                     f"{_fmt(r['diff_portable'])} |")
    return "\n".join(lines) + "\n"


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
              "'clear' = beyond two standard errors of the fold differences. The paper's "
              "claims are at the full budget; the small budgets follow.", ""]
    budgets = sorted({c["budget"] for c in cells}, key=lambda b: (b != "all", _budget_key(b)))
    for budget in budgets:
        title = "all training labels" if budget == "all" else f"{budget} labelled images"
        lines += [f"### {title}", "", "| claim | A - B | folds | verdict |", "|---|---|---|---|"]
        for text, c in claims(cells, budget):
            if c is None:
                lines.append(f"| {text} | - | 0 | not measured |")
            else:
                lines.append(f"| {text} | {_fmt(c['mean'], c['std'])} | {c['folds']} | "
                             f"{c['verdict']} |")
        lines.append("")
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

    fig, ax = plt.subplots(figsize=(9, 4.8))
    methods = list(dict.fromkeys(e["method"] for e in eff))
    budgets = sorted({e["budget"] for e in eff}, key=_budget_key)
    pos = {b: i for i, b in enumerate(budgets)}
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    vals = np.array([e["dsc"] for e in eff if np.isfinite(e["dsc"])])
    # Far outliers (a collapsed fold) would squash every other line: clip them to the
    # axis and print their value instead.
    lo = max(float(vals.min()) - 1, float(np.median(vals)) - 10) if vals.size else 0.0
    off = []
    for i, m in enumerate(methods):
        es = sorted((e for e in eff if e["method"] == m), key=lambda e: _budget_key(e["budget"]))
        xs = np.array([pos[e["budget"]] for e in es], float) + 0.012 * (i - len(methods) / 2)
        ys = np.array([e["dsc"] for e in es], float)
        err = np.where(ys < lo, 0.0, [e["dsc_std"] for e in es])
        ax.errorbar(xs, np.maximum(ys, lo + 0.3), yerr=err, marker="o",
                    ms=4, capsize=2, label=m, color=colours[i % 20],
                    linestyle="--" if "†" in m else "-")
        off += [(x, m, e) for x, y, e in zip(xs, ys, es) if y < lo]
    for k, (x, m, e) in enumerate(off):
        ax.annotate(f"{m}: {e['dsc']:.1f} ({e['dsc_std']:.1f}) below axis", (x, lo + 0.3),
                    xytext=(5, 8 + 10 * k), textcoords="offset points", fontsize=7,
                    arrowprops={"arrowstyle": "->", "lw": 0.6})
    ax.set_ylim(lo, 100)
    ax.set_xticks(range(len(budgets)), [f"{b} images" if b != "all" else "all" for b in budgets])
    ax.set_xlabel("labelled training images per fold")
    ax.set_ylabel("Dice (%), mean (std) over folds")
    ax.legend(fontsize=7, ncol=1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(cells: list[dict], results_dir: Path, figures_dir: Path, header: str,
                 other_loss: tuple[str, list[dict]] | None = None) -> dict:
    """Write benchmark.csv, label_efficiency.csv, benchmark.md and both figures.

    ``other_loss``: (loss name, its cells), compared with ``cells`` (cross-entropy) in
    loss_comparison.csv and a section of benchmark.md.
    """
    main, eff = aggregate(cells)
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results_dir / "benchmark.csv", main, MAIN_COLUMNS)
    write_csv(results_dir / "label_efficiency.csv", eff, EFFICIENCY_COLUMNS)
    text = markdown(main, eff, cells, header)
    if other_loss is not None and other_loss[1]:
        comp = loss_comparison(cells, other_loss[1])
        write_csv(results_dir / "loss_comparison.csv", comp, LOSS_COLUMNS)
        text += "\n" + loss_markdown(comp, other_loss[0], other_loss[1])
    else:  # no stale comparison beside a table it was not made from
        (results_dir / "loss_comparison.csv").unlink(missing_ok=True)
    (results_dir / "benchmark.md").write_text(text)
    if main:
        plot_benchmark(main, figures_dir / "benchmark.png")
    if eff:
        plot_label_efficiency(eff, figures_dir / "label_efficiency.png")
    return {"methods": len(main), "cells": len(cells)}
