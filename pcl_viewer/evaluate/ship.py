"""The shipped segmentation bundle: one row's initialisation fine-tuned on a gold-labelled
phantom pool, checked on fresh phantom images, written with its model card.

The shipped model is the benchmark's best row fine-tuned on all gold data; the card
carries that row's line of the benchmark table (``benchmark.csv``) when one is given.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from pathlib import Path

from pcl_viewer.evaluate.benchmark import ROW_BY_SLUG, BenchPreset
from pcl_viewer.evaluate.benchmark_inputs import generate_phantom, git_commit, load_arrays
from pcl_viewer.train.checkpoint import remove_checkpoint
from pcl_viewer.train.finetune import FinetuneConfig, finetune, save_segmentation_bundle

# Shipped-model recipe: the fine-tuning of docs/method.md §4 with a milder crop (whole-image use) and
# extra gamma/noise jitter for robustness to unseen acquisition styles (portable).
SHIP_FINETUNE = FinetuneConfig(epochs=12, crop_scale=(0.35, 1.0), gamma=0.35, noise=0.03,
                               loss="dicece")
EVAL_SEED = 9001  # fresh images: no data set of the project uses this seed
LABELS = {"0": "background", "1": "right lung (image left)", "2": "left lung"}


def _echo_results(results: list[dict], echo) -> None:
    """One line per evaluation group of :func:`evaluate_on_phantom` (regime first if set)."""
    for r in results:
        head = f"{r['regime']} {r['styles']}" if "regime" in r else r["styles"]
        echo(f"{head}: Dice {r['dice']:.2f} nf {r['dice_nf']:.2f} pe {r['dice_pe']:.2f} "
             f"HD95 {r['hd95']:.2f} ASD {r['asd']:.2f}")


def ship_segmentation(preset: BenchPreset, out: Path, data_root: Path, init, row: str = "none",
                      n: int = 2000, seed: int = 201, epochs: int | None = None,
                      eval_n: int = 200, command: str = "", echo=print,
                      device: str = "auto", benchmark: dict | None = None,
                      commit: str | None = None) -> Path:
    """Train and write the shipped "segmentation" bundle at ``out``.

    Args:
        init: a :class:`~pcl_viewer.evaluate.benchmark_inputs.RowInitialiser` (row -> bundle).
        row: benchmark row slug whose initialisation is fine-tuned.
        n, seed: size and seed of the gold-labelled training pool (effusion oversampled,
            both training scanners, up to two studies per patient).
        eval_n: fresh images per evaluation group (seed :data:`EVAL_SEED`).
        device: where fine-tuning and prediction run ("auto": cuda, else mps, else cpu;
            :func:`pcl_viewer.train.finetune.finetune`); the bundle holds CPU tensors.
        benchmark: the row's line of ``benchmark.csv`` (Dice % etc. over the folds), kept
            in the card; ``None`` when the grid has not been run.
        commit: the code's commit, taken when the command started (default: now).
    """
    from tqdm import tqdm

    from pcl_viewer.evaluate.phantom_eval import evaluate_on_phantom

    cfg = SHIP_FINETUNE if epochs is None else replace(SHIP_FINETUNE, epochs=epochs)
    size = preset.image_size
    root = generate_phantom(data_root / f"ship-s{seed}-n{n}", n, seed, size,
                            effusion_oversample=6.0, studies_per_patient=2)
    arr = load_arrays(root, size)
    pretrained = init(ROW_BY_SLUG[row])
    bar = tqdm(total=cfg.n_steps(len(arr["image"])), unit="step", desc="ship seg")
    t0 = time.perf_counter()
    model, log = finetune(arr["image"], arr["gold"], preset.unet_config(), cfg,
                          pretrained=pretrained, progress=lambda s, t: bar.update(1),
                          device=device)
    bar.close()
    resumed = (f" (resumed at step {log['resumed_at_step']}; {log['seconds']:.0f} s in all)"
               if "resumed_at_step" in log else "")
    echo(f"trained {log['steps']} steps on {log['device']} in {time.perf_counter() - t0:.0f} s"
         + resumed)
    groups = [["imagingdynamics", "philips"], ["portable"]]
    results = evaluate_on_phantom(model, size, eval_n, EVAL_SEED, groups, device=device)
    results += evaluate_on_phantom(model, size, eval_n // 2, EVAL_SEED + 500,
                                   [["imagingdynamics", "philips"]], severe=True,
                                   effusion_oversample=1000.0, device=device)
    results[-1]["styles"] += " (severe effusion)"
    _echo_results(results, echo)
    card = {
        "name": out.name, "version": "1", "preset": preset.name,
        "description": "Lung segmentation U-Net (0 background, 1 right lung, 2 left lung): "
                       f"the initialisation of the benchmark row {ROW_BY_SLUG[row].name!r} "
                       "fine-tuned on a gold-labelled phantom pool"
                       + ("" if benchmark is None else
                          f" (that row's cross-validated Dice in the {preset.name} benchmark, "
                          "fine-tuned there on each fold's training images with the benchmark "
                          f"recipe: {float(benchmark['dsc']):.2f} %)") + ".",
        "labels": LABELS,
        "training": {"command": command, "seed": cfg.seed, "commit": commit or git_commit(),
                     "data": f"phantom pool n={n} seed={seed} {size}px, effusion oversample 6, "
                             "styles imagingdynamics+philips, <=2 studies/patient, gold masks",
                     "init_row": row, "init_bundle": None if pretrained is None else str(pretrained),
                     "finetune": cfg.to_dict(), "log": log},
        "metrics": {"evaluated_with": f"pcl evaluate --bundle {out} --phantom-n {eval_n} "
                                      f"--seed {EVAL_SEED}",
                    "fresh_phantom": results,
                    "benchmark_row": benchmark,
                    "targets": {"dice": 95.0, "dice_pe_training_scanners": 93.0,
                                "dice_portable": 90.0}},
    }
    save_segmentation_bundle(out, model, card)
    return out


# The shipped model of the realistic phantom: random init, the same recipe with MONAI's
# strong intensity and elastic augmentation, Dice + CE; trained on both training scanners
# (the portable style stays unseen) plus a share of easy-regime images.
SHIP_V2_FINETUNE = replace(SHIP_FINETUNE, epochs=10, augmentation="monai")


def train_shipped_segmenter(out: Path, data_root: Path, size: int = 128, n: int = 2000,
                            seed: int = 201, easy_share: float = 0.2, epochs: int | None = None,
                            eval_n: int = 200, command: str = "", echo=print,
                            device: str = "auto", commit: str | None = None,
                            progress=None, effusion_oversample: float = 6.0,
                            checkpoint: Path | None = None, average_from: float = 0.0) -> Path:
    """Train and write the shipped "segmentation" bundle on the realistic phantom.

    Args:
        out: bundle folder.
        data_root: where the training pools are generated (cache, reused).
        size: network input size (px).
        n, seed: size and seed of the realistic gold-labelled pool (effusion
            oversampled, both training scanners, up to two studies per patient).
        easy_share: extra easy-regime images, as a share of ``n`` (seed ``seed + 1``).
        epochs: passes over the pool (default: :data:`SHIP_V2_FINETUNE`'s).
        eval_n: fresh images per evaluation group, seed :data:`EVAL_SEED`.
        progress: optional ``progress(step, total)``.
        effusion_oversample: effusion oversampling of the realistic pool (6: about 16 %
            effusion; another value gets its own pool folder).
        checkpoint: folder of the resumable training state (default: one under
            ``data_root`` named after the pool, the easy share and the epochs); a killed
            run started again with the same arguments continues where it stopped. It is
            deleted once the bundle is written, so a rerun trains afresh.
        average_from: share of the steps after which the weights are averaged
            (:attr:`FinetuneConfig.average_from`; 0: off, the last weights).
    """
    import numpy as np

    from pcl_viewer.evaluate.phantom_eval import evaluate_on_phantom
    from pcl_viewer.models.unet import UNetConfig

    cfg = SHIP_V2_FINETUNE if epochs is None else replace(SHIP_V2_FINETUNE, epochs=epochs)
    cfg = replace(cfg, average_from=average_from)
    eo_tag = "" if effusion_oversample == 6.0 else f"-eo{effusion_oversample:g}"
    real = load_arrays(generate_phantom(Path(data_root) / f"ship-real-s{seed}-n{n}{eo_tag}", n,
                                        seed, size, effusion_oversample=effusion_oversample,
                                        studies_per_patient=2, regime="realistic"), size)
    n_easy = int(round(easy_share * n))
    images, masks = real["image"], real["gold"]
    if n_easy:
        easy = load_arrays(generate_phantom(Path(data_root) / f"ship-easy-s{seed + 1}-n{n_easy}",
                                            n_easy, seed + 1, size, effusion_oversample=6.0,
                                            regime="easy"), size)
        images = np.concatenate([images, easy["image"]])
        masks = np.concatenate([masks, easy["gold"]])
    if checkpoint is None:
        checkpoint = Path(data_root) / (f"train-seg-s{seed}-n{n}{eo_tag}-easy{n_easy}"
                                        f"-e{cfg.epochs}-seed{cfg.seed}"
                                        + (f"-avg{average_from:g}" if average_from else ""))
    t0 = time.perf_counter()
    model, log = finetune(images, masks, UNetConfig.for_preset("cpu"), cfg, progress=progress,
                          device=device, checkpoint=checkpoint)
    echo(f"trained {log['steps']} steps on {log['device']} in {time.perf_counter() - t0:.0f} s")
    results = []
    for regime in ("realistic", "easy"):
        for r in evaluate_on_phantom(model, size, eval_n, EVAL_SEED, [["imagingdynamics", "philips"],
                                                                     ["portable"]],
                                     device=device, regime=regime):
            r["regime"] = regime
            results.append(r)
    _echo_results(results, echo)
    card = {
        "name": Path(out).name, "version": "2", "preset": "cpu",
        "description": "Lung segmentation U-Net (0 background, 1 right lung, 2 left lung), "
                       "random init, trained on the realistic phantom (both training scanners) "
                       f"plus {easy_share:.0%} easy-regime images, with MONAI strong augmentation.",
        "labels": LABELS,
        "training": {"command": command, "seed": cfg.seed, "commit": commit or git_commit(),
                     "data": f"realistic phantom pool n={n} seed={seed} + easy n={n_easy} "
                             f"seed={seed + 1}, {size}px, effusion oversample "
                             f"{effusion_oversample:g} (easy pool 6), styles "
                             "imagingdynamics+philips, <=2 studies/patient, gold masks",
                     "finetune": cfg.to_dict(), "log": log},
        "metrics": {"evaluated_with": f"pcl evaluate --bundle {out} --phantom-n {eval_n} "
                                      f"--seed {EVAL_SEED} [--regime easy]",
                    "fresh_phantom": results,
                    "targets": {"dice": 93.9, "dice_pe": 92.4, "dice_portable": 90.0,
                                "dice_easy": 97.0}},
    }
    save_segmentation_bundle(out, model, card)
    remove_checkpoint(Path(checkpoint) / "last")  # what finetune wrote, then the folder if empty
    with contextlib.suppress(OSError):
        Path(checkpoint).rmdir()
    return Path(out)
