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

Over all images: ``composition_mae`` (the null intervention against ``x``; exact by
construction of ``x + mu_cf - mu``) and ``recon_mae`` (``|mu - x|``, what the decoder itself
explains), plus the classifiers' balanced accuracy on the factual images.
"""

from __future__ import annotations

import numpy as np
import torch

from pcl_viewer.models.classifiers import balanced_accuracy
from pcl_viewer.models.counterfactual import STANDARD_DOS, CounterfactualModel, intervene
from pcl_viewer.parents import PARENT_NAMES

KINDS: tuple[str, ...] = tuple(STANDARD_DOS)
TARGETS = {"composition_mae": 0.01, "reversibility_mae": 0.02, "effectiveness": 0.90,
           "mae_reduction_vs_identity": 0.50}


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
                             keep: int = 0, judge=None) -> dict:
    """Quality metrics of ``model`` on images ``x`` (N, 1, S, S) with parents (N, 3).

    ``true_cf`` (N, 3, 1, S, S), order scanner, effusion, both, enables the truth metrics.
    ``keep`` > 0 also returns the first ``keep`` images' views under ``"examples"``.
    ``judge``: an independent :class:`AttributeClassifiers` (``probs(x) -> (B, 3)``) for
    ``judge_effectiveness``.
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
    for k, kind in enumerate(KINDS):
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
    report["targets"] = TARGETS
    report["meets_targets"] = _check_targets(report)
    if keep:
        report["examples"] = {k: r[k][:keep] for k in KINDS}
    return report


def _check_targets(report: dict) -> dict[str, bool]:
    checks = {"composition": report["composition_mae"] <= TARGETS["composition_mae"]}
    for kind, m in report["interventions"].items():
        checks[f"reversibility_{kind}"] = m["reversibility_mae"] <= TARGETS["reversibility_mae"]
        if "mae_reduction_vs_identity" in m:
            checks[f"truth_{kind}"] = m["mae_reduction_vs_identity"] >= TARGETS["mae_reduction_vs_identity"]
        for name, acc in m.get("effectiveness", {}).items():
            checks[f"effectiveness_{kind}_{name}"] = acc >= TARGETS["effectiveness"]
    return checks


def counterfactual_figure(path, x: np.ndarray, true_cf: np.ndarray | None, examples: dict,
                          parents: np.ndarray, title: str = "") -> None:
    """Grid per example image and intervention: factual, model CF, true CF, model difference,
    true difference (difference range +-0.3, red = brighter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(next(iter(examples.values())))
    cols = ["factual", "model CF", "true CF", "model CF - factual", "true CF - factual"]
    rows = [(i, k, kind) for i in range(n) for k, kind in enumerate(KINDS)]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.1 * len(cols), 2.1 * len(rows)))
    for r_i, (i, k, kind) in enumerate(rows):
        model_cf = examples[kind][i, 0]
        truth = true_cf[i, k, 0] if true_cf is not None else np.full_like(model_cf, np.nan)
        panels = [x[i, 0], model_cf, truth, model_cf - x[i, 0], truth - x[i, 0]]
        for c, img in enumerate(panels):
            ax = axes[r_i, c]
            if c < 3:
                ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img, cmap="RdBu_r", vmin=-0.3, vmax=0.3)
            ax.set_xticks([])
            ax.set_yticks([])
            if r_i == 0:
                ax.set_title(cols[c], fontsize=8)
        pa = parents[i]
        axes[r_i, 0].set_ylabel(f"img {i} do({kind})\nscanner={int(pa[0])} eff={int(pa[2])}",
                                fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
