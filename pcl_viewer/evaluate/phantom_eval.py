"""Score a segmentation network on fresh phantom images or on a labelled folder.

Library code behind ``pcl evaluate`` and the shipped model's card
(:mod:`pcl_viewer.evaluate.ship`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

DEFAULT_SEG = "seg-cpu"


def load_segmenter(bundle: str | Path | None):
    """``(model, image size in px, ModelBundle)`` of a "segmentation" bundle.

    ``bundle`` is a folder, a name under ``resources/models`` or None (the shipped
    default). Raises :class:`pcl_viewer.models.bundle.BundleError` for a bad bundle.
    """
    from pcl_viewer.models.bundle import ModelBundle, find_bundle

    info = ModelBundle.load(find_bundle(bundle or DEFAULT_SEG), kind="segmentation")
    model = info.build("unet")
    return model, int(info.card.get("input", {}).get("size", model.cfg.image_size)), info


def segment_image(image: np.ndarray, model, size: int) -> np.ndarray:
    """``(H, W)`` float32 [0, 1] scan of any size -> ``(H, W)`` uint8 labels at native size."""
    import torch

    from pcl_viewer.data.preprocess import to_model

    small, geometry = to_model(image, size)
    with torch.no_grad():
        labels = model(torch.from_numpy(small)[None, None]).argmax(1)[0].to(torch.uint8).numpy()
    return geometry.to_native(labels, nearest=True)


def summary(pred: np.ndarray, gold: np.ndarray, effusion: np.ndarray) -> dict:
    """Dice (%) overall / nf / pe and HD95, ASD (px) of predicted vs gold label maps.

    Args:
        pred, gold: ``(N, H, W)`` uint8 label maps (0 background, 1 right, 2 left lung).
        effusion: ``(N,)`` bool, the effusion subgroup.
    """
    from pcl_viewer.evaluate.metrics import segmentation_scores

    s = segmentation_scores(pred, gold)
    eff = np.asarray(effusion, dtype=bool)
    m = s.mean()
    nf = s.mean(~eff) if (~eff).any() else {"dice": float("nan")}
    pe = s.mean(eff) if eff.any() else {"dice": float("nan")}
    return {"n": len(eff), "n_nf": int((~eff).sum()), "n_pe": int(eff.sum()),
            "dice": 100 * m["dice"], "dice_nf": 100 * nf["dice"],
            "dice_pe": 100 * pe["dice"], "hd95": m["hd95"], "asd": m["asd"]}


def summary_line(r: dict) -> str:
    """The one-line summary ``pcl evaluate`` prints for a result of :func:`summary`."""
    return (f"Dice % overall {r['dice']:.2f} (n={r['n']})  "
            f"nf {r['dice_nf']:.2f} (n={r['n_nf']})  pe {r['dice_pe']:.2f} (n={r['n_pe']})"
            f"  HD95 {r['hd95']:.2f} px  ASD {r['asd']:.2f} px")


def evaluate_on_phantom(model, size: int, n: int, seed: int, groups: list[list[str]],
                        effusion_oversample: float = 8.0, severe: bool = False,
                        device: str = "auto", regime: str | None = None) -> list[dict]:
    """Dice (%) overall/nf/pe, HD95 and ASD (px) of ``model`` on fresh phantom images.

    One set of ``n`` images per style group, seed ``seed + 1000 * group index``; the
    network runs on ``device`` (:func:`pcl_viewer.train.finetune.predict`), the metrics
    on the CPU. ``regime`` is the phantom regime (None: the default one).
    """
    from pcl_viewer.evaluate.benchmark_inputs import generate_phantom, load_arrays
    from pcl_viewer.train.finetune import predict

    out = []
    kw = {} if regime is None else {"regime": regime}
    with tempfile.TemporaryDirectory(prefix="pcl-eval-") as tmp:
        for k, group in enumerate(groups):
            root = Path(tmp) / f"set{k}"
            generate_phantom(root, n=n, seed=seed + 1000 * k, size=size, styles=group,
                             effusion_oversample=effusion_oversample, severe=severe, **kw)
            arr = load_arrays(root, size)
            r = summary(predict(model, arr["image"], device=device), arr["gold"],
                        arr["effusion"])
            out.append({"styles": "+".join(group), "seed": seed + 1000 * k, **r})
    return out
