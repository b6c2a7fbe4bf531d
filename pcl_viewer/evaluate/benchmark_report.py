"""Aggregation of benchmark cells into the tables, the claim verdicts and the figures.

A row's score at a budget is the mean over its (pre-training seed, fold) cells; the
fold std is the std over folds of the seed-averaged scores, the seed sd the std over
seeds of the fold-averaged scores. Dice in %, HD95 and ASD in pixels of the model
grid (128 px for ``cpu``; the paper's are at 224 px, so its distances are about
1.75x ours for the same relative error). Claims: :func:`judge_claims`
(statistics in :mod:`pcl_viewer.evaluate.stats`).
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcl_viewer.evaluate.benchmark import (
    CONTROL_PAIRS,
    PAPER_EFFUSION_SHARE,
    PAPER_ROWS,
    ROW_BY_SLUG,
    ROWS,
)
from pcl_viewer.evaluate.stats import crossed_interval, holm
from pcl_viewer.figures import pyplot, save_figure

# benchmark.csv: one row per method at the full label budget.
MAIN_COLUMNS: tuple[str, ...] = (
    "method", "dsc", "dsc_std", "dsc_seed_sd", "dsc_nf", "dsc_nf_std", "dsc_pe", "dsc_pe_std",
    "dsc_w74", "dsc_w74_std", "dsc_portable", "dsc_portable_std", "dsc_severe",
    "dsc_severe_std", "hd95", "hd95_std", "asd", "asd_std", "n_seeds", "n_folds",
)
EFFICIENCY_COLUMNS: tuple[str, ...] = ("method", "budget", "dsc", "dsc_std", "dsc_seed_sd",
                                       "dsc_pe", "dsc_w74", "n_seeds", "n_folds")
# cells.csv: every finished cell (the committed evidence the tables are made from).
CELL_COLUMNS: tuple[str, ...] = (
    "row", "method", "seed", "fold", "budget", "dice_overall", "dice_nf", "dice_pe",
    "dice_w74", "dice_portable", "dice_severe", "hd95", "asd", "n_train", "n_test",
    "init_fingerprint", "commit", "device", "data", "seconds", "cpu_seconds",
)
# claims.csv: one line per claim, metric and budget.
CLAIM_COLUMNS: tuple[str, ...] = (
    "claim", "kind", "a", "b", "metric", "budget", "family", "n_seeds", "n_folds",
    "mean_diff", "ci_low", "ci_high", "df", "null", "p", "p_holm", "verdict", "detail",
)
# loss_comparison.csv: one row per method and budget with paired cells of both losses.
LOSS_COLUMNS: tuple[str, ...] = ("method", "budget", "n_pairs", "same_init", "dsc_ce",
                                 "dsc_other", "diff", "diff_std", "diff_pe", "diff_portable")
_METRIC_OF = {"dsc": ("overall", "dice"), "dsc_nf": ("nf", "dice"), "dsc_pe": ("pe", "dice"),
              "dsc_w74": ("w74", "dice"),
              "dsc_portable": ("portable", "dice"), "dsc_severe": ("severe", "dice"),
              "hd95": ("overall", "hd95"), "asd": ("overall", "asd")}
ALPHA = 0.05
# "S-MVD-CL >= Segmentation (silver)" is a non-inferiority test with this margin (Dice
# points): it holds when the mean difference is shown to exceed -margin.
NONINFERIORITY_MARGIN = 1.0
# The primary metric of the claims (one Holm family) and the secondary ones (another).
PRIMARY_METRIC = "dsc"
SECONDARY_METRICS: tuple[str, ...] = ("dsc_pe", "dsc_w74")


def _stat(values: list[float]) -> tuple[float, float]:
    a = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


Key = tuple[int, int]  # (pre-training seed, fold)


def _by(cells: list[dict]) -> dict[tuple[str, str], dict[Key, dict]]:
    """(row slug, budget) -> {(seed, fold): scores}."""
    out: dict[tuple[str, str], dict[Key, dict]] = defaultdict(dict)
    for c in cells:
        out[(c["row"], c["budget"])][(int(c.get("seed", 0)), int(c["fold"]))] = c["scores"]
    return out


def _finite(v) -> bool:
    return v is not None and bool(np.isfinite(v))


def dice_w74(scores: dict) -> float | None:
    """The nf and pe mean Dice of one cell's ``scores`` re-weighted to the paper's effusion
    share (None when either subset is empty or not finite)."""
    nf, pe = scores.get("nf", {}).get("dice"), scores.get("pe", {}).get("dice")
    if not (_finite(nf) and _finite(pe)) or not scores["nf"].get("n", 1) \
            or not scores["pe"].get("n", 1):
        return None
    return PAPER_EFFUSION_SHARE * pe + (1 - PAPER_EFFUSION_SHARE) * nf


def _value(scores: dict, key: str) -> float | None:
    if key == "dsc_w74":
        return dice_w74(scores)
    subset, metric = _METRIC_OF[key]
    return scores.get(subset, {}).get(metric)


def _spread(cells: dict[Key, dict], key: str) -> dict:
    """Mean over (seed, fold) cells, std over folds (seed-averaged) and over seeds."""
    vals = {k: v for k, s in cells.items() if _finite(v := _value(s, key))}
    if not vals:
        return {"mean": float("nan"), "fold_std": float("nan"), "seed_sd": float("nan"),
                "n_seeds": 0, "n_folds": 0}
    seeds = sorted({s for s, _ in vals})
    folds = sorted({k for _, k in vals})
    by_fold = [np.mean([v for (s, k), v in vals.items() if k == f]) for f in folds]
    by_seed = [np.mean([v for (s, k), v in vals.items() if s == x]) for x in seeds]
    return {"mean": float(np.mean(list(vals.values()))),
            "fold_std": float(np.std(by_fold, ddof=1)) if len(folds) > 1 else 0.0,
            "seed_sd": float(np.std(by_seed, ddof=1)) if len(seeds) > 1 else 0.0,
            "n_seeds": len(seeds), "n_folds": len(folds)}


def aggregate(cells: list[dict]) -> tuple[list[dict], list[dict]]:
    """Cells -> (main table rows at budget "all", label-efficiency rows), in ROWS order."""
    by = _by(cells)
    main, eff = [], []
    for row in ROWS:
        group = by.get((row.slug, "all"))
        if group:
            rec: dict = {"method": row.name}
            for key in _METRIC_OF:
                st = _spread(group, key)
                rec[key], rec[f"{key}_std"] = st["mean"], st["fold_std"]
                if key == "dsc":
                    rec.update(dsc_seed_sd=st["seed_sd"], n_seeds=st["n_seeds"],
                               n_folds=st["n_folds"])
            main.append(rec)
        for budget in sorted({b for (r, b) in by if r == row.slug}, key=_budget_key):
            group = by[(row.slug, budget)]
            st = _spread(group, "dsc")
            eff.append({"method": row.name, "budget": budget, "dsc": st["mean"],
                        "dsc_std": st["fold_std"], "dsc_seed_sd": st["seed_sd"],
                        "dsc_pe": _spread(group, "dsc_pe")["mean"],
                        "dsc_w74": _spread(group, "dsc_w74")["mean"],
                        "n_seeds": st["n_seeds"], "n_folds": st["n_folds"]})
    return main, eff


def _budget_key(b: str) -> float:
    return float("inf") if b == "all" else float(b)


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if k in ("p", "p_holm") and isinstance(v, float)
                            else f"{v:.3f}" if isinstance(v, float) else v)
                        for k, v in r.items()})


def cell_rows(cells: list[dict]) -> list[dict]:
    """cells.csv: one line per cell, sorted by row (ROWS order), seed, fold, budget."""
    order = {r.slug: i for i, r in enumerate(ROWS)}
    out = []
    for c in cells:
        sc = c["scores"]
        out.append({
            "row": c["row"], "method": c.get("method", c["row"]), "seed": int(c.get("seed", 0)),
            "fold": int(c["fold"]), "budget": c["budget"],
            "dice_overall": _value(sc, "dsc"), "dice_nf": _value(sc, "dsc_nf"),
            "dice_pe": _value(sc, "dsc_pe"), "dice_w74": _value(sc, "dsc_w74"),
            "dice_portable": _value(sc, "dsc_portable"), "dice_severe": _value(sc, "dsc_severe"),
            "hd95": _value(sc, "hd95"), "asd": _value(sc, "asd"),
            "n_train": c.get("n_train"), "n_test": c.get("n_test"),
            "init_fingerprint": c.get("init_fingerprint") if c.get("init") else "random",
            "commit": c.get("commit", ""),
            "device": str(c.get("train_log", {}).get("device", "cpu")),
            "data": c.get("data", ""), "seconds": c.get("seconds"),
            "cpu_seconds": c.get("cpu_seconds")})
    out.sort(key=lambda r: (order.get(r["row"], 99), r["seed"], r["fold"],
                            _budget_key(r["budget"])))
    return out


def cells_from_csv(path: Path) -> list[dict]:
    """Cells back from a committed ``cells.csv`` (what :func:`write_report` needs), so the
    tables, claims and figures can be regenerated without the cell cache."""
    def num(v: str) -> float | None:
        return float(v) if v not in ("", None) else None

    out = []
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            scores = {"overall": {"dice": num(r["dice_overall"]), "hd95": num(r["hd95"]),
                                  "asd": num(r["asd"])},
                      "nf": {"dice": num(r["dice_nf"])}, "pe": {"dice": num(r["dice_pe"])}}
            for sub in ("portable", "severe"):
                if num(r[f"dice_{sub}"]) is not None:
                    scores[sub] = {"dice": num(r[f"dice_{sub}"])}
            fp = r["init_fingerprint"]
            out.append({"row": r["row"], "method": r["method"], "seed": int(r["seed"]),
                        "fold": int(r["fold"]), "budget": r["budget"], "scores": scores,
                        "n_train": r["n_train"], "n_test": r["n_test"],
                        "init": None if fp == "random" else "bundle",
                        "init_fingerprint": None if fp in ("random", "") else fp,
                        "commit": r["commit"], "train_log": {"device": r["device"]},
                        "data": r["data"], "seconds": num(r["seconds"]),
                        "cpu_seconds": num(r.get("cpu_seconds", "")),
                        "command": f"(from {Path(path).name})"})
    return out


# --- claims -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """A claim of the paper as a test on paired cells.

    kind: ``"superiority"`` (A > B: two-sided test of mean(A - B) = 0),
    ``"noninferiority"`` (A >= B: two-sided test of mean(A - B) = -margin, holds when
    the mean is significantly above -margin), ``"best"`` (A beats every row of ``b``:
    intersection-union test, holds when every A - B_i is significantly positive).
    """

    text: str
    a: str
    b: tuple[str, ...]
    kind: str = "superiority"
    margin: float = 0.0


def _claims() -> tuple[Claim, ...]:
    name = {r.slug: r.name for r in ROWS}
    out = [Claim("DVD-CL > VADeR", "dvd-cl", ("vader",))]
    out += [Claim(f"{name[cf]} > {name[aug]} (counterfactual vs augmented real views)", cf, (aug,))
            for cf, aug in CONTROL_PAIRS]
    out += [
        Claim(f"S-MVD-CL >= Segmentation (silver) (non-inferior, margin "
              f"{NONINFERIORITY_MARGIN:g} Dice point)", "s-mvd-cl", ("seg-silver",),
              "noninferiority", NONINFERIORITY_MARGIN),
        Claim("S-MVD-CL best overall (beats every other row of the paper's table)", "s-mvd-cl",
              tuple(r for r in PAPER_ROWS if r != "s-mvd-cl"), "best"),
        Claim("S-DVD-CL > DVD-CL (silver supervision)", "s-dvd-cl", ("dvd-cl",)),
        Claim("S-MVD-CL > MVD-CL (silver supervision)", "s-mvd-cl", ("mvd-cl",)),
        Claim("S-MVD-CL oracle views > model views", "s-mvd-cl-oracle", ("s-mvd-cl",)),
    ]
    return tuple(out)


CLAIMS: tuple[Claim, ...] = _claims()


def paired_table(a: dict[Key, dict], b: dict[Key, dict], key: str
                 ) -> tuple[np.ndarray, list[int], list[int]]:
    """Complete ``(S, K)`` table of ``a - b`` of ``key``, with its seeds and folds.

    Cells pair by (seed, fold); a side with one seed only (the None row) pairs with
    every seed of the other. Folds kept: those every seed has on both sides (finite);
    when no fold is common to all seeds, the seed with the most folds alone.
    """
    va = {k: v for k, s in a.items() if _finite(v := _value(s, key))}
    vb = {k: v for k, s in b.items() if _finite(v := _value(s, key))}
    sa, sb = {s for s, _ in va}, {s for s, _ in vb}
    d: dict[Key, float] = {}
    for (s, k), x in va.items():
        other = s if len(sb) != 1 else next(iter(sb))
        if (other, k) in vb:
            d[(s, k)] = x - vb[(other, k)]
    if len(sa) == 1 and len(sb) > 1:  # a is the single-seed side
        (only,) = sa
        d = {(s, k): va[(only, k)] - y for (s, k), y in vb.items() if (only, k) in va}
    if not d:
        return np.zeros((0, 0)), [], []
    seeds = sorted({s for s, _ in d})
    folds = sorted(set.intersection(*({k for s2, k in d if s2 == s} for s in seeds)))
    if not folds:
        best = max(seeds, key=lambda s: sum(1 for s2, _ in d if s2 == s))
        seeds, folds = [best], sorted(k for s2, k in d if s2 == best)
    return np.array([[d[(s, k)] for k in folds] for s in seeds]), seeds, folds


def _test(table: np.ndarray, null: float):
    return crossed_interval(table, null=null) if table.size >= 2 else None


def judge_claims(cells: list[dict], claims: tuple[Claim, ...] = CLAIMS,
                 alpha: float = ALPHA) -> list[dict]:
    """claims.csv rows: every claim at every budget, for the primary and secondary metrics.

    Holm's adjustment runs over all claims x budgets of one family (primary: overall
    Dice; secondary: effusion Dice and the 74 %-effusion re-weighted Dice). Verdict:
    "holds" when the adjusted p < alpha in the claim's direction, "reversed" when
    < alpha in the other direction, "undecided" otherwise; "not measured" when a
    row has no pairs (outside the family). The interval is the unadjusted 95 % t
    interval of the mean difference (:func:`~pcl_viewer.evaluate.stats.crossed_interval`).
    """
    by = _by(cells)
    budgets = sorted({c["budget"] for c in cells}, key=lambda b: (b != "all", _budget_key(b)))
    out: list[dict] = []
    for metric in (PRIMARY_METRIC, *SECONDARY_METRICS):
        family = "primary" if metric == PRIMARY_METRIC else "secondary"
        for budget in budgets:
            for cl in claims:
                out.append(_one_claim(cl, by, metric, budget, family))
    for family in ("primary", "secondary"):
        rows = [r for r in out if r["family"] == family]
        for r, q in zip(rows, holm([r["p"] for r in rows]), strict=True):
            r["p_holm"] = float(q)
            if not np.isfinite(q):
                r["verdict"] = "not measured"
            elif q >= alpha:
                r["verdict"] = "undecided"
            else:
                r["verdict"] = "holds" if r["_sign"] > 0 else "reversed"
    for r in out:
        r.pop("_sign")
    return out


def _one_claim(cl: Claim, by, metric: str, budget: str, family: str) -> dict:
    rec = {"claim": cl.text, "kind": cl.kind, "a": cl.a, "b": ",".join(cl.b), "metric": metric,
           "budget": budget, "family": family, "n_seeds": 0, "n_folds": 0,
           "mean_diff": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
           "df": float("nan"), "null": -cl.margin if cl.kind == "noninferiority" else 0.0,
           "p": float("nan"), "p_holm": float("nan"), "verdict": "not measured", "detail": "",
           "_sign": 0}
    a = by.get((cl.a, budget), {})
    results = []
    for b in cl.b:
        table, _, _ = paired_table(a, by.get((b, budget), {}), metric)
        res = _test(table, rec["null"])
        if res is not None:
            results.append((b, res))
    if not results:
        rec["detail"] = "no paired cells"
        return rec
    if cl.kind == "best":
        # Intersection-union: A is best when every A - B_i > 0; its p is the largest.
        # Otherwise the evidence that some B_i beats A: the smallest p of the negative
        # differences, Bonferroni-corrected over the m comparisons.
        m = len(results)
        b, res = min(results, key=lambda br: br[1].mean)  # the closest competitor
        negative = [r.p for _, r in results if r.mean <= 0]
        if negative:
            p, sign = min(1.0, m * min(negative)), -1
        else:
            p, sign = max(r.p for _, r in results), 1
        missing = [x for x in cl.b if x not in {bb for bb, _ in results}]
        rec["detail"] = (f"closest: {ROW_BY_SLUG[b].name if b in ROW_BY_SLUG else b}; "
                         f"{m} rows compared" + (f", not measured: {','.join(missing)}"
                                                if missing else ""))
    else:
        b, res = results[0]
        p, sign = res.p, (1 if res.mean > res.null else -1)
    rec.update(n_seeds=res.n_seeds, n_folds=res.n_folds, mean_diff=res.mean, ci_low=res.low,
               ci_high=res.high, df=res.df, p=p, _sign=sign)
    return rec


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


def _claim_line(r: dict) -> str:
    ci = (f"[{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]" if np.isfinite(r["ci_low"]) else "-")
    p = f"{r['p_holm']:.3g}" if np.isfinite(r["p_holm"]) else "-"
    diff = f"{r['mean_diff']:+.2f}" if np.isfinite(r["mean_diff"]) else "-"
    detail = f" ({r['detail']})" if r["detail"] else ""
    return (f"| {r['claim']}{detail} | {r['budget']} | {r['n_seeds']} x {r['n_folds']} | {diff} "
            f"| {ci} | {p} | **{r['verdict']}** |")


CLAIMS_INTRO = (
    "Each claim is judged on the paired differences A - B of one metric over "
    "(pre-training seed, fold) cells: the same fold split and fine-tuning seed on both "
    "sides, seed s of A against seed s of B (the None row, which has no pre-training, "
    "against every seed). Interval: 95 % Student t on the mean difference with the "
    "variance of a crossed seed x fold design (fold, seed and residual components from "
    "the two-way ANOVA mean squares, Satterthwaite degrees of freedom; the paired t-test "
    "over folds when there is one seed). p: two-sided, Holm-adjusted over every claim and "
    "budget of the table (primary family: overall Dice; secondary: pe and the 74 % "
    "re-weighted Dice). holds / reversed: adjusted p < 0.05 with the mean difference on "
    "the claim's side / the other side; undecided otherwise. '>=' is non-inferiority: "
    f"the null is A - B = -{NONINFERIORITY_MARGIN:g} Dice point. 'best overall' is an "
    "intersection-union test: S-MVD-CL minus each other row of the paper's table; it "
    "holds when all differences are positive and the largest of their p-values is "
    "small (that p enters Holm), is reversed when some row beats S-MVD-CL (smallest p "
    "of the negative differences x the number of rows compared); the difference shown "
    "is the one against the closest row.")


def _seed_note(row: dict) -> str:
    """`` [sd]``: the Dice std over pre-training seeds where a row has several, else ``""``."""
    return f" [{row['dsc_seed_sd']:.2f}]" if row["n_seeds"] > 1 else ""


def _paper(method: str) -> dict:
    """The paper's numbers of a benchmark row (by its name), ``{}`` where it has none."""
    return next((r.paper or {} for r in ROWS if r.name == method), {})


def markdown(main: list[dict], eff: list[dict], claim_rows: list[dict], header: str) -> str:
    """benchmark.md: our table beside the paper's, label efficiency, claim verdicts."""
    lines = [header, "", "## Main table (all training labels of each fold)", "",
             "Dice % mean over (seed, fold) cells (std over folds) [std over pre-training "
             "seeds]; w74 = nf and pe re-weighted to the paper's 74 % effusion share; "
             "HD95/ASD in pixels of our grid. Paper columns from its results table "
             "(224 px, real PadChest).", "",
             "| method | seeds x folds | DSC | nf | pe | w74 | portable | severe | HD95 | ASD "
             "| paper DSC | paper nf | paper pe | paper HD95 | paper ASD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in main:
        p = _paper(m["method"])
        lines.append("| " + " | ".join([
            m["method"], f"{m['n_seeds']} x {m['n_folds']}",
            _fmt(m["dsc"], m["dsc_std"]) + _seed_note(m),
            _fmt(m["dsc_nf"], m["dsc_nf_std"]), _fmt(m["dsc_pe"], m["dsc_pe_std"]),
            _fmt(m["dsc_w74"], m["dsc_w74_std"]),
            _fmt(m["dsc_portable"], m["dsc_portable_std"]), _fmt(m["dsc_severe"], m["dsc_severe_std"]),
            _fmt(m["hd95"], m["hd95_std"], 1), _fmt(m["asd"], m["asd_std"], 2),
            _fmt(p.get("dsc")), _fmt(p.get("dsc_nf")), _fmt(p.get("dsc_pe")),
            _fmt(p.get("hd95"), None, 1), _fmt(p.get("asd"))]) + " |")
    lines += ["", "## Label efficiency (Dice %, mean (std over folds) [std over seeds])", "",
              "| method | budget | seeds x folds | DSC | pe | w74 |", "|---|---|---|---|---|---|"]
    for e in eff:
        lines.append(f"| {e['method']} | {e['budget']} | {e['n_seeds']} x {e['n_folds']} | "
                     f"{_fmt(e['dsc'], e['dsc_std'])}{_seed_note(e)} | {_fmt(e['dsc_pe'])} | "
                     f"{_fmt(e['dsc_w74'])} |")
    lines += ["", "## The paper's claims on our data", "", CLAIMS_INTRO, ""]
    for family, title in (("primary", "overall Dice"), ("secondary", "pe and w74 Dice")):
        lines += [f"### {title}", "",
                  "| claim | budget | seeds x folds | A - B | 95 % CI | Holm p | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for r in claim_rows:
            if r["family"] == family:
                claim = r["claim"] if family == "primary" else f"{r['claim']} [{r['metric']}]"
                lines.append(_claim_line(r | {"claim": claim}))
        lines.append("")
    return "\n".join(lines) + "\n"


def readme_markdown(main: list[dict], claim_rows: list[dict], header: str,
                    figure: str = "docs/figures/label_efficiency.png") -> str:
    """The README's benchmark section (main table, primary claims, figure), to paste."""
    lines = [header, "",
             "| method | seeds x folds | DSC | nf | pe | w74 | portable | paper DSC |",
             "|---|---|---|---|---|---|---|---|"]
    for m in main:
        lines.append(f"| {m['method']} | {m['n_seeds']} x {m['n_folds']} | "
                     f"{_fmt(m['dsc'], m['dsc_std'])}{_seed_note(m)} | {_fmt(m['dsc_nf'])} | "
                     f"{_fmt(m['dsc_pe'])} | {_fmt(m['dsc_w74'])} | {_fmt(m['dsc_portable'])} | "
                     f"{_fmt(_paper(m['method']).get('dsc'))} |")
    lines += ["", "Dice %, mean (std over folds) [std over pre-training seeds]. Claims "
              "(overall Dice; paired over seed x fold, 95 % t interval, Holm-adjusted p; "
              "details in docs/results/benchmark.md):", "",
              "| claim | budget | seeds x folds | A - B | 95 % CI | Holm p | verdict |",
              "|---|---|---|---|---|---|---|"]
    lines += [_claim_line(r) for r in claim_rows if r["family"] == "primary"]
    lines += ["", f"![Label efficiency]({figure})", ""]
    return "\n".join(lines)


# --- pre-training length ------------------------------------------------------------------

CURVE_COLUMNS: tuple[str, ...] = ("row", "method", "seed", "epoch", "step", "loss", "probe_dice")


def pretrain_curves(runs: Path) -> list[dict]:
    """Probe Dice and loss after every epoch of every pre-training run under ``runs``
    (``RUNS/<row>/seed<s>/log.jsonl``), with the optimiser step count at that point."""
    out = []
    for log in sorted(Path(runs).glob("*/seed*/log.jsonl")):
        slug, seed = log.parent.parent.name, int(log.parent.name.removeprefix("seed"))
        step = 0
        for line in log.read_text().splitlines():
            h = json.loads(line)
            step += int(h.get("steps", 0))
            out.append({"row": slug, "method": ROW_BY_SLUG[slug].name if slug in ROW_BY_SLUG
                        else slug, "seed": seed, "epoch": int(h["epoch"]), "step": step,
                        "loss": h.get("loss"), "probe_dice": h.get("probe_dice")})
    order = {r.slug: i for i, r in enumerate(ROWS)}
    out.sort(key=lambda c: (order.get(c["row"], len(order)), c["seed"], c["epoch"]))
    return out


def plot_pretrain_curves(curves: list[dict], path: Path) -> None:
    """Probe Dice against pre-training steps: one line per row (mean over seeds, band =
    min..max over seeds)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    rows = list(dict.fromkeys(c["method"] for c in curves if _finite(c["probe_dice"])))
    for i, m in enumerate(rows):
        pts = defaultdict(list)
        for c in curves:
            if c["method"] == m and _finite(c["probe_dice"]):
                pts[c["step"]].append(c["probe_dice"])
        x = np.array(sorted(pts))
        y = [np.mean(pts[s]) for s in x]
        ax.plot(x, y, marker="o", ms=3, label=m, color=colours[i % 20],
                linestyle="--" if "†" in m else "-")
        if any(len(v) > 1 for v in pts.values()):
            ax.fill_between(x, [min(pts[s]) for s in x], [max(pts[s]) for s in x],
                            color=colours[i % 20], alpha=0.15)
    ax.set_xlabel("pre-training optimiser steps")
    ax.set_ylabel("linear-probe Dice (silver, held-out pool images)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_benchmark(main: list[dict], path: Path) -> None:
    """Grouped bars: Dice by method and subgroup, error bars = fold std."""
    plt = pyplot()

    keys = [("dsc", "overall"), ("dsc_nf", "nf"), ("dsc_pe", "pe"), ("dsc_w74", "w74"),
            ("dsc_portable", "portable"), ("dsc_severe", "severe")]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(main) + 2), 4.5))
    x = np.arange(len(main))
    w = 0.8 / len(keys)
    for j, (k, label) in enumerate(keys):
        ax.bar(x + (j - (len(keys) - 1) / 2) * w, [m[k] for m in main], w, yerr=[m[f"{k}_std"] for m in main],
               label=label, capsize=2)
    vals = [m[k] for m in main for k, _ in keys if np.isfinite(m[k])]
    ax.set_ylim(max(0, min(vals, default=0) - 5), 100)
    ax.set_xticks(x, [m["method"] for m in main], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("Dice (%)")
    ax.legend(ncol=len(keys), fontsize=8, loc="lower left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def _efficiency_floor(eff: list[dict]) -> float:
    """Lower y limit of the label-efficiency plot: 2 points under the lowest mean Dice that
    is not a far outlier (more than 10 points below the median of its budget; a collapsed
    fold would squash every other line, so outliers are clipped to the axis and labelled)."""
    kept: list[float] = []
    for b in {e["budget"] for e in eff}:
        at = np.array([e["dsc"] for e in eff if e["budget"] == b and np.isfinite(e["dsc"])])
        kept += [float(v) for v in at[at >= np.median(at) - 10]] if at.size else []
    return min(kept) - 2 if kept else 0.0


def plot_label_efficiency(eff: list[dict], path: Path) -> None:
    """Dice against the number of labelled images, one line per method (log x)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 4.8))
    methods = list(dict.fromkeys(e["method"] for e in eff))
    budgets = sorted({e["budget"] for e in eff}, key=_budget_key)
    pos = {b: i for i, b in enumerate(budgets)}
    colours = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    lo = _efficiency_floor(eff)
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
    save_figure(fig, path, dpi=120)


def write_report(cells: list[dict], results_dir: Path, figures_dir: Path, header: str,
                 other_loss: tuple[str, list[dict]] | None = None,
                 runs: Path | None = None) -> dict:
    """Write the tables, the committed evidence and the figures.

    ``results_dir``: benchmark.csv, label_efficiency.csv, cells.csv, claims.csv,
    benchmark.md, benchmark_readme.md (the README section), pretrain_curves.csv (from
    the pre-training runs under ``runs``); ``figures_dir``: benchmark.png,
    label_efficiency.png, pretrain_curves.png. ``other_loss``: (loss name, its cells),
    compared with ``cells`` (cross-entropy) in loss_comparison.csv.
    """
    main, eff = aggregate(cells)
    claim_rows = judge_claims(cells) if cells else []
    results_dir.mkdir(parents=True, exist_ok=True)
    write_csv(results_dir / "benchmark.csv", main, MAIN_COLUMNS)
    write_csv(results_dir / "label_efficiency.csv", eff, EFFICIENCY_COLUMNS)
    write_csv(results_dir / "cells.csv", cell_rows(cells), CELL_COLUMNS)
    write_csv(results_dir / "claims.csv", claim_rows, CLAIM_COLUMNS)
    text = markdown(main, eff, claim_rows, header)
    if other_loss is not None and other_loss[1]:
        comp = loss_comparison(cells, other_loss[1])
        write_csv(results_dir / "loss_comparison.csv", comp, LOSS_COLUMNS)
        text += "\n" + loss_markdown(comp, other_loss[0], other_loss[1])
    else:  # no stale comparison beside a table it was not made from
        (results_dir / "loss_comparison.csv").unlink(missing_ok=True)
    (results_dir / "benchmark.md").write_text(text)
    fig_rel = f"{figures_dir.as_posix()}/label_efficiency.png"
    (results_dir / "benchmark_readme.md").write_text(
        readme_markdown(main, claim_rows, header.splitlines()[0].replace("# ", "### "),
                        figure=fig_rel))
    curves = pretrain_curves(runs) if runs is not None else []
    if curves:
        write_csv(results_dir / "pretrain_curves.csv", curves, CURVE_COLUMNS)
        plot_pretrain_curves(curves, figures_dir / "pretrain_curves.png")
    if main:
        plot_benchmark(main, figures_dir / "benchmark.png")
    if eff:
        plot_label_efficiency(eff, figures_dir / "label_efficiency.png")
    return {"methods": len(main), "cells": len(cells), "claims": len(claim_rows),
            "curves": len(curves)}


#: Markers of the README's benchmark section, replaced by ``pcl bench --readme``.
README_BEGIN = "<!-- benchmark:begin (written by pcl bench --readme; edits here are overwritten) -->"
README_END = "<!-- benchmark:end -->"


def splice_readme(readme: Path, section: str) -> None:
    """Replace the text between :data:`README_BEGIN` and :data:`README_END` in ``readme``
    with ``section`` (the markers stay); written atomically.

    Raises:
        ValueError: the markers are missing, repeated or in the wrong order.
    """
    from pcl_viewer.atomic import atomic_writer

    with open(readme, encoding="utf-8", newline="") as fh:  # keep its line endings
        text = fh.read()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1:
        raise ValueError(f"{readme}: needs exactly one line {README_BEGIN!r} and one "
                         f"{README_END!r} around the benchmark section")
    head, rest = text.split(README_BEGIN)
    if README_END not in rest:
        raise ValueError(f"{readme}: {README_END!r} comes before {README_BEGIN!r}")
    _, tail = rest.split(README_END)
    eol = "\r\n" if "\r\n" in text else "\n"
    body = eol.join(section.strip().splitlines())
    with atomic_writer(readme, "w", encoding="utf-8", newline="") as fh:
        fh.write(f"{head}{README_BEGIN}{eol}{body}{eol}{README_END}{tail}")
