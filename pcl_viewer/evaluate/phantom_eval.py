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
    """``(H, W)`` float32 [0, 1] scan of any size -> ``(H, W)`` uint8 labels at native size
    (:func:`pcl_viewer.segmentation.segment_batch`, the pipeline's own segmentation)."""
    from pcl_viewer.segmentation import segment_batch

    return segment_batch(model, [image], size).labels[0]


def summary(pred: np.ndarray, gold: np.ndarray, effusion: np.ndarray) -> dict:
    """Dice (%) overall / nf / pe and HD95, ASD (px) of predicted vs gold label maps.

    Args:
        pred, gold: ``(N, H, W)`` uint8 label maps (0 background, 1 right, 2 left lung).
        effusion: ``(N,)`` bool, the effusion subgroup.
    """
    from pcl_viewer.evaluate.metrics import segmentation_scores

    return summarise(segmentation_scores(pred, gold), effusion)


def summarise(s, effusion: np.ndarray) -> dict:
    """The :func:`summary` dict of per-image :class:`~pcl_viewer.evaluate.metrics.SegmentationScores`
    (an empty subgroup gives NaN)."""
    eff = np.asarray(effusion, dtype=bool)
    m, nf, pe = s.mean(), s.mean(~eff), s.mean(eff)
    return {"n": len(eff), "n_nf": int((~eff).sum()), "n_pe": int(eff.sum()),
            "dice": 100 * m["dice"], "dice_nf": 100 * nf["dice"],
            "dice_pe": 100 * pe["dice"], "hd95": m["hd95"], "asd": m["asd"]}


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")


def _folder_pairs(images: Path, masks: Path) -> list[tuple[Path, Path]]:
    """(scan, mask) pairs: every scan in ``images`` with a mask PNG of the same stem."""
    pairs = []
    for f in sorted(Path(images).iterdir()):
        name = f.name.lower()
        if not f.is_file() or not name.endswith(IMAGE_SUFFIXES):
            continue
        stem = f.name[: -len(".nii.gz")] if name.endswith(".nii.gz") else f.stem
        m = Path(masks) / f"{stem}.png"
        if m.is_file():
            pairs.append((f, m))
    return pairs


def read_label_png(path: Path) -> np.ndarray:
    """``(H, W)`` uint8 label map 0/1/2 from a PNG (values outside {0, 1, 2} refused)."""
    from PIL import Image

    with Image.open(path, formats=["PNG"]) as im:
        a = np.asarray(im)
    if a.ndim != 2:
        raise ValueError(f"{path.name}: a label PNG must be single-channel, got shape {a.shape}")
    bad = np.setdiff1d(np.unique(a), [0, 1, 2])
    if bad.size:
        raise ValueError(f"{path.name}: labels must be 0, 1, 2; found {bad[:5].tolist()}")
    return a.astype(np.uint8)


def evaluate_folder(model, size: int, images: Path, masks: Path,
                    effusion: dict[str, bool] | None = None) -> tuple[dict, list[dict]]:
    """Dice (%) etc. of ``model`` on a labelled folder, scored at each scan's native size.

    Args:
        images: folder of scans (any format :func:`~pcl_viewer.data.readers.read_scan` reads).
        masks: folder of label PNGs named like the scans (``scan.dcm`` -> ``scan.png``),
            0 background, 1 right lung (image left), 2 left lung.
        effusion: optional scan file name -> effusion flag, for the nf / pe subgroups.

    Returns:
        (the :func:`summary` over all pairs, one dict per scan).
    """
    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.evaluate.metrics import SegmentationScores, segmentation_scores

    pairs = _folder_pairs(images, masks)
    if not pairs:
        raise ValueError(f"no scan in {images} has a mask PNG of the same name in {masks}")
    per, eff, scores = [], [], []
    for scan_path, mask_path in pairs:
        gold = read_label_png(mask_path)
        scan = read_scan(scan_path)
        if scan.image.shape != gold.shape:
            raise ValueError(f"{scan_path.name}: scan {scan.image.shape} and mask {gold.shape} "
                             "differ in size")
        pred = segment_image(scan.image, model, size)  # scored at native size: one by one
        scores.append(segmentation_scores(pred, gold))
        e = bool((effusion or {}).get(scan_path.name, False))
        eff.append(e)
        per.append({"file": scan_path.name, "effusion": int(e),
                    "dice": 100 * float(scores[-1].dice[0]), "hd95": float(scores[-1].hd95[0]),
                    "asd": float(scores[-1].asd[0])})
    all_scores = SegmentationScores(*(np.concatenate([getattr(x, k) for x in scores])
                                      for k in ("dice", "hd95", "asd")))
    return summarise(all_scores, np.array(eff)), per


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


def annotator_ceiling(n: int, seed: int, size: int = 128, effusion_oversample: float = 8.0,
                      styles: tuple[str, ...] = ("imagingdynamics", "philips"),
                      model=None, model_size: int | None = None) -> dict:
    """Dice % of a consensus annotator against the gold masks of fresh realistic studies.

    The gold mask of every phantom study is drawn by a random annotator (where the border
    of fluid-hidden lung is put, and how tightly the outline is drawn, are exogenous
    noise). The consensus mask of the same study (threshold in the middle of its range,
    no margin) is what a model that recovered the true anatomy perfectly would draw; its
    Dice against the gold mask is therefore about the best any deterministic model can
    score on these labels. The studies are drawn from the same SCM with the same effusion
    oversampling as :func:`evaluate_on_phantom`'s sets (one study per patient).

    With a segmentation ``model`` (its input size ``model_size``, default ``size``) it is
    also scored on the same studies against the gold masks (``"model_vs_gold"``) and
    against the consensus masks (``"model_vs_consensus"``, the model's own error without
    the label noise), each a dict like the top level's Dice keys.

    Returns ``{"n", "n_nf", "n_pe", "dice", "dice_nf", "dice_pe"}`` (Dice in %).
    """
    from dataclasses import replace

    from pcl_viewer.data.phantom.scm import Renderer, sample_studies
    from pcl_viewer.evaluate.metrics import dice_scores

    studies = sample_studies(n, seed, studies_per_patient=1, oversample=effusion_oversample,
                             styles=tuple(styles), regime="realistic")
    images, golds, conss, pe = [], [], [], []
    for st in studies:
        image, gold = Renderer(st.noise).render(st.parents, size)
        consensus = replace(st.noise, extra=replace(st.noise.extra, annotator=0.5, margin=0.0))
        _, cons = Renderer(consensus).render(st.parents, size)
        images.append(image)
        golds.append(gold)
        conss.append(cons)
        pe.append(bool(st.parents.effusion))
    e = np.array(pe)
    gold_a, cons_a = np.stack(golds), np.stack(conss)

    def groups(pred: np.ndarray, ref: np.ndarray) -> dict:
        d = 100 * dice_scores(pred, ref, both_empty=1.0, dtype="float64")
        return {"dice": float(d.mean()), "dice_nf": float(d[~e].mean()) if (~e).any() else float("nan"),
                "dice_pe": float(d[e].mean()) if e.any() else float("nan")}

    out = {"n": len(e), "n_nf": int((~e).sum()), "n_pe": int(e.sum()), **groups(cons_a, gold_a)}
    if model is not None:
        from pcl_viewer.segmentation import segment_batch

        pred = segment_batch(model, images, model_size or size).labels
        out["model_vs_gold"] = groups(np.stack(pred), gold_a)
        out["model_vs_consensus"] = groups(np.stack(pred), cons_a)
    return out
