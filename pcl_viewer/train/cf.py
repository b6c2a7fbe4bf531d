"""Training of the counterfactual model: attribute classifiers, then the HVAE.

One resumable run folder holds an atomic checkpoint (weights, optimiser, EMA,
torch and numpy RNG states); a run killed at any point and restarted with the
same arguments ends with the same weights as an uninterrupted one, because
batches and noise come only from the saved generators.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pcl_viewer.device import resolve_device
from pcl_viewer.models.bundle import ModelBundle, save_bundle
from pcl_viewer.models.classifiers import (
    AttributeClassifiers,
    ClassifierConfig,
    balanced_accuracy,
    expected_calibration_error,
    fit_temperature,
)
from pcl_viewer.models.hvae import HVAE, HVAEConfig
from pcl_viewer.parents import PARENT_VALUES
from pcl_viewer.presets import check_preset
from pcl_viewer.train.checkpoint import load_checkpoint, save_checkpoint
from pcl_viewer.train.schedule import lr_factor

STAGES = ("classifier", "hvae", "done")
# Parameters of the effusion path (noise encoder, fluid head, coarse effusion stages, tone
# re-mapping): their own learning-rate multiplier (--fluid-lr-scale).
_FLUID_PARAMS = ("fluid_head", "enc_fluid", "fluid_coarse", "fluid_remap")

#: Run length and batch of each preset (:meth:`CFTrainConfig.for_preset`); the rest of
#: :class:`CFTrainConfig` is the same for every preset.
PRESET_DEFAULTS: dict[str, dict[str, int]] = {
    "smoke": {"steps": 200, "cls_steps": 100, "batch_size": 16, "checkpoint_every": 50},
    "cpu": {"steps": 1000, "cls_steps": 300, "batch_size": 32, "checkpoint_every": 100},
    "paper": {"steps": 200_000, "cls_steps": 5000, "batch_size": 16, "checkpoint_every": 1000},
}


@dataclass
class CFTrainConfig:
    """Optimisation settings of :func:`train_cf` (model configs come from the preset)."""

    preset: str = "cpu"
    seed: int = 0
    steps: int = 1000  # HVAE steps
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    kl_warmup: int = 300  # beta ramps from 10 % to 100 % over these steps
    ema_decay: float = 0.998
    grad_clip: float = 100.0
    # Share of effusion images in each HVAE batch (None: uniform). Effusion is a rare,
    # local change; balancing the batches gives the conditional prior and decoder as
    # many effusion as normal examples without changing the mechanism p(x | pa).
    effusion_fraction: float | None = 0.5
    cls_steps: int = 300
    cls_batch_size: int = 32
    cls_lr: float = 2e-3
    checkpoint_every: int = 100
    hvae_overrides: dict = field(default_factory=dict)
    # Fields of the preset's ClassifierConfig to replace (e.g. a larger judge: input_size,
    # widths).
    cls_overrides: dict = field(default_factory=dict)
    # Counterfactual supervision (0: off): weight of HVAE.cf_pair_loss, the absolute error
    # at the working size between the model counterfactual and the SCM's true one relative
    # to the identity's, on ``cf_pair_batch`` pairs per step (half of the factual images with effusion),
    # interventions drawn as scanner / effusion / both with ``cf_pair_kinds``.
    cf_pair_weight: float = 0.0
    cf_pair_batch: int = 16
    cf_pair_kinds: tuple[float, float, float] = (0.2, 0.6, 0.2)
    # Sampling weight of pairs whose SCM effusion noise is bilateral (removals of bilateral
    # effusions and additions that draw one), relative to one-sided ones; 1: as in the data.
    cf_pair_bilateral: float = 1.0
    # Error of the pair loss: "squared" (the conditional mean) or "absolute" (the median).
    cf_pair_error: str = "squared"
    # Reversibility supervision (0: off): weight of HVAE.cycle_loss on ``cf_cycle_batch``
    # training images per step (half with effusion) whose scanner is flipped and flipped back.
    cf_cycle_weight: float = 0.0
    cf_cycle_batch: int = 8
    # Warm start: a counterfactual bundle whose HVAE and classifier weights initialise the
    # run (new inputs, e.g. the effusion-noise columns, start at zero so the start equals it).
    init_bundle: str = ""
    # Learning-rate multiplier of the effusion-noise encoder and the fluid head (new,
    # randomly initialised parts of a warm-started model).
    fluid_lr_scale: float = 1.0

    @classmethod
    def for_preset(cls, name: str, **overrides: Any) -> CFTrainConfig:
        """The preset's settings (:data:`PRESET_DEFAULTS`) with ``overrides`` applied.

        An override of None keeps the default, so command-line options left unset can be
        passed through as they are. A warm start (``init_bundle``) without an explicit
        ``kl_warmup`` starts at the full KL weight (``kl_warmup=0``): the model is trained.
        """
        given = {k: v for k, v in overrides.items() if v is not None}
        if given.get("init_bundle") and "kl_warmup" not in given:
            given["kl_warmup"] = 0
        return cls(preset=check_preset(name), **{**PRESET_DEFAULTS[name], **given})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingData:
    """Training and validation arrays: images ``(N, 1, S, S)`` float32, parents ``(N, 3)``."""

    x_train: np.ndarray
    pa_train: np.ndarray
    x_val: np.ndarray
    pa_val: np.ndarray
    source: str = ""
    summary: dict = field(default_factory=dict)
    cf_train: np.ndarray | None = None  # (N, 3, 1, S, S) true counterfactuals of x_train
    # (N, 2) the SCM's effusion noise of x_train (side index 0 right / 1 left / 2 bilateral,
    # severity), drawn for every study (also those without effusion); None when the
    # dataset does not carry it (real data).
    fluid_train: np.ndarray | None = None


FLUID_SIDES = ("right", "left", "bilateral")


def effusion_noise(records: list) -> np.ndarray | None:
    """``(N, 2)`` float32 side index and severity of each record's effusion noise, or None
    unless every record carries both (``extra["effusion_side"]`` / ``["effusion_severity"]``)."""
    out = np.zeros((len(records), 2), np.float32)
    for i, r in enumerate(records):
        extra = getattr(r, "extra", None) or {}
        side, severity = extra.get("effusion_side"), extra.get("effusion_severity")
        if side not in FLUID_SIDES or severity is None or not np.isfinite(float(severity)):
            return None
        out[i] = FLUID_SIDES.index(side), float(severity)
    return out


def load_training_data(data_dir: str | Path, size: int) -> TrainingData:
    """Read a dataset (phantom layout) and keep the two model scanners; split by its ``split``
    column (train, and val for calibration / validation; test is left untouched)."""
    from pcl_viewer.data.dataset import load_dataset

    ds = load_dataset(data_dir)
    arr = ds.arrays(size)
    pa = arr["parents"]
    ok = ~np.isnan(pa).any(axis=1)
    split = np.array([r.split for r in ds.records])
    train = ok & (split == "train")
    val = ok & (split == "val")
    if val.sum() < 16:  # tiny or unsplit datasets: hold out every 10th usable image
        idx = np.flatnonzero(ok)
        val = np.zeros_like(ok)
        val[idx[::10]] = True
        train = ok & ~val
    summary_path = Path(data_dir) / "dataset.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cf = arr["true_cf"][train] if "true_cf" in arr else None
    noise = effusion_noise([r for r, keep in zip(ds.records, train) if keep])
    return TrainingData(arr["image"][train], pa[train], arr["image"][val], pa[val],
                        str(data_dir), summary, cf, noise)


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    """The recipe's learning rate: linear warm-up ``base * (step + 1) / warmup``, then cosine
    to 10 % of ``base`` at ``total`` (:func:`~pcl_viewer.train.schedule.lr_factor`)."""
    return base * lr_factor(step, warmup, total, base, start_factor=0.0, warmup_offset=1,
                            min_factor=0.1)


class _Run:
    """Live training state of one run, convertible to and from a checkpoint."""

    def __init__(self, cfg: CFTrainConfig, hvae_cfg: HVAEConfig, cls_cfg: ClassifierConfig,
                 device: str | torch.device | None = "auto"):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.device = resolve_device(device)
        # Built on the CPU (same initial weights on any device), then moved.
        self.cls = AttributeClassifiers(cls_cfg).to(self.device)
        self.hvae = HVAE(hvae_cfg).to(self.device)
        self.ema = HVAE(hvae_cfg).to(self.device)
        self.ema.load_state_dict(self.hvae.state_dict())
        self.ema.requires_grad_(False)
        self.cls_opt = torch.optim.AdamW(self.cls.parameters(), lr=cfg.cls_lr, weight_decay=1e-4)
        fluid = [p for n, p in self.hvae.named_parameters() if n.startswith(_FLUID_PARAMS)]
        rest = [p for n, p in self.hvae.named_parameters()
                if not n.startswith(_FLUID_PARAMS)]
        groups = [{"params": rest, "lr_scale": 1.0}]
        if fluid:
            groups.append({"params": fluid, "lr_scale": cfg.fluid_lr_scale})
        self.hvae_opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
        self.rng = np.random.default_rng(cfg.seed)
        self.stage, self.step = STAGES[0], 0
        self.history: list[dict] = []
        self.skipped = 0
        self.seconds = 0.0
        self.init_info: dict | None = None

    def state(self) -> dict:
        return {"stage": self.stage, "step": self.step, "cls": self.cls.state_dict(),
                "cls_opt": self.cls_opt.state_dict(), "hvae": self.hvae.state_dict(),
                "hvae_opt": self.hvae_opt.state_dict(), "ema": self.ema.state_dict(),
                "torch_rng": torch.get_rng_state(), "np_rng": self.rng.bit_generator.state,
                "history": self.history, "skipped": self.skipped, "seconds": self.seconds,
                # the warm start's bundle and fingerprint, so a resumed run's card names it
                "init_info": self.init_info,
                **({"cuda_rng": torch.cuda.get_rng_state(self.device)}
                   if self.device.type == "cuda" else {})}

    def restore(self, s: dict) -> None:
        self.stage, self.step = s["stage"], int(s["step"])
        self.cls.load_state_dict(s["cls"])
        self.cls_opt.load_state_dict(s["cls_opt"])
        self.hvae.load_state_dict(s["hvae"])
        self.hvae_opt.load_state_dict(s["hvae_opt"])
        self.ema.load_state_dict(s["ema"])
        torch.set_rng_state(s["torch_rng"])
        if self.device.type == "cuda" and "cuda_rng" in s:
            torch.cuda.set_rng_state(s["cuda_rng"], self.device)
        self.rng.bit_generator.state = s["np_rng"]
        self.history, self.skipped = list(s["history"]), int(s["skipped"])
        self.seconds = float(s["seconds"])
        self.init_info = s.get("init_info")  # None in older checkpoints: unknown


def init_from_bundle(run: _Run, path: str | Path) -> dict[str, int]:
    """Load a counterfactual bundle's HVAE (into the model and its EMA) and classifiers.

    Tensors of the same shape are copied; the parent embedding's first layer may have more
    inputs here (the effusion-noise columns), which start at zero, so the warm-started model
    computes exactly what the bundle's did. Parameters the bundle lacks, an effusion-noise
    encoder layer whose shape differs (the first one, when ``fluid_enc`` changes its input),
    and stored codes of another count keep their fresh initialisation. Returns counts of copied, widened and fresh tensors.
    """
    from pcl_viewer.models.bundle import BundleError, find_bundle

    bundle = ModelBundle.load(find_bundle(str(path)))
    src = bundle.state_dict("hvae")
    own = run.hvae.state_dict()
    counts = {"copied": 0, "widened": 0, "fresh": 0}
    for key, value in own.items():
        v = src.get(key)
        if v is None:
            counts["fresh"] += 1
            continue
        if v.shape == value.shape:
            own[key] = v.to(value.dtype)
            counts["copied"] += 1
        elif key == "parent_embed.0.weight" and v.shape[0] == value.shape[0] \
                and v.shape[1] <= value.shape[1]:
            wide = torch.zeros_like(value)
            wide[:, :v.shape[1]] = v
            own[key] = wide
            counts["widened"] += 1
        elif key.startswith("enc_fluid.") or key == "fluid_codes":
            # another u_f encoder input: that layer is trained afresh; another number of
            # stored codes: they are refilled at export anyway
            counts["fresh"] += 1
        else:
            raise BundleError(f"{path}: hvae tensor {key} {tuple(v.shape)} does not fit "
                              f"{tuple(value.shape)}")
    unused = sorted(set(src) - set(own))
    if unused:  # a warm start that silently dropped layers would not compute the bundle
        raise BundleError(f"{path}: this model has no place for the bundle's tensors "
                          f"{', '.join(unused[:6])}{' ...' if len(unused) > 6 else ''}; "
                          "train with the bundle's options (e.g. its --fluid-head)")
    run.hvae.load_state_dict(own)
    run.ema.load_state_dict(own)
    if "classifier" in bundle.components:
        run.cls.load_state_dict(bundle.state_dict("classifier"))
    run.init_info = {"bundle": str(bundle.path), "fingerprint": bundle.fingerprint, **counts}
    return counts


def _classifier_step(run: _Run, data: TrainingData, pos_weight: torch.Tensor) -> float:
    cfg = run.cfg
    idx = run.rng.integers(0, len(data.x_train), cfg.cls_batch_size)
    x = torch.from_numpy(data.x_train[idx]).to(run.device)
    y = torch.from_numpy(data.pa_train[idx]).to(run.device)
    for g in run.cls_opt.param_groups:
        g["lr"] = _lr(run.step, cfg.cls_steps, cfg.cls_lr, 50)
    run.cls.train()
    loss = F.binary_cross_entropy_with_logits(run.cls.raw_logits(x), y, pos_weight=pos_weight)
    run.cls_opt.zero_grad(set_to_none=True)
    loss.backward()
    run.cls_opt.step()
    return float(loss.detach())


def _batch_indices(rng: np.random.Generator, pa: np.ndarray, batch: int,
                   effusion_fraction: float | None,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """``batch`` training indices; a share ``effusion_fraction`` of them with effusion
    (column 2 of ``pa``), when both groups exist. Drawn with replacement; within each group
    uniformly, or in proportion to ``weights`` (N,) when given."""
    def draw(pool: np.ndarray, k: int) -> np.ndarray:
        if weights is None:
            return pool[rng.integers(0, len(pool), k)]
        w = weights[pool]
        return rng.choice(pool, size=k, p=w / w.sum())

    eff = np.flatnonzero(pa[:, 2] > 0.5)
    normal = np.flatnonzero(pa[:, 2] <= 0.5)
    if effusion_fraction is None or len(eff) == 0 or len(normal) == 0:
        return draw(np.arange(len(pa)), batch)
    k = int(round(effusion_fraction * batch))
    return np.concatenate([draw(eff, k), draw(normal, batch - k)])


def _pair_weights(cfg: CFTrainConfig, data: TrainingData) -> np.ndarray | None:
    """(N,) sampling weights of the pairs: ``cf_pair_bilateral`` where the SCM's effusion
    noise is bilateral, 1 elsewhere; None (uniform) when the weight is 1 or the data carry
    no effusion noise."""
    if cfg.cf_pair_bilateral == 1.0 or data.fluid_train is None:
        return None
    bilateral = data.fluid_train[:, 0] == FLUID_SIDES.index("bilateral")
    return np.where(bilateral, cfg.cf_pair_bilateral, 1.0)


def _hvae_step(run: _Run, data: TrainingData) -> dict[str, float]:
    cfg = run.cfg
    idx = _batch_indices(run.rng, data.pa_train, cfg.batch_size, cfg.effusion_fraction)
    x = torch.from_numpy(data.x_train[idx]).to(run.device)
    pa = torch.from_numpy(data.pa_train[idx]).to(run.device)
    for g in run.hvae_opt.param_groups:
        g["lr"] = _lr(run.step, cfg.steps, cfg.lr, cfg.warmup) * g.get("lr_scale", 1.0)
    beta_scale = (min(1.0, 0.1 + 0.9 * run.step / cfg.kl_warmup) if cfg.kl_warmup > 0 else 1.0)
    run.hvae.train()
    out = run.hvae(x, pa, beta=run.hvae.cfg.beta * beta_scale)
    loss = out["loss"]
    if cfg.cf_pair_weight > 0 and data.cf_train is not None:
        out["pair"] = _pair_loss(run, data)
        loss = loss + cfg.cf_pair_weight * out["pair"]
    if cfg.cf_cycle_weight > 0:
        out["cycle"] = _cycle_loss(run, data)
        loss = loss + cfg.cf_cycle_weight * out["cycle"]
    run.hvae_opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(run.hvae.parameters(), cfg.grad_clip)
    if torch.isfinite(norm) and torch.isfinite(out["loss"]):
        run.hvae_opt.step()
    else:  # skip a diverging update instead of corrupting the weights
        run.skipped += 1
    decay = min(cfg.ema_decay, (1 + run.step) / (10 + run.step))
    with torch.no_grad():
        for pe, p in zip(run.ema.parameters(), run.hvae.parameters()):
            pe.lerp_(p, 1 - decay)
    return {k: float(out[k].detach()) for k in ("loss", "nll", "kl", "pair", "cycle") if k in out}


#: Parent flips of the SCM's three counterfactual kinds (order of ``true_cf``).
CF_FLIPS = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1]], np.float32)


def _pair_loss(run: _Run, data: TrainingData) -> torch.Tensor:
    """:meth:`HVAE.cf_pair_loss` on a balanced batch of (image, true counterfactual) pairs."""
    cfg = run.cfg
    idx = _batch_indices(run.rng, data.pa_train, cfg.cf_pair_batch, 0.5, _pair_weights(cfg, data))
    p = np.asarray(cfg.cf_pair_kinds, np.float64)
    kind = run.rng.choice(3, size=len(idx), p=p / p.sum())
    x = torch.from_numpy(data.x_train[idx]).to(run.device)
    pa = torch.from_numpy(data.pa_train[idx]).to(run.device)
    x_true = torch.from_numpy(data.cf_train[idx, kind]).to(run.device)
    pa_true = (pa + torch.from_numpy(CF_FLIPS[kind]).to(run.device)) % 2
    labels = (torch.from_numpy(data.fluid_train[idx]).to(run.device)
              if data.fluid_train is not None else None)
    return run.hvae.cf_pair_loss(x, pa, x_true, pa_true, labels, error=cfg.cf_pair_error)


def _cycle_loss(run: _Run, data: TrainingData) -> torch.Tensor:
    """:meth:`HVAE.cycle_loss` of do(scanner) and back on a balanced batch of images."""
    cfg = run.cfg
    idx = _batch_indices(run.rng, data.pa_train, cfg.cf_cycle_batch, 0.5)
    x = torch.from_numpy(data.x_train[idx]).to(run.device)
    pa = torch.from_numpy(data.pa_train[idx]).to(run.device)
    pa_cf = (pa + torch.from_numpy(CF_FLIPS[0]).to(run.device)) % 2
    return run.hvae.cycle_loss(x, pa, pa_cf)


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def validate_hvae(model: HVAE, x: np.ndarray, pa: np.ndarray, n: int = 64) -> dict[str, float]:
    """Negative ELBO terms (nats per pixel) and reconstruction MAE of the mean on ``n`` images."""
    model.eval()
    dev = _device_of(model)
    xt, pt = torch.from_numpy(x[:n]).to(dev), torch.from_numpy(pa[:n]).to(dev)
    # validation must not move the training noise stream (CPU and, if used, CUDA)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(1234)
        out = model(xt, pt)
    mu = model.abduct(xt, pt)["mu"]
    return {"val_nll": float(out["nll"]), "val_kl": float(out["kl"]),
            "val_recon_mae": float((mu - xt).abs().mean())}


@torch.no_grad()
def calibrate_classifiers(cls: AttributeClassifiers, x: np.ndarray, pa: np.ndarray
                          ) -> dict[str, dict[str, float]]:
    """Fit one temperature per attribute on validation images; return accuracy and ECE."""
    cls.eval()
    dev = _device_of(cls)
    logits = torch.cat([cls.raw_logits(torch.from_numpy(x[i:i + 256]).to(dev)).cpu()
                        for i in range(0, len(x), 256)])
    labels = torch.from_numpy(pa)
    metrics: dict[str, dict[str, float]] = {}
    temps = []
    for k, name in enumerate(cls.cfg.attributes):
        with torch.enable_grad():
            t = fit_temperature(logits[:, k], labels[:, k])
        temps.append(t)
        p_raw = torch.sigmoid(logits[:, k]).numpy()
        p_cal = torch.sigmoid(logits[:, k] / t).numpy()
        y = labels[:, k].numpy()
        metrics[name] = {
            "val_accuracy": float(((p_cal >= 0.5) == (y >= 0.5)).mean()),
            "val_balanced_accuracy": balanced_accuracy(p_cal >= 0.5, y),
            "ece_before": expected_calibration_error(p_raw, y),
            "ece": expected_calibration_error(p_cal, y),
            "temperature": t, "n_val": len(y), "positives": int(y.sum()),
        }
    cls.temperature.copy_(torch.tensor(temps, device=cls.temperature.device))
    return metrics


def train_cf(data: TrainingData, cfg: CFTrainConfig, run_dir: str | Path,
             stop_after: int | None = None, progress: bool = True,
             device: str | torch.device | None = "auto", until_step: int | None = None) -> _Run:
    """Train (or resume) classifiers then the HVAE; returns the finished run state.

    ``device``: where the models train (:func:`pcl_viewer.device.resolve_device`; "auto":
    CUDA, else MPS, else CPU). A checkpoint resumes on any device; tensors are saved on
    the CPU. The CPU and CUDA noise streams are checkpointed, so a resumed run
    on the same device repeats an uninterrupted one.

    ``stop_after`` ends the process-level loop after that many optimisation steps in this
    call (tests use it to simulate a kill; the last checkpoint is at a multiple of
    ``checkpoint_every``). ``until_step`` ends the HVAE stage at that step (checkpointed)
    while the schedules still run over ``cfg.steps``: a run cut short by a time budget can
    be reproduced exactly.
    """
    run_dir = Path(run_dir)
    hvae_cfg = HVAEConfig.for_preset(cfg.preset)
    for key, value in cfg.hvae_overrides.items():
        setattr(hvae_cfg, key, value)
    cls_cfg = ClassifierConfig.for_preset(cfg.preset)
    if cfg.cls_overrides:
        cls_cfg = ClassifierConfig.from_dict({**cls_cfg.to_dict(), **cfg.cls_overrides})
    run = _Run(cfg, hvae_cfg, cls_cfg, device)
    state = load_checkpoint(run_dir / "checkpoint")
    if state is not None:
        run.restore(state)
    elif cfg.init_bundle:
        init_from_bundle(run, cfg.init_bundle)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    pos = data.pa_train.mean(axis=0).clip(1e-3, 1 - 1e-3)
    pos_weight = torch.from_numpy(((1 - pos) / pos).astype(np.float32)).to(run.device)
    done = 0
    for stage, total in (("classifier", cfg.cls_steps), ("hvae", cfg.steps)):
        if STAGES.index(run.stage) > STAGES.index(stage):
            continue
        bar = tqdm(total=total, initial=run.step, desc=f"train-cf {stage}", disable=not progress,
                   mininterval=5.0, dynamic_ncols=True)
        t0 = time.perf_counter()
        while run.step < total:
            if stop_after is not None and done >= stop_after:
                bar.close()
                return run
            if stage == "hvae" and until_step is not None and run.step >= until_step:
                bar.close()
                if run.step % cfg.checkpoint_every:
                    save_checkpoint(run_dir / "checkpoint", run.state())
                return run
            if stage == "classifier":
                stats = {"loss": _classifier_step(run, data, pos_weight)}
            else:
                stats = _hvae_step(run, data)
            run.step += 1
            done += 1
            bar.update(1)
            bar.set_postfix({k: f"{v:.4f}" for k, v in stats.items()}, refresh=False)
            if run.step % cfg.checkpoint_every == 0 or run.step == total:
                run.seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                entry = {"stage": stage, "step": run.step, **stats, "seconds": round(run.seconds, 1)}
                if stage == "hvae":
                    entry.update(validate_hvae(run.ema, data.x_val, data.pa_val))
                run.history.append(entry)
                save_checkpoint(run_dir / "checkpoint", run.state())
                with open(run_dir / "history.jsonl", "a") as fh:
                    fh.write(json.dumps(entry) + "\n")
        bar.close()
        run.stage, run.step = STAGES[STAGES.index(stage) + 1], 0
        save_checkpoint(run_dir / "checkpoint", run.state())
    return run


def _card_common(run: _Run, size: int) -> dict:
    """Card fields every bundle of a counterfactual run shares: preset, parent encodings
    and the input convention at ``size`` px."""
    return {
        "preset": run.cfg.preset,
        "parents": {k: {"values": list(v), "encoding": {v[0]: 0, v[1]: 1}}
                    for k, v in PARENT_VALUES.items()},
        "input": {"size": size, "channels": 1, "intensity": "float32 [0, 1], (B, 1, S, S)"},
    }


def export_bundle(run: _Run, data: TrainingData, out: str | Path, command: str = "",
                  name: str | None = None, finetune: dict | None = None) -> ModelBundle:
    """Fill the stored effusion codes, calibrate the classifiers, validate the EMA HVAE and
    write the bundle."""
    fluid_codes_from = run.ema.fill_fluid_codes(torch.from_numpy(data.x_train),
                                                torch.from_numpy(data.pa_train), seed=run.cfg.seed)
    cls_metrics = calibrate_classifiers(run.cls, data.x_val, data.pa_val)
    hvae_metrics = validate_hvae(run.ema, data.x_val, data.pa_val, n=256)
    out = Path(out)
    card = {
        "name": name or out.name, "version": "1", "kind": "counterfactual",
        "description": "Conditional HVAE (counterfactual image mechanism) and calibrated "
                       "attribute classifiers (scanner, sex, effusion).",
        **_card_common(run, run.hvae.cfg.image_size),
        "counterfactual": {"formula": "x_cf = clip(x + (mu(z, pa*) - mu(z, pa)), 0, 1)",
                           "abduction": "posterior means", "latents": run.hvae.cfg.cf_latents},
        "training": {"command": command, "seed": run.cfg.seed, "data": data.source,
                     "data_summary": data.summary, "n_train": len(data.x_train),
                     "n_val": len(data.x_val), "config": run.cfg.to_dict(),
                     "seconds": round(run.seconds, 1), "skipped_updates": run.skipped,
                     "hvae_steps_done": run.step if run.stage == "hvae" else (
                         run.cfg.steps if run.stage == "done" else 0),
                     "history_tail": run.history[-3:], "cf_finetune": finetune,
                     "init": run.init_info, "fluid_codes_from_images": fluid_codes_from},
        "metrics": {"classifier": cls_metrics, "hvae": hvae_metrics},
    }
    return save_bundle(out, card, {
        "hvae": ("hvae", {"hvae": run.ema.cfg.to_dict()}, run.ema),
        "classifier": ("attribute-classifier", {"classifier": run.cls.cfg.to_dict()}, run.cls),
    })


def export_classifiers(run: _Run, data: TrainingData, out: str | Path, command: str = "",
                       name: str | None = None) -> ModelBundle:
    """Calibrate the classifiers and write a classifier-only bundle (kind
    ``attribute-classifier``): an independent judge for ``pcl eval-cf --judge``."""
    cls_metrics = calibrate_classifiers(run.cls, data.x_val, data.pa_val)
    out = Path(out)
    card = {
        "name": name or out.name, "version": "1", "kind": "attribute-classifier",
        "description": "Calibrated attribute classifiers (scanner, sex, effusion), trained "
                       "apart from any counterfactual model: an independent judge of "
                       "counterfactual effectiveness.",
        **_card_common(run, run.cls.cfg.image_size),
        "training": {"command": command, "seed": run.cfg.seed, "data": data.source,
                     "data_summary": data.summary, "n_train": len(data.x_train),
                     "n_val": len(data.x_val), "classifier_steps": run.cfg.cls_steps,
                     "seconds": round(run.seconds, 1)},
        "metrics": {"classifier": cls_metrics},
    }
    return save_bundle(out, card, {
        "classifier": ("attribute-classifier", {"classifier": run.cls.cfg.to_dict()}, run.cls),
    })


def _is_encoder(name: str) -> bool:
    return name.startswith(("stem", "enc_blocks", "enc_down", "enc_fluid")) or ".posterior." in name


def finetune_cf(run: _Run, data: TrainingData, steps: int, lr: float = 1e-3,
                batch_size: int = 24, margin: float = 0.02, lam_lr: float = 5.0,
                minimality: float = 10.0, max_seconds: float | None = None,
                progress: bool = True) -> dict:
    """Counterfactual fine-tuning (docs/method.md §2) of the EMA HVAE, in place.

    The encoder (stem, bottom-up blocks, posterior heads) is frozen; the decoder is trained
    so that the frozen, calibrated classifiers read the counterfactual parents on
    ``x_cf = x + mu(z, pa*) - mu(z, pa)``: the intervened attributes take their new value
    and the others keep theirs (a do(effusion) must not change the scanner the classifier
    sees). Two constraints keep the change honest:

    - the ELBO stays within ``margin`` of its value before fine-tuning (a Lagrange
      multiplier, dual ascent), so factual reconstructions do not degrade;
    - minimality: ``minimality * mean |x_cf - x|`` on effusion-only interventions.
      Effusion is a local opacity at the lung bases; without this the decoder satisfied
      the classifier with global intensity changes (eval-cf MAE 0.14 vs 0.011 for the
      identity). Scanner interventions are global by nature and are not penalised.

    Returns a summary (steps, losses first/last, multiplier, seconds).
    """
    model, cls = run.ema, run.cls.eval()
    # adding effusion while fine-tuning must draw the codes inference draws (the encoder is
    # frozen below, so they stay valid; export fills them again)
    model.fill_fluid_codes(torch.from_numpy(data.x_train), torch.from_numpy(data.pa_train),
                           seed=run.cfg.seed)
    cls.requires_grad_(False)
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(not _is_encoder(name))
        if p.requires_grad:
            params.append(p)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(run.cfg.seed + 1)
    gen = torch.Generator().manual_seed(run.cfg.seed + 1)
    val = validate_hvae(model, data.x_val, data.pa_val, n=128)
    elbo0 = val["val_nll"] + val["val_kl"] * model.cfg.beta
    bound = elbo0 * (1 + margin)
    lam, t0, hist = 1.0, time.perf_counter(), []
    flips = torch.tensor([[1, 0, 0], [0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    bar = tqdm(total=steps, desc="train-cf cf-finetune", disable=not progress, mininterval=5.0)
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
        idx = _batch_indices(rng, data.pa_train, batch_size, run.cfg.effusion_fraction)
        x = torch.from_numpy(data.x_train[idx]).to(run.device)
        pa = torch.from_numpy(data.pa_train[idx]).to(run.device)
        kind = torch.randint(0, 3, (batch_size,), generator=gen)
        pa_cf = (pa + flips[kind].to(run.device)) % 2
        kind = kind.to(run.device)
        model.eval()
        latents = model.abduct(x, pa)
        model.train()
        residual = model.decode_train(latents, pa_cf) - model.decode_train(latents, pa)
        x_cf = torch.clamp(x + residual, 0, 1)
        loss_cf = F.binary_cross_entropy_with_logits(cls(x_cf), pa_cf)
        local = kind == 1  # effusion-only interventions
        loss_min = ((x_cf - x).abs()[local].mean() if local.any() else x.new_zeros(()))
        elbo = model(x, pa)["loss"]
        total = loss_cf + minimality * loss_min + lam * (elbo - bound)
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, run.cfg.grad_clip)
        opt.step()
        lam = max(0.0, lam + lam_lr * float(elbo.detach() - bound) / max(abs(bound), 1e-6))
        hist.append({"step": step + 1, "loss_cf": float(loss_cf.detach()),
                     "loss_min": float(loss_min.detach()), "elbo": float(elbo.detach()),
                     "lambda": lam})
        bar.update(1)
        bar.set_postfix(loss_cf=f"{hist[-1]['loss_cf']:.3f}", mae=f"{hist[-1]['loss_min']:.4f}",
                        elbo=f"{hist[-1]['elbo']:.3f}", lam=f"{lam:.2f}", refresh=False)
    bar.close()
    model.requires_grad_(False)
    model.eval()

    def mean(key: str, rows: list[dict]) -> float | None:
        return float(np.mean([h[key] for h in rows])) if rows else None

    head, tail = hist[:10], hist[-10:]
    return {"steps": len(hist), "lr": lr, "batch_size": batch_size, "margin": margin,
            "minimality": minimality, "elbo_before": elbo0, "bound": bound,
            "loss_cf_first10": mean("loss_cf", head), "loss_cf_last10": mean("loss_cf", tail),
            "effusion_mae_first10": mean("loss_min", head),
            "effusion_mae_last10": mean("loss_min", tail),
            "elbo_last10": mean("elbo", tail),
            "lambda": lam, "seconds": round(time.perf_counter() - t0, 1)}
