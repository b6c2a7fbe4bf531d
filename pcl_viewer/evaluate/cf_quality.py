"""Counterfactual quality against the phantom's truth (Monteiro et al., ICLR 2023 measures).

Per intervention (flip scanner, flip effusion, both):

- ``mae`` / ``psnr`` between the model counterfactual and the phantom's true one, and the
  same for the identity baseline ``x_cf = x`` (``identity_*``) so the gain is visible;
- ``effectiveness``: balanced accuracy of each intervened attribute on ``x_cf`` by the
  bundle's calibrated classifiers (targets are the intervened values);
- ``reversibility_mae``: MAE between ``x`` and do(pa*) followed by do(pa) back;
- ``judge_effectiveness`` (with ``judge``): the same balanced accuracy by an independent
  classifier (another seed, other images). Counterfactual fine-tuning optimises against
  the bundle's own classifiers, so their verdict alone can be flattered by changes that
  fool one network; the judge's cannot.

Region-aware effusion metrics, split by direction (``effusion_remove``: images with
effusion, ``effusion_add``: normal images; see :func:`effusion_direction_metrics`):
``mae_reduction_vs_identity``, ``change_in_fluid_region`` (share of sum |x_cf - x| inside
the true fluid region, dilated 2 px), the side the model changes most against the true side
(remove) or the distribution of sides against the prior's (add), effectiveness by the
model's own classifiers and the judge, reversibility, and the segmenter's Dice on model vs
true counterfactuals.

Over all images: ``composition_mae`` (the null intervention against ``x``; exact by
construction of ``x + mu_cf - mu``) and ``recon_mae`` (``|mu - x|``, what the decoder itself
explains), plus the classifiers' balanced accuracy on the factual images.
"""

from __future__ import annotations

import numpy as np
import torch

from pcl_viewer.figures import pyplot, save_figure
from pcl_viewer.models.classifiers import balanced_accuracy
from pcl_viewer.models.counterfactual import STANDARD_DOS, CounterfactualModel, intervene
from pcl_viewer.parents import PARENT_NAMES, VIEW_KINDS

TARGETS = {"composition_mae": 0.01, "reversibility_mae": 0.02, "effectiveness": 0.90,
           "mae_reduction_vs_identity": 0.50}
#: Acceptance targets of the effusion counterfactual per direction and of do(scanner).
EFFUSION_TARGETS = {
    "remove": {"mae_reduction_vs_identity": 0.50, "change_in_fluid_region": 0.70,
               "side_agreement": 0.90, "judge_effectiveness": 0.90, "dice_gap_points": 2.0},
    "add": {"judge_effectiveness": 0.90, "change_in_fluid_region_side_matched": 0.50,
            "side_share_max_deviation_points": 15.0, "dice_gap_points": 2.0},
    "scanner": {"mae_reduction_vs_identity": 0.60, "judge_effectiveness": 0.95,
                "reversibility_mae": 0.02, "composition_mae": 0.01},
}
SIDES: tuple[str, ...] = ("right", "left", "bilateral")
#: A true fluid region: pixels where the true effusion counterfactual differs from the
#: factual image by more than this (intensity in [0, 1]), then dilated by FLUID_DILATE px.
FLUID_THRESHOLD = 0.01
FLUID_DILATE = 2


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB, peak 1) of ``(N, ...)`` arrays."""
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-10))


@torch.no_grad()
def _batch(model: CounterfactualModel, x: torch.Tensor, pa: torch.Tensor,
           judge=None) -> dict[str, np.ndarray]:
    ab = model.abduct(x, pa)
    out: dict[str, np.ndarray] = {
        "null": (ab.x + model.residual(ab, {})).clamp(0, 1).numpy(),
        "mu": ab.mu.numpy(),
    }
    for kind, do in STANDARD_DOS.items():
        pa_cf = intervene(pa, do)
        x_cf = (ab.x + model.residual(ab, pa_cf)).clamp(0, 1)
        back_ab = model.abduct(x_cf, pa_cf)
        x_back = (x_cf + model.residual(back_ab, pa)).clamp(0, 1)
        out[kind] = x_cf.numpy()
        out[f"{kind}_back"] = x_back.numpy()
        if model.classifier is not None:
            out[f"{kind}_probs"] = model.classifier.probs(x_cf).numpy()
            out[f"{kind}_id_probs"] = model.classifier.probs(x).numpy()
        if judge is not None:
            out[f"{kind}_judge_probs"] = judge.probs(x_cf).numpy()
        out[f"{kind}_target"] = pa_cf.numpy()
    return out


def evaluate_counterfactuals(model: CounterfactualModel, x: np.ndarray, parents: np.ndarray,
                             true_cf: np.ndarray | None = None, batch_size: int = 64,
                             keep: int = 0, judge=None, segmenter=None,
                             true_cf_masks: np.ndarray | None = None,
                             side_prior: dict[str, float] | None = None,
                             keep_all: bool = False) -> dict:
    """Quality metrics of ``model`` on images ``x`` (N, 1, S, S) with parents (N, 3).

    ``true_cf`` (N, 3, 1, S, S), order scanner, effusion, both, enables the truth metrics
    and the per-direction effusion metrics (``effusion_remove``, ``effusion_add``).
    ``keep`` > 0 also returns the first ``keep`` images' views under ``"examples"``
    (``keep_all``: every image's, for figures).
    ``judge``: an independent :class:`AttributeClassifiers` (``probs(x) -> (B, 3)``) for
    ``judge_effectiveness``. ``segmenter``: ``(B, 1, S, S) -> (B, S, S)`` uint8 lung labels;
    with ``true_cf_masks`` (N, S, S), the gold masks of the true effusion counterfactuals,
    it scores the segmenter's Dice on model vs true counterfactuals. ``side_prior``: the
    data's share of each effusion side (default: the phantom's).
    """
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), batch_size):
        res = _batch(model, torch.from_numpy(x[i:i + batch_size]),
                     torch.from_numpy(parents[i:i + batch_size]), judge)
        for k, v in res.items():
            parts.setdefault(k, []).append(v)
    r = {k: np.concatenate(v) for k, v in parts.items()}
    report: dict = {
        "n": int(len(x)),
        "composition_mae": float(np.abs(r["null"] - x).mean()),
        "recon_mae": float(np.abs(r["mu"] - x).mean()),
        "interventions": {},
    }
    if model.classifier is not None:
        probs = r["scanner_id_probs"]
        report["classifier_factual_balanced_accuracy"] = {
            name: balanced_accuracy(probs[:, j] >= 0.5, parents[:, j] >= 0.5)
            for j, name in enumerate(PARENT_NAMES)}
    for k, kind in enumerate(VIEW_KINDS):
        x_cf = r[kind]
        m: dict = {"reversibility_mae": float(np.abs(r[f"{kind}_back"] - x).mean()),
                   "mean_abs_change": float(np.abs(x_cf - x).mean())}
        if true_cf is not None:
            truth = true_cf[:, k]
            m["mae"] = float(np.abs(x_cf - truth).mean())
            m["psnr"] = float(psnr(x_cf, truth).mean())
            m["identity_mae"] = float(np.abs(x - truth).mean())
            m["identity_psnr"] = float(psnr(x, truth).mean())
            m["mae_reduction_vs_identity"] = 1.0 - m["mae"] / max(m["identity_mae"], 1e-12)
        if model.classifier is not None:
            target = r[f"{kind}_target"]
            m["effectiveness"] = {}
            m["identity_effectiveness"] = {}
            for name in STANDARD_DOS[kind]:
                j = PARENT_NAMES.index(name)
                m["effectiveness"][name] = balanced_accuracy(
                    r[f"{kind}_probs"][:, j] >= 0.5, target[:, j] >= 0.5)
                m["identity_effectiveness"][name] = balanced_accuracy(
                    r[f"{kind}_id_probs"][:, j] >= 0.5, target[:, j] >= 0.5)
        if judge is not None:
            target = r[f"{kind}_target"]
            m["judge_effectiveness"] = {
                name: balanced_accuracy(r[f"{kind}_judge_probs"][:, PARENT_NAMES.index(name)] >= 0.5,
                                        target[:, PARENT_NAMES.index(name)] >= 0.5)
                for name in STANDARD_DOS[kind]}
        report["interventions"][kind] = m
    if true_cf is not None:
        k = VIEW_KINDS.index("effusion")
        judge_true = None
        if judge is not None:  # the judge on the true counterfactuals: the most it can grant
            with torch.no_grad():
                judge_true = np.concatenate([
                    judge.probs(torch.from_numpy(np.ascontiguousarray(true_cf[i:i + batch_size, k]))
                                ).numpy()[:, 2] for i in range(0, len(x), batch_size)])
        for direction, sel in (("remove", parents[:, 2] > 0.5), ("add", parents[:, 2] <= 0.5)):
            if not sel.any():
                continue
            own = r["effusion_probs"][sel, 2] if model.classifier is not None else None
            jud = r["effusion_judge_probs"][sel, 2] if judge is not None else None
            report[f"effusion_{direction}"] = effusion_direction_metrics(
                direction, x[sel], r["effusion"][sel], r["effusion_back"][sel],
                true_cf[sel, k], own, jud, segmenter,
                None if true_cf_masks is None else true_cf_masks[sel], side_prior,
                None if judge_true is None else judge_true[sel])
    report["targets"] = TARGETS
    report["meets_targets"] = _check_targets(report)
    report["acceptance"] = acceptance(report)
    if keep_all:
        report["examples"] = {k: r[k] for k in VIEW_KINDS}
    elif keep:
        report["examples"] = {k: r[k][:keep] for k in VIEW_KINDS}
    return report


def change_sides(change: np.ndarray) -> np.ndarray:
    """Side of the larger change per image: ``(N, S, S)`` |difference| -> ``(N,)`` str.

    ``right`` (the patient's right lung = the image's left half) when that half holds more
    than 2/3 of the summed change, ``left`` below 1/3, ``bilateral`` between, ``none`` when
    nothing changed. The same rule labels the model's and the true counterfactual's change.
    """
    half = change.shape[-1] // 2
    left_img = change[:, :, :half].reshape(len(change), -1).sum(1)
    total = change.reshape(len(change), -1).sum(1)
    frac = left_img / np.maximum(total, 1e-12)
    out = np.where(frac > 2 / 3, "right", np.where(frac < 1 / 3, "left", "bilateral"))
    return np.where(total > 1e-9, out, "none")


def fluid_regions(x: np.ndarray, truth: np.ndarray, threshold: float = FLUID_THRESHOLD,
                  dilate: int = FLUID_DILATE) -> np.ndarray:
    """True fluid region ``(N, S, S)`` bool: |truth - x| > threshold, dilated by ``dilate``
    px (square structuring element). ``x``, ``truth``: ``(N, 1, S, S)`` or ``(N, S, S)``."""
    import cv2

    d = np.abs(truth - x).reshape(len(x), x.shape[-2], x.shape[-1]) > threshold
    if dilate <= 0:
        return d
    kernel = np.ones((2 * dilate + 1, 2 * dilate + 1), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in d]) if len(d) else d


def region_share(change: np.ndarray, region: np.ndarray) -> float:
    """Share of the summed ``change`` (N, S, S) inside ``region`` (N, S, S), pooled; NaN
    when nothing changed."""
    total = float(change.sum())
    return float(change[region].sum() / total) if total > 0 else float("nan")


def _side_prior() -> dict[str, float]:
    from pcl_viewer.data.phantom import noise

    return {s: float(p) for s, p in zip(noise.EFFUSION_SIDES, noise.EFFUSION_SIDE_P)}


def effusion_direction_metrics(direction: str, x: np.ndarray, x_cf: np.ndarray,
                               x_back: np.ndarray, truth: np.ndarray,
                               own_probs: np.ndarray | None, judge_probs: np.ndarray | None,
                               segmenter=None, truth_masks: np.ndarray | None = None,
                               side_prior: dict[str, float] | None = None,
                               judge_true_probs: np.ndarray | None = None) -> dict:
    """Region-aware metrics of do(effusion) on images of one direction.

    Args:
        direction: ``"remove"`` (the images have effusion) or ``"add"`` (they have none).
        x, x_cf, x_back, truth: ``(N, 1, S, S)`` factual, model counterfactual, the model's
            way back (do(effusion) to the factual value on ``x_cf``), true counterfactual.
        own_probs, judge_probs: ``(N,)`` P(effusion) on ``x_cf`` by the model's classifiers
            and by the independent judge (None: skipped).
        segmenter: ``(B, 1, S, S) -> (B, S, S)`` labels; ``truth_masks`` ``(N, S, S)`` gold
            masks of the true counterfactuals.
        judge_true_probs: ``(N,)`` the judge's P(effusion) on the true counterfactuals:
            ``judge_effectiveness_true_cf``, the judge's verdict on the truth itself (what a
            perfect model would score with this judge).
    Returns:
        JSON-able dict. ``change_in_fluid_region`` is pooled over images; for ``add`` the
        fluid is drawn from the prior, so ``side_matched`` repeats it on the images where the
        model chose the true side (where the true region is the one the model aimed at).
    """
    n = len(x)
    change = np.abs(x_cf - x)[:, 0]
    true_change = np.abs(truth - x)[:, 0]
    region = fluid_regions(x, truth)
    target = 1.0 if direction == "add" else 0.0
    m: dict = {"n": int(n)}
    m["mae"] = float(np.abs(x_cf - truth).mean())
    m["identity_mae"] = float(true_change.mean())
    m["mae_reduction_vs_identity"] = 1.0 - m["mae"] / max(m["identity_mae"], 1e-12)
    m["mean_abs_change"] = float(change.mean())
    m["change_in_fluid_region"] = region_share(change, region)
    m["true_change_in_fluid_region"] = region_share(true_change, region)
    m["fluid_region_share_of_image"] = float(region.mean())
    per_image = [region_share(c[None], g[None]) for c, g in zip(change, region)]
    finite = [v for v in per_image if not np.isnan(v)]
    m["change_in_fluid_region_median_image"] = float(np.median(finite)) if finite else float("nan")
    model_side, true_side = change_sides(change), change_sides(true_change)
    m["model_sides"] = {s: float((model_side == s).mean()) for s in SIDES}
    m["true_sides"] = {s: float((true_side == s).mean()) for s in SIDES}
    if direction == "remove":
        m["side_agreement"] = float((model_side == true_side).mean())
    else:
        prior = side_prior or _side_prior()
        m["prior_sides"] = prior
        dev = {s: 100 * (m["model_sides"][s] - prior.get(s, 0.0)) for s in SIDES}
        m["side_share_deviation_points"] = dev
        m["side_share_max_deviation_points"] = float(max(abs(v) for v in dev.values()))
        m["side_agreement"] = float((model_side == true_side).mean())  # chance level expected
        match = model_side == true_side
        m["n_side_matched"] = int(match.sum())
        m["change_in_fluid_region_side_matched"] = (
            region_share(change[match], region[match]) if match.any() else float("nan"))
    if own_probs is not None:
        m["effectiveness"] = float(((own_probs >= 0.5) == (target >= 0.5)).mean())
    if judge_probs is not None:
        m["judge_effectiveness"] = float(((judge_probs >= 0.5) == (target >= 0.5)).mean())
    if judge_true_probs is not None:
        m["judge_effectiveness_true_cf"] = float(((judge_true_probs >= 0.5) == (target >= 0.5)).mean())
    m["reversibility_mae"] = float(np.abs(x_back - x).mean())
    if segmenter is not None and truth_masks is not None:
        from pcl_viewer.evaluate.metrics import dice_per_image

        d_model = dice_per_image(segmenter(x_cf), truth_masks)
        d_true = dice_per_image(segmenter(truth), truth_masks)
        m["dice_model_cf"] = float(100 * d_model.mean())
        m["dice_true_cf"] = float(100 * d_true.mean())
        m["dice_gap_points"] = m["dice_true_cf"] - m["dice_model_cf"]
        if direction == "add" and match.any():
            # the drawn fluid is not the truth's draw, so the gold masks of the true
            # counterfactuals fit the model's image only where it drew the same side
            m["dice_gap_points_side_matched"] = float(100 * (d_true[match].mean()
                                                             - d_model[match].mean()))
    return m


def acceptance(report: dict) -> dict[str, dict]:
    """Each acceptance target of the effusion and scanner counterfactuals: value, target,
    met (None when the value is missing)."""
    def check(value, target, higher: bool) -> dict:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return {"value": None, "target": target, "met": None}
        return {"value": value, "target": target,
                "met": bool(value >= target if higher else value <= target)}

    out: dict[str, dict] = {}
    for direction in ("remove", "add"):
        m = report.get(f"effusion_{direction}")
        if m is None:
            continue
        for key, target in EFFUSION_TARGETS[direction].items():
            higher = key not in ("side_share_max_deviation_points", "dice_gap_points")
            out[f"effusion_{direction}.{key}"] = check(m.get(key), target, higher)
    sc = report["interventions"].get("scanner", {})
    t = EFFUSION_TARGETS["scanner"]
    out["scanner.mae_reduction_vs_identity"] = check(sc.get("mae_reduction_vs_identity"),
                                                     t["mae_reduction_vs_identity"], True)
    out["scanner.judge_effectiveness"] = check(sc.get("judge_effectiveness", {}).get("scanner"),
                                               t["judge_effectiveness"], True)
    out["scanner.reversibility_mae"] = check(sc.get("reversibility_mae"), t["reversibility_mae"],
                                             False)
    out["composition_mae"] = check(report.get("composition_mae"), t["composition_mae"], False)
    return out


def _check_targets(report: dict) -> dict[str, bool]:
    checks = {"composition": report["composition_mae"] <= TARGETS["composition_mae"]}
    for kind, m in report["interventions"].items():
        checks[f"reversibility_{kind}"] = m["reversibility_mae"] <= TARGETS["reversibility_mae"]
        if "mae_reduction_vs_identity" in m:
            checks[f"truth_{kind}"] = m["mae_reduction_vs_identity"] >= TARGETS["mae_reduction_vs_identity"]
        for name, acc in m.get("effectiveness", {}).items():
            checks[f"effectiveness_{kind}_{name}"] = acc >= TARGETS["effectiveness"]
    return checks


def _draw_panels(axes_row, panels: list, titles: list[str] | None) -> None:
    """One figure row: three grey images (factual, model CF, true CF), then two signed
    differences in a diverging map (+-0.3)."""
    for c, img in enumerate(panels):
        ax = axes_row[c]
        if c < 3:
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        else:
            ax.imshow(img, cmap="RdBu_r", vmin=-0.3, vmax=0.3)
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None:
            ax.set_title(titles[c], fontsize=8)


def counterfactual_figure(path, x: np.ndarray, true_cf: np.ndarray | None, examples: dict,
                          parents: np.ndarray, title: str = "") -> None:
    """Grid per example image and intervention: factual, model CF, true CF, model difference,
    true difference (difference range +-0.3, red = brighter)."""
    plt = pyplot()

    n = len(next(iter(examples.values())))
    cols = ["factual", "model CF", "true CF", "model CF - factual", "true CF - factual"]
    rows = [(i, k, kind) for i in range(n) for k, kind in enumerate(VIEW_KINDS)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.1 * len(rows)))
    for r_i, (i, k, kind) in enumerate(rows):
        model_cf = examples[kind][i, 0]
        truth = true_cf[i, k, 0] if true_cf is not None else np.full_like(model_cf, np.nan)
        panels = [x[i, 0], model_cf, truth, model_cf - x[i, 0], truth - x[i, 0]]
        _draw_panels(axes[r_i], panels, cols if r_i == 0 else None)
        pa = parents[i]
        axes[r_i, 0].set_ylabel(f"img {i} do({kind})\nscanner={int(pa[0])} eff={int(pa[2])}",
                                fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def pick_figure_rows(x: np.ndarray, true_cf: np.ndarray, parents: np.ndarray,
                     n_add: int = 3) -> list[tuple[int, str, str]]:
    """Rows ``(image index, kind, label)`` of :func:`effusion_figure`: effusion removed on
    right, left and bilateral effusions, small and large (fluid-region area); effusion added
    to ``n_add`` normal images; one scanner flip."""
    k = VIEW_KINDS.index("effusion")
    region = fluid_regions(x, true_cf[:, k])
    area = region.reshape(len(x), -1).mean(1)
    side = change_sides(np.abs(true_cf[:, k] - x)[:, 0])
    rows: list[tuple[int, str, str]] = []
    eff = parents[:, 2] > 0.5
    for s in SIDES:
        cand = np.flatnonzero(eff & (side == s))
        if not len(cand):
            continue
        order = cand[np.argsort(area[cand])]
        picks = [order[len(order) // 4], order[-1]] if s == "right" and len(order) > 3 else [
            order[len(order) * 3 // 4]]
        for i in picks:
            rows.append((int(i), "effusion", f"remove ({s}, {100 * area[i]:.0f} % of image)"))
    normal = np.flatnonzero(~eff)
    for i in normal[:n_add]:
        rows.append((int(i), "effusion", f"add (truth: {side[i]})"))
    if len(x):
        rows.append((0, "scanner", "scanner flip"))
    return rows


def effusion_figure(path, x: np.ndarray, true_cf: np.ndarray, examples: dict,
                    parents: np.ndarray, title: str = "", n_add: int = 3) -> None:
    """Counterfactual figure: rows from :func:`pick_figure_rows`; columns factual, model CF,
    true CF, model CF - factual, true CF - factual (difference range +-0.3, red = brighter).
    ``examples[kind]``: every image's model counterfactual (N, 1, S, S)."""
    plt = pyplot()

    rows = pick_figure_rows(x, true_cf, parents, n_add)
    cols = ["factual", "model CF", "true CF", "model CF - factual", "true CF - factual"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.0 * len(cols), 2.0 * len(rows)),
                             squeeze=False)
    for r_i, (i, kind, label) in enumerate(rows):
        k = VIEW_KINDS.index(kind)
        model_cf, truth = examples[kind][i, 0], true_cf[i, k, 0]
        panels = [x[i, 0], model_cf, truth, model_cf - x[i, 0], truth - x[i, 0]]
        _draw_panels(axes[r_i], panels, cols if r_i == 0 else None)
        axes[r_i, 0].set_ylabel(f"img {i}\n{label}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
