"""The review's report files: report.csv, errors.csv and one self-contained report.html.

Everything is inline: CSS, a few lines of JS (click a column header to sort),
the summary plots as base64 PNGs drawn by matplotlib, and the thumbnails of the
flagged scans. It opens from disk with no server and no network.

Text from files (paths, names, reader messages) is untrusted: in the HTML it is
escaped; in the CSVs undecodable file-name bytes are shown as ``\\xNN``
(:func:`pcl_viewer.review.display_text`) and a cell that a spreadsheet would run as a
formula (starting with ``= + - @``, tab or carriage return) is prefixed with ``'``
(:func:`csv_cell`, as OWASP recommends against CSV injection).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pcl_viewer.atomic import atomic_write_text
from pcl_viewer.review_records import (
    ERROR_COLUMNS,
    REPORT_COLUMNS,
    ReviewConfig,
    display_text,
    flag_reason,
    load_journal,
)

# First characters that make a spreadsheet evaluate a cell (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _h(x: Any) -> str:
    """HTML-escaped, UTF-8-safe text of ``x``."""
    return html.escape(display_text(x))

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d2330;
background:#fafbfc}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#556;font-size:13px} .cards{display:flex;gap:12px;margin:14px 0}
.card{background:#fff;border:1px solid #dde;border-radius:8px;padding:10px 16px;min-width:110px}
.card b{display:block;font-size:22px} .card.bad b{color:#b3261e}
table{border-collapse:collapse;background:#fff;font-size:13px}
th,td{border:1px solid #dde;padding:4px 7px;text-align:left;vertical-align:middle}
th{background:#eef1f6;cursor:pointer;user-select:none;position:sticky;top:0}
th.asc::after{content:" \\25B2"} th.desc::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums} td.low{color:#b3261e;font-weight:600}
img.th{height:88px;border-radius:3px;margin-right:3px} td.thumbs{white-space:nowrap} .plots img{max-width:100%}
.path{max-width:360px;overflow-wrap:anywhere;font-family:ui-monospace,monospace;font-size:12px}
.legend span{display:inline-block;width:11px;height:11px;margin:0 4px 0 10px;border-radius:2px}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
 t.querySelectorAll('th').forEach(function(th,i){th.addEventListener('click',function(){
  var asc=!th.classList.contains('asc');t.querySelectorAll('th').forEach(function(h){
   h.classList.remove('asc','desc')});th.classList.add(asc?'asc':'desc');
  var rows=Array.prototype.slice.call(t.tBodies[0].rows);rows.sort(function(a,b){
   var x=a.cells[i].dataset.v!==undefined?a.cells[i].dataset.v:a.cells[i].textContent;
   var y=b.cells[i].dataset.v!==undefined?b.cells[i].dataset.v:b.cells[i].textContent;
   var nx=parseFloat(x),ny=parseFloat(y);var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:
   String(x).localeCompare(String(y));return asc?c:-c});
  rows.forEach(function(r){t.tBodies[0].appendChild(r)})})})});
"""


def _fmt(x: Any, pct: bool = False, sign: bool = True) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return "" if x is None else _h(x)
    if not math.isfinite(v):
        return "n/a"
    if pct:
        return f"{v:+.1%}" if sign else f"{v:.0%}"
    return f"{v:.3f}"


def _sortkey(x: Any) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return ""
    return f"{v:.6g}" if math.isfinite(v) else "-1e9"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def summary_plot(rows: Sequence[dict[str, Any]]) -> str:
    """Box plots of Dice (CF vs factual) by factual scanner and by effusion, one box per
    intervention and group; returns a base64 PNG ("" when there is nothing to plot)."""
    if not rows:
        return ""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    interventions = list(dict.fromkeys(r["intervention"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    colours = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for ax, parent in zip(axes, ("scanner", "effusion")):
        groups = sorted({str(r[parent]) for r in rows})
        width = 0.8 / max(1, len(interventions))
        for k, key in enumerate(interventions):
            data = []
            for g in groups:
                vals = [float(r["dice"]) for r in rows if r["intervention"] == key
                        and str(r[parent]) == g and math.isfinite(float(r["dice"]))]
                data.append(vals or [np.nan])
            pos = np.arange(len(groups)) + (k - (len(interventions) - 1) / 2) * width
            bp = ax.boxplot(data, positions=pos, widths=width * 0.9, patch_artist=True,
                            showfliers=True, flierprops={"markersize": 3})
            for box in bp["boxes"]:
                box.set_facecolor(colours[k % len(colours)])
                box.set_alpha(0.75)
            ax.plot([], [], "s", color=colours[k % len(colours)], label=f"do({key})")
        ax.set_xticks(np.arange(len(groups)), [f"{parent}={g}\n(n={_count(rows, parent, g)})"
                                               for g in groups])
        ax.set_title(f"Consistency by factual {parent}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("Dice: CF segmentation vs factual")
    axes[1].legend(loc="lower right", fontsize=9)
    out = _png(fig)
    plt.close(fig)
    return out


def _count(rows: Sequence[dict[str, Any]], parent: str, value: str) -> int:
    return len({r["path"] for r in rows if str(r[parent]) == value})


def _group_table(rows: Sequence[dict[str, Any]]) -> str:
    """Mean Dice and flag rate by parent value and intervention."""
    body = []
    for parent in ("scanner", "effusion", "sex"):
        for g in sorted({str(r[parent]) for r in rows}):
            for key in dict.fromkeys(r["intervention"] for r in rows):
                sel = [r for r in rows if str(r[parent]) == g and r["intervention"] == key]
                d = np.array([float(r["dice"]) for r in sel], float)
                d = d[np.isfinite(d)]
                body.append(
                    f"<tr><td>{parent}={_h(g)}</td><td>do({_h(key)})</td>"
                    f"<td class=num>{len(sel)}</td><td class=num>{_fmt(d.mean() if d.size else None)}"
                    f"</td><td class=num>{_fmt(np.median(d) if d.size else None)}</td>"
                    f"<td class=num>{_fmt(sum(int(r['flagged']) for r in sel) / max(1, len(sel)), True, False)}"
                    "</td></tr>")
    return ("<table class=sortable><thead><tr><th>group</th><th>intervention</th><th>scans</th>"
            "<th>mean Dice</th><th>median Dice</th><th>flagged</th></tr></thead><tbody>"
            + "".join(body) + "</tbody></table>")


def _flagged_table(rows: Sequence[dict[str, Any]], thumbs: dict[str, dict[str, str]]) -> str:
    flagged = sorted((r for r in rows if int(r["flagged"])), key=lambda r: _sortkey(r["dice"]))
    if not flagged:
        return "<p>No scan is flagged.</p>"
    root = _common_root([r["path"] for r in rows])
    body = []
    for r in flagged:
        t = thumbs.get(r["path"], {})
        imgs = "".join(
            f'<img class=th alt="{_h(k)}" title="{_h(k)}" '
            f'src="data:image/png;base64,{t[k]}">' if t.get(k) else "<i>n/a</i>"
            for k in ("factual", r["intervention"]))
        shown = _h(r["path"][len(root):] if root else r["path"])
        cells = [f"<td class=path title=\"{_h(r['path'])}\">{shown}</td>"]
        cells += [f"<td>{_h(r[k])}</td>" for k in ("scanner", "sex", "effusion")]
        cells.append(f"<td>{_h(r['do'])}</td>")
        for k in ("dice", "dice_right", "dice_left"):
            low = " low" if _sortkey(r[k]) and float(_sortkey(r[k])) < 0.9 else ""
            cells.append(f"<td class='num{low}' data-v='{_sortkey(r[k])}'>{_fmt(r[k])}</td>")
        for k in ("area_right_change", "area_left_change"):
            cells.append(f"<td class=num data-v='{_sortkey(r[k])}'>{_fmt(r[k], True)}</td>")
        cells.append(f"<td>{_h(r['flag_reason'])}</td><td class=thumbs>{imgs}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    head = ("path", "scanner", "sex", "effusion", "intervention", "Dice", "Dice R", "Dice L",
            "area R", "area L", "why", "factual | counterfactual")
    from pcl_viewer.colors import LEFT_LUNG, RIGHT_LUNG

    return (f"<p class=legend>Thumbnails: <span style='background:{RIGHT_LUNG}'></span>right lung"
            f"<span style='background:{LEFT_LUNG}'></span>left lung. Click a header to sort.</p>"
            "<table class=sortable id=flagged><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(body) + "</tbody></table>")


def _common_root(paths: Sequence[str]) -> str:
    """The folder all ``paths`` share (with its trailing separator), or ""."""
    import os

    try:
        root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    except (ValueError, IndexError):
        return ""
    return root.rstrip(os.sep) + os.sep if root else ""


def _ood_table(records: Sequence[dict[str, Any]]) -> str:
    """Scans the domain check flags: their results are not to be trusted."""
    if not records:
        return "<p>No scan is flagged as out of domain.</p>"
    body = "".join(
        f"<tr><td class=path>{_h(r.get('path'))}</td>"
        f"<td class=num>{_fmt(r.get('domain_score'))}</td></tr>" for r in records)
    return ("<p class=meta>These scans are unlike the images the models were trained on "
            "(HVAE likelihood and classifier entropy against held-out phantom quantiles); "
            "do not trust their counterfactuals or segmentations.</p>"
            "<table class=sortable id=ood><thead><tr><th>file</th><th>domain score</th>"
            "</tr></thead><tbody>" + body + "</tbody></table>")


def _errors_table(errors: Sequence[dict[str, Any]]) -> str:
    if not errors:
        return "<p>Every file was read.</p>"
    body = "".join(
        f"<tr><td class=path>{_h(e.get('path'))}</td>"
        f"<td>{_h(e.get('stage', ''))}</td><td>{_h(e.get('error'))}</td></tr>"
        for e in errors)
    return ("<table class=sortable id=errors><thead><tr><th>file</th><th>stage</th><th>problem</th>"
            "</tr></thead><tbody>" + body + "</tbody></table>")


def render_report(records: Sequence[dict[str, Any]], cfg: Any, header: dict[str, Any]) -> str:
    """The whole report page for the journal ``records`` under review settings ``cfg``."""
    rows = report_rows(records, cfg)
    errors = [r for r in records if r.get("status") == "error"]
    ok = [r for r in records if r.get("status") == "ok"]
    thumbs = {r["path"]: r.get("thumbs", {}) for r in ok}
    n_flag = len({r["path"] for r in rows if int(r["flagged"])})
    ood = [r for r in ok if r.get("out_of_domain")]
    bundles = header.get("bundles") or {}
    models = ", ".join(f"{_h(k)}: {_h(v)}" for k, v in bundles.items()) or "n/a"
    plot = summary_plot(rows)
    cards = (f"<div class=cards><div class=card>scans reviewed<b>{len(ok)}</b></div>"
             f"<div class='card{' bad' if n_flag else ''}'>flagged<b>{n_flag}</b></div>"
             f"<div class='card{' bad' if errors else ''}'>unreadable<b>{len(errors)}</b></div>"
             f"<div class='card{' bad' if ood else ''}'>out of domain<b>{len(ood)}</b></div>"
             f"<div class=card>interventions<b>{len({r['intervention'] for r in rows})}</b></div></div>")
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>pcl-viewer robustness review</title>
<meta name=viewport content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><h1>Segmentation robustness review</h1>
<p class=meta>A scan is flagged when the segmentation of a counterfactual differs from the
factual one: mean lung Dice &lt; {cfg.threshold:g} or a lung-area change beyond
&plusmn;{cfg.area_threshold:.0%}. Models: {models}. Data: <a href="report.csv">report.csv</a>,
<a href="errors.csv">errors.csv</a>.</p>
{cards}
<h2>Consistency by scanner and by effusion</h2>
<div class=plots>{f'<img alt="consistency box plots" src="data:image/png;base64,{plot}">' if plot else '<p>No results yet.</p>'}</div>
{_group_table(rows) if rows else ''}
<h2>Flagged scans ({n_flag})</h2>
{_flagged_table(rows, thumbs)}
<h2>Scans outside the models' world ({len(ood)})</h2>
{_ood_table(ood)}
<h2>Files that could not be read ({len(errors)})</h2>
{_errors_table(errors)}
<script>{_JS}</script></body></html>
"""


# --------------------------------------------------------------------------- files


def thumbnail(image: np.ndarray, labels: np.ndarray | None, size: int) -> str:
    """A small PNG (base64) of the scan with the lungs in the project's colours
    (:mod:`pcl_viewer.colors`), translucent."""
    import cv2

    from pcl_viewer.colors import overlay_lungs

    h, w = image.shape
    scale = size / max(h, w)
    dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
    grey = cv2.resize(np.clip(image, 0, 1).astype(np.float32), dsize, interpolation=cv2.INTER_AREA)
    if labels is not None:
        lab = cv2.resize(labels.astype(np.uint8), dsize, interpolation=cv2.INTER_NEAREST)
    else:
        lab = np.zeros(grey.shape, np.uint8)
    rgb = overlay_lungs(grey, lab)  # the project's one lung colour scheme
    ok, buf = cv2.imencode(".png", rgb[..., ::-1])
    return base64.b64encode(buf.tobytes()).decode("ascii") if ok else ""


def csv_cell(value: Any) -> Any:
    """A CSV cell that is safe to open in a spreadsheet.

    Numbers pass unchanged; text is made UTF-8-safe (:func:`display_text`) and, if it
    starts with a formula character (``= + - @``, tab, CR), prefixed with ``'`` so that
    Excel, LibreOffice and Google Sheets show it as text instead of evaluating it.
    """
    if not isinstance(value, str):
        return value
    text = display_text(value)
    return "'" + text if text.startswith(FORMULA_START) else text


def csv_text(columns: Iterable[str], rows: Iterable[dict[str, Any]]) -> str:
    """CSV of ``rows`` (dicts) with ``columns``; every text cell through :func:`csv_cell`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    return buf.getvalue()


def report_rows(records: Iterable[dict[str, Any]], cfg: ReviewConfig) -> list[dict[str, Any]]:
    """One flat row per scan and intervention (the columns of ``report.csv``)."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok":
            continue
        p, pr = rec.get("parents", {}), rec.get("probabilities", {})
        h, w = (rec.get("shape") or [None, None])[:2]
        for r in rec.get("rows", []):
            reason = flag_reason(r, cfg)
            rows.append({
                "path": rec["path"], "name": rec.get("name", ""), "height": h, "width": w,
                **{k: p.get(k, "") for k in ("scanner", "sex", "effusion")},
                **{f"p_{k}": pr.get(k, "") for k in ("scanner", "sex", "effusion")},
                "parents_source": rec.get("parents_source", ""),
                "domain_score": rec.get("domain_score", ""),
                "out_of_domain": "" if rec.get("out_of_domain") is None
                else int(bool(rec["out_of_domain"])),
                "intervention": r["key"],
                "do": r["do"], **{k: r[k] for k in ("dice", "dice_right", "dice_left",
                                                    "area_right_change", "area_left_change")},
                "flagged": int(bool(reason)), "flag_reason": reason,
            })
    return rows


def write_reports(out: str | os.PathLike[str], cfg: ReviewConfig) -> dict[str, Path]:
    """Rewrite report.csv, errors.csv and report.html from the journal (each atomically)."""
    out = Path(out)
    header, records = load_journal(out)
    errors = [r for r in records if r.get("status") == "error"]
    files = {"csv": out / "report.csv", "errors": out / "errors.csv", "html": out / "report.html"}
    atomic_write_text(files["csv"], csv_text(REPORT_COLUMNS, report_rows(records, cfg)))
    atomic_write_text(files["errors"], csv_text(ERROR_COLUMNS, errors))
    atomic_write_text(files["html"], render_report(records, cfg, header or {}))
    return files
