"""``pcl train-cf``, ``pcl eval-cf``, ``pcl cf``, ``pcl precompute-cf``: the counterfactual model."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

from pcl_viewer.atomic import atomic_write_text
from pcl_viewer.device import DEVICES
from pcl_viewer.presets import PRESETS


def _threads(n: int | None) -> None:
    """``--threads``: torch's intra-op threads when given (else torch's default)."""
    if n:
        from pcl_viewer.device import configure_threads

        configure_threads(n)


@click.command("train-cf")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Training dataset (phantom layout).")
@click.option("--preset", type=click.Choice(PRESETS), default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Bundle folder.")
@click.option("--steps", type=int, default=None, help="HVAE steps (default: the preset's).")
@click.option("--classifier-steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--run", "run_dir", type=click.Path(path_type=Path), default=None,
              help="Checkpoint folder (default: BUNDLE.run next to the bundle). Rerun to resume.")
@click.option("--checkpoint-every", type=int, default=None)
@click.option("--threads", type=int, default=None, help="torch threads.")
@click.option("--export-only", is_flag=True,
              help="Write the bundle from the latest checkpoint without training further.")
@click.option("--cf-finetune", is_flag=True,
              help="Then fine-tune the decoder so the classifiers recognise the interventions "
                   "(ELBO kept within 2 % by a Lagrange multiplier).")
@click.option("--device", default="auto", show_default=True,
              type=click.Choice(DEVICES),
              help="Where to train (auto: CUDA, else MPS, else CPU).")
@click.option("--finetune-steps", type=int, default=200, show_default=True)
@click.option("--finetune-minimality", type=float, default=10.0, show_default=True,
              help="Weight of mean |x_cf - x| on effusion-only interventions while fine-tuning.")
@click.option("--finetune-minutes", type=float, default=None,
              help="Stop the fine-tuning after this many minutes (not reproducible).")
@click.option("--fluid-dim", type=int, default=0, show_default=True,
              help="Dimensions of the global effusion-noise latent (side and severity of the "
                   "fluid; enters the decoder as effusion * u_f). 0: none.")
@click.option("--fluid-mode", type=click.Choice(["embed", "head"]), default="embed",
              show_default=True,
              help="embed: u_f joins the parent embedding; head: effusion acts only through a "
                   "parent-gated fluid head on the decoder's last features.")
@click.option("--fluid-free-bits", type=click.FloatRange(0.0, 100.0), default=0.0,
              show_default=True,
              help="Free bits (nats per dimension) of the effusion noise's KL in the pair loss; "
                   "keeps the codes from collapsing onto the prior.")
@click.option("--fluid-bank", type=click.IntRange(0, 4096), default=0, show_default=True,
              help="Store this many posterior codes of training effusions in the bundle; "
                   "adding effusion draws one of them instead of a N(0, I) sample. 0: N(0, I).")
@click.option("--fluid-enc", type=click.Choice(["pooled", "spatial"]), default="pooled",
              show_default=True,
              help="Input of the effusion-noise encoder: the coarsest encoder activation pooled "
                   "over space, or the whole map (keeps the side of the fluid).")
@click.option("--fluid-aux", type=click.FloatRange(0.0, 1000.0), default=0.0, show_default=True,
              help="Weight of reading the phantom's effusion side and severity from the "
                   "effusion noise (where the dataset carries them; real data do not).")
@click.option("--fluid-coords", is_flag=True,
              help="Give the fluid head the pixel coordinates, so the effusion noise can choose "
                   "a side.")
@click.option("--fluid-head", type=click.Choice(["local", "multiscale"]), default="local",
              show_default=True,
              help="Fluid head: two local convolutions on the decoder features, or one that "
                   "also reads the image and works at 1/2 and 1/4 of the working size.")
@click.option("--fluid-coarse", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Let effusion also change the decoder's features at every resolution up to "
                   "this many working pixels (e.g. 16), for changes around the fluid such as a "
                   "scanner's local contrast equalisation; 0: the fluid head only.")
@click.option("--fluid-remap", type=click.IntRange(0, 1024), default=0, show_default=True,
              help="Let effusion also re-map the tones around the fluid: a curve of each "
                   "pixel's brightness per cell of this many cells per side (e.g. 8), as a "
                   "local contrast equalisation re-maps a tile that holds fluid; 0: off.")
@click.option("--cf-pair-weight", type=float, default=0.0, show_default=True,
              help="Weight of counterfactual supervision: error of the model counterfactual "
                   "against the dataset's true one, relative to the identity's (needs --counterfactuals data).")
@click.option("--cf-pair-batch", type=int, default=16, show_default=True)
@click.option("--cf-pair-bilateral", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
              show_default=True,
              help="Sampling weight of pairs whose effusion noise is bilateral, relative to "
                   "one-sided ones (1: as in the data).")
@click.option("--cf-pair-error", type=click.Choice(["squared", "absolute"]), default="squared",
              show_default=True,
              help="Error of the pair loss (relative to the identity's): squared or absolute.")
@click.option("--cf-cycle-weight", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Weight of reversibility supervision: do(scanner) and back must return the "
                   "image (relative to the size of the change; 0: off).")
@click.option("--cf-cycle-batch", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--init", "init_bundle", default=None,
              help="Warm start from this counterfactual bundle's HVAE and classifiers "
                   "(effusion-noise inputs added at zero).")
@click.option("--lr", type=float, default=None, help="HVAE learning rate (default 2e-3).")
@click.option("--kl-warmup", type=int, default=None,
              help="Steps over which the KL weight ramps up (default 300; 0 with --init).")
@click.option("--fluid-lr-scale", type=float, default=1.0, show_default=True,
              help="Learning-rate multiplier of the effusion-noise encoder and fluid head.")
@click.option("--until-step", type=int, default=None,
              help="Stop the HVAE stage at this step (schedules still span --steps) and "
                   "write the bundle from there; rerun with a larger value to continue.")
@click.option("--classifier-input-size", type=click.IntRange(16, 1024), default=None,
              help="Resize the classifiers' input to this many pixels (default: the preset's).")
@click.option("--classifier-widths", default=None,
              help="Comma-separated channel widths of the classifiers (default: the preset's).")
@click.option("--classifiers-only", is_flag=True,
              help="Train only the attribute classifiers and write a classifier-only bundle "
                   "(an independent judge for eval-cf).")
def train_cf(data_dir: Path, preset: str, out: Path, steps: int | None,
             classifier_steps: int | None, batch_size: int | None, seed: int,
             run_dir: Path | None, checkpoint_every: int | None, threads: int | None,
             export_only: bool, cf_finetune: bool, finetune_steps: int,
             finetune_minimality: float, finetune_minutes: float | None, device: str,
             fluid_dim: int, fluid_mode: str, fluid_free_bits: float, fluid_bank: int,
             fluid_enc: str, fluid_aux: float, fluid_coords: bool, fluid_head: str,
             fluid_coarse: int, fluid_remap: int, cf_pair_weight: float, cf_pair_batch: int,
             cf_pair_bilateral: float, cf_pair_error: str, cf_cycle_weight: float, cf_cycle_batch: int,
             init_bundle: str | None, lr: float | None, kl_warmup: int | None,
             fluid_lr_scale: float, until_step: int | None, classifier_input_size: int | None,
             classifier_widths: str | None, classifiers_only: bool) -> None:
    """Train the attribute classifiers and the conditional HVAE; write a model bundle."""
    _threads(threads)
    from pcl_viewer.device import choose_device

    device = choose_device(device)
    from pcl_viewer.models.hvae import HVAEConfig
    from pcl_viewer.train.cf import (
        CFTrainConfig,
        export_bundle,
        export_classifiers,
        finetune_cf,
        load_training_data,
        train_cf,
    )

    if not fluid_dim or fluid_mode != "head":  # options of the fluid head's effusion path
        for used, what, hint in ((fluid_head != "local", "a multiscale fluid head needs", "--fluid-head"),
                                 (fluid_coarse, "coarse effusion stages need", "--fluid-coarse"),
                                 (fluid_remap, "a tone re-mapping needs", "--fluid-remap")):
            if used:
                raise click.BadParameter(f"{what} --fluid-dim > 0 and --fluid-mode head",
                                         param_hint=hint)
    cfg = CFTrainConfig.for_preset(
        preset, seed=seed, steps=0 if classifiers_only else steps, batch_size=batch_size or None,
        cls_steps=classifier_steps, checkpoint_every=checkpoint_every or None,
        cf_pair_weight=cf_pair_weight, cf_pair_batch=cf_pair_batch,
        cf_pair_bilateral=cf_pair_bilateral, cf_pair_error=cf_pair_error, cf_cycle_weight=cf_cycle_weight,
        cf_cycle_batch=cf_cycle_batch,
        hvae_overrides={"fluid_dim": fluid_dim, "fluid_mode": fluid_mode,
                        "fluid_free_bits": fluid_free_bits, "fluid_bank": fluid_bank,
                        "fluid_enc": fluid_enc, "fluid_aux": fluid_aux,
                        "fluid_coords": fluid_coords, "fluid_head": fluid_head,
                        "fluid_coarse": fluid_coarse, "fluid_remap": fluid_remap}
        if fluid_dim else None,
        init_bundle=init_bundle, fluid_lr_scale=fluid_lr_scale, lr=lr, kl_warmup=kl_warmup,
        cls_overrides=_classifier_overrides(classifier_input_size, classifier_widths))
    run_dir = run_dir or out.with_name(out.name + ".run")
    data = load_training_data(data_dir, HVAEConfig.for_preset(preset).image_size)
    if cf_pair_weight > 0 and data.cf_train is None:
        raise click.BadParameter(f"{data_dir} has no true counterfactuals",
                                 param_hint="--cf-pair-weight")
    click.echo(f"train-cf: {len(data.x_train)} train / {len(data.x_val)} val images from "
               f"{data_dir}; run folder {run_dir}; device {device}", err=True)
    run = train_cf(data, cfg, run_dir, stop_after=0 if export_only else None, device=device,
                   until_step=until_step)
    command = "pcl train-cf " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    if classifiers_only:
        bundle = export_classifiers(run, data, out, command=command)
        click.echo(json.dumps(bundle.card["metrics"], indent=1))
        click.echo(f"wrote {out} (fingerprint {bundle.fingerprint})")
        return
    finetune = None
    if cf_finetune:
        finetune = finetune_cf(run, data, finetune_steps, minimality=finetune_minimality,
                               max_seconds=None if finetune_minutes is None else 60 * finetune_minutes)
        click.echo(f"cf-finetune: {json.dumps(finetune)}", err=True)
    bundle = export_bundle(run, data, out, command=command, finetune=finetune)
    click.echo(json.dumps(bundle.card["metrics"], indent=1))
    click.echo(f"wrote {out} (fingerprint {bundle.fingerprint})")


def _classifier_overrides(input_size: int | None, widths: str | None) -> dict | None:
    """ClassifierConfig fields from the command line (None: the preset's)."""
    out: dict = {}
    if input_size is not None:  # range-checked by its option
        out["input_size"] = input_size
    if widths:
        try:
            w = [int(v) for v in widths.split(",")]
        except ValueError as exc:
            raise click.BadParameter("comma-separated integers, e.g. 16,32,64",
                                     param_hint="--classifier-widths") from exc
        if not 1 <= len(w) <= 8 or not all(1 <= v <= 512 for v in w):
            raise click.BadParameter("1-8 widths of 1-512 channels", param_hint="--classifier-widths")
        out["widths"] = w
    return out or None


@click.command("eval-cf")
@click.option("--bundle", "bundle_path", default="cf-cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Held-out phantom dataset with true counterfactuals.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="JSON report.")
@click.option("--n", "limit", type=int, default=None, help="Use only the first N images.")
@click.option("--figure", type=click.Path(path_type=Path), default=None,
              help="Also write the figure: do(effusion) added and removed on several sides "
                   "and severities and do(scanner), model beside truth.")
@click.option("--write-card", is_flag=True, help="Store the results in the bundle's card.")
@click.option("--judge", "judge_path", default="judge-cpu", show_default=True,
              help="A bundle of independent attribute classifiers (other seed and images) "
                   "that also judges effectiveness; 'none' to skip.")
@click.option("--segmenter", "seg_path", default="seg-cpu", show_default=True,
              help="Segmentation bundle scored on model vs true effusion counterfactuals "
                   "(Dice against the true counterfactual's gold mask); 'none' to skip.")
@click.option("--threads", type=int, default=None)
def eval_cf(bundle_path: str, data_dir: Path, out: Path, limit: int | None, figure: Path | None,
            write_card: bool, judge_path: str, seg_path: str, threads: int | None) -> None:
    """Counterfactual quality against the phantom's true counterfactuals."""
    _threads(threads)
    import numpy as np

    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.evaluate.cf_quality import effusion_figure, evaluate_counterfactuals
    from pcl_viewer.models.bundle import BundleError, ModelBundle, find_bundle
    from pcl_viewer.models.counterfactual import CounterfactualModel

    model = CounterfactualModel.from_bundle(bundle_path)
    ds = load_dataset(data_dir)
    arr = ds.arrays(model.image_size)
    ok = ~np.isnan(arr["parents"]).any(axis=1)
    idx = np.flatnonzero(ok)[:limit]
    x, pa = arr["image"][idx], arr["parents"][idx]
    true_cf = arr["true_cf"][idx] if "true_cf" in arr else None
    t0 = time.perf_counter()
    judge = judge_info = None
    if judge_path and judge_path.lower() != "none":
        try:
            judge_info = ModelBundle.load(find_bundle(judge_path))
        except (BundleError, FileNotFoundError) as exc:
            raise click.BadParameter(str(exc), param_hint="--judge") from exc
        if "classifier" not in judge_info.components:
            raise click.BadParameter(f"{judge_path} has no attribute classifiers",
                                     param_hint="--judge")
        judge = judge_info.build("classifier").eval()
    segmenter = masks = None
    seg_info = None
    if true_cf is not None and seg_path and seg_path.lower() != "none":
        segmenter, seg_info = _segmenter(seg_path, model.image_size)
        masks = _true_cf_masks(ds, idx, "effusion", model.image_size)
    report = evaluate_counterfactuals(model, x, pa, true_cf, judge=judge, segmenter=segmenter,
                                      true_cf_masks=masks, keep_all=figure is not None)
    examples = report.pop("examples", None)
    if judge_info is not None:
        report["judge"] = {"bundle": str(judge_info.path), "fingerprint": judge_info.fingerprint}
    if seg_info is not None:
        report["segmenter"] = {"bundle": str(seg_info.path), "fingerprint": seg_info.fingerprint}
    report.update({"bundle": str(model.bundle.path), "fingerprint": model.bundle.fingerprint,
                   "data": str(data_dir), "seconds": round(time.perf_counter() - t0, 1),
                   "command": "pcl eval-cf " + " ".join(shlex.quote(a) for a in sys.argv[2:])})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    click.echo(json.dumps({k: v for k, v in report.items() if k != "targets"}, indent=1))
    if figure and examples is not None and true_cf is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        effusion_figure(figure, x, true_cf, examples, pa,
                        title=f"{model.bundle.name} ({model.bundle.fingerprint}): held-out "
                              f"phantom {data_dir.name}, model beside truth")
        click.echo(f"wrote {figure}")
    if write_card:
        _write_card_metrics(model.bundle.path, report)


def _segmenter(path: str, size: int):
    """``(callable (B,1,S,S) -> (B,S,S) uint8 labels, ModelBundle)`` of a segmentation bundle."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pcl_viewer.evaluate.phantom_eval import load_segmenter

    net, seg_size, info = load_segmenter(path)
    net.eval()

    @torch.no_grad()
    def segment(images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), 64):
            xb = torch.from_numpy(np.ascontiguousarray(images[i:i + 64], dtype=np.float32))
            if seg_size != size:
                xb = F.interpolate(xb, size=(seg_size, seg_size), mode="area")
            logits = net(xb)
            if seg_size != size:
                logits = F.interpolate(logits, size=(size, size), mode="bilinear")
            out.append(logits.argmax(1).to(torch.uint8).numpy())
        return np.concatenate(out) if out else np.zeros((0, size, size), np.uint8)

    return segment, info


def _true_cf_masks(ds, idx, kind: str, size: int):
    """Gold masks ``(N, S, S)`` uint8 of the true ``kind`` counterfactuals of ``idx``."""
    import cv2
    import numpy as np

    masks = np.zeros((len(idx), size, size), np.uint8)
    for j, i in enumerate(idx):
        cf = ds.true_counterfactual(int(i), kind)
        if cf is None or cf[1] is None:
            raise click.ClickException(f"{ds.root}: no gold mask for the {kind} counterfactual")
        m = cf[1]
        masks[j] = m if m.shape == (size, size) else cv2.resize(
            m, (size, size), interpolation=cv2.INTER_NEAREST)
    return masks


def _write_card_metrics(path: Path, report: dict) -> None:
    """Add eval-cf results to ``card.json`` (weights and their hashes are unchanged)."""
    card_path = Path(path) / "card.json"
    card = json.loads(card_path.read_text())
    card.setdefault("metrics", {})["eval_cf"] = {
        k: v for k, v in report.items() if k not in ("bundle",)}
    atomic_write_text(card_path, json.dumps(card, indent=2) + "\n")


@click.command("cf")
@click.argument("scan", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--do", "do_items", multiple=True, required=True, help="NAME=VALUE, repeatable.")
@click.option("--bundle", "bundle_path", default="cf-cpu", show_default=True)
@click.option("--parents", default=None,
              help="Factual parents 'scanner=philips,sex=male,effusion=absent' (default: inferred); "
                   "naming only some overrides those and infers the others.")
@click.option("--strength", type=float, default=1.0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="PNG of the counterfactual at the scan's native size (16-bit).")
def cf(scan: Path, do_items: tuple[str, ...], bundle_path: str, parents: str | None,
       strength: float, out: Path) -> None:
    """Counterfactual of one scan of any size: abduct at model size, add the upsampled residual."""
    import numpy as np

    from pcl_viewer.data.scan import Scan
    from pcl_viewer.parents import PARENT_NAMES, PARENT_VALUES, Parents, parse_do
    from pcl_viewer.pipeline import Pipeline

    try:
        do = parse_do(list(do_items))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--do") from exc
    image = _read_image(scan)
    given: Parents | dict[str, str] | None = None
    if parents:
        try:
            named = parse_do([p.strip() for p in parents.split(",") if p.strip()])
            given = Parents(**named) if set(named) == set(PARENT_NAMES) else named
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--parents") from exc
    # the CPU, as before the pipeline served this command (a GPU gains nothing on one scan)
    pipe = Pipeline.from_bundles(cf_bundle=bundle_path, seg_bundle=None, device="cpu")
    result = pipe.counterfactual(Scan(image, name=scan.name), do, parents=given,
                                 strength=strength)
    pa, probs = result.parents, result.probabilities
    assert pa is not None
    if isinstance(given, Parents) or probs is None:
        source = "given"
    else:
        source = "inferred " + ", ".join(f"P({n}={PARENT_VALUES[n][1]})={probs[n]:.2f}"
                                         for n in PARENT_NAMES if n in probs)
        if given:
            source += "; given " + ", ".join(f"{k}={v}" for k, v in given.items())
    native = result.views["counterfactual"].image
    out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(np.round(native * 65535).astype(np.uint16)).save(out)
    click.echo(f"parents {pa.to_dict()} ({source}); {scan.name} {image.shape[1]}x{image.shape[0]}"
               f" -> {out} do({', '.join(f'{k}={v}' for k, v in do.items())}) x{strength:g}")


def _read_image(path: Path):
    """``(H, W)`` float32 [0, 1] via the project's reader (a bad file: a usage error)."""
    import numpy as np

    from pcl_viewer.data.readers import read_scan
    from pcl_viewer.data.scan import ScanReadError

    try:
        return read_scan(path).image.astype(np.float32)
    except ScanReadError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command("precompute-cf")
@click.option("--bundle", "bundle_path", default="cf-cpu", show_default=True)
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True)
@click.option("--batch-size", type=int, default=32, show_default=True,
              help="Small batches avoid page-fault churn from large temporaries (4x less sys time).")
@click.option("--threads", type=int, default=None)
def precompute_cf(bundle_path: str, data_dir: Path, batch_size: int, threads: int | None) -> None:
    """Write the three counterfactual views (scanner, effusion, both) of every image to DATA/.cache."""
    _threads(threads)
    from tqdm import tqdm

    from pcl_viewer.data.cf_views import write_views
    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.models.counterfactual import CounterfactualModel

    model = CounterfactualModel.from_bundle(bundle_path)
    ds = load_dataset(data_dir)
    ds.arrays(model.image_size)  # build the image cache outside the timed part
    bar = tqdm(total=len(ds), desc="precompute-cf", unit="img")

    def progress(done: int, total: int, rate: float) -> None:
        bar.n = done
        bar.set_postfix(img_per_s=f"{rate:.0f}")
        bar.refresh()

    path, rate = write_views(ds, model, batch_size, progress)
    bar.close()
    click.echo(f"wrote {len(ds)} x 3 views to {path} at {rate:.0f} images/s "
               f"({model.image_size} px, bundle {model.bundle.fingerprint})")
