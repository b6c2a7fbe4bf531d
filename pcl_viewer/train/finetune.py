"""Supervised fine-tuning of the whole U-Net with a new 3-class head (docs/method.md §4).

Used three ways by the benchmark and the shipped model:

- fine-tuning a pre-trained (or random) U-Net on the gold labels of a fold;
- the "Segmentation (silver)" / "(gold)" pre-training rows: a U-Net trained
  directly on the pool's silver or gold labels;
- the shipped segmentation bundle.

Recipe: AdamW lr 3e-3, linear warm-up from lr/100 then cosine to 1e-6,
batch 8, gradient clip 1.0, cross-entropy (or Dice+CE), augmentations
rotation +-15 deg, random resized crop scale (0.2, 1), brightness/contrast
jitter, Gaussian blur. Geometric augmentations use one affine per sample,
applied to the image (bilinear) and to the mask (nearest), so labels stay
aligned with pixels.

Devices: :func:`finetune` and :func:`predict` take ``device`` ("auto": cuda, else
mps, else cpu; :func:`pcl_viewer.device.resolve_device`, re-exported here with
:func:`~pcl_viewer.device.default_device`). On CUDA the network runs under bfloat16
autocast (the loss in float32); on the CPU the computation is exactly the one of
the CPU-only code before devices existed (same ops, same random numbers drawn in
the same order from the same CPU generator), so CPU results stay bit-identical.
Random numbers are always drawn on the CPU, so a CUDA run sees the same batches
and augmentation parameters as a CPU run with the same seed. Models come back on
the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pcl_viewer.device import default_device as default_device  # re-exported
from pcl_viewer.device import resolve_device
from pcl_viewer.models.unet import DenseUNet, UNetConfig, build_unet
from pcl_viewer.train.schedule import warmup_cosine


@dataclass
class FinetuneConfig:
    """Hyper-parameters of :func:`finetune`.

    ``epochs`` passes over the labelled images; at least ``min_steps`` optimiser
    steps are taken so tiny label budgets (8 images = 1 batch per epoch) still train.
    """

    epochs: int = 100
    min_steps: int = 0
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_frac: float = 0.05
    final_lr: float = 1e-6
    loss: str = "ce"  # "ce" or "dicece"
    grad_clip: float = 1.0
    augment: bool = True
    rotation_deg: float = 15.0
    crop_scale: tuple[float, float] = (0.2, 1.0)
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: float = 0.0  # extra gamma jitter (log-uniform in [1/(1+g), 1+g]); 0 = off
    jitter_p: float = 0.8
    noise: float = 0.0  # extra additive Gaussian noise, std uniform in [0, noise]; 0 = off
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # "basic": the benchmark's recipe above; "monai": that geometry plus MONAI's strong
    # intensity and elastic transforms (:func:`monai_augment`), for models that must
    # generalise to acquisition styles they never saw
    augmentation: str = "basic"
    # Tail weight averaging (0: off): from this share of the steps on, the weights are
    # averaged uniformly every ``average_every`` steps (and after the last one), the
    # batch-norm statistics are recomputed for the average on the training images, and the
    # average is the model returned (stochastic weight averaging along the schedule's tail,
    # torch.optim.swa_utils; an ensemble of the tail's models in one network).
    average_from: float = 0.0
    average_every: int = 100
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def n_steps(self, n_images: int) -> int:
        steps = max(self.min_steps, self.epochs * math.ceil(n_images / self.batch_size))
        return steps if self.max_steps is None else min(steps, self.max_steps)


def _plain(dev: torch.device) -> bool:
    """True where the exact CPU-only code runs (no transfers, no autocast, no casts)."""
    return dev.type == "cpu"


def _autocast(dev: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA; nothing at all elsewhere (CPU numerics untouched)."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- augmentation ---------------------------------------------------------------------


def _affines(b: int, cfg: FinetuneConfig, g: torch.Generator) -> torch.Tensor:
    """``(B, 2, 3)`` affines (output -> input normalised coords): crop, aspect, rotation."""
    u = torch.rand(b, 5, generator=g)
    lo, hi = cfg.crop_scale
    area = lo + (hi - lo) * u[:, 0]
    log_r = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1]
    ratio = torch.exp(log_r)
    sx = torch.sqrt(area * ratio).clamp(max=1.0)  # half-extent in normalised units (1 = full)
    sy = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (1 - sx) * (2 * u[:, 2] - 1)
    cy = (1 - sy) * (2 * u[:, 3] - 1)
    ang = math.radians(cfg.rotation_deg) * (2 * u[:, 4] - 1)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = sx * cos, -sy * sin, cx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sx * sin, sy * cos, cy
    return theta


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each ``(1, H, W)`` image of ``x (B, 1, H, W)`` with its own ``sigma (B,)`` (pixels)."""
    radius = int(math.ceil(3 * float(sigma.max())))
    if radius < 1:
        return x
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    b = x.shape[0]
    xp = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="replicate")  # (1,B,..)
    y = F.conv2d(xp, k[:, None, None, :], groups=b)
    y = F.conv2d(y, k[:, None, :, None], groups=b)
    return y.transpose(0, 1)


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, cfg: FinetuneConfig, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment images ``x (B, 1, S, S)`` in [0, 1] and labels ``y (B, S, S)`` long, jointly.

    Geometry (rotation, resized crop) is one affine per sample for both; the
    intensity part (jitter, blur) touches the image only. ``x`` and ``y`` may live on
    any device; the random numbers always come from the CPU generator ``g``.

    Returns:
        ``(x (B, 1, S, S) float32, y (B, S, S) long)`` on the device of ``x``.
    """
    b, dev = x.shape[0], x.device
    theta = _affines(b, cfg, g).to(dev)  # .to(cpu) of a cpu tensor is the tensor itself
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    onehot = F.one_hot(y, 3).permute(0, 3, 1, 2).float()
    onehot = F.grid_sample(onehot, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    # Outside the source image every channel is 0 -> argmax gives background (0).
    y = onehot.argmax(1)

    u = torch.rand(b, 5, generator=g).to(dev)
    jit = (u[:, 0] < cfg.jitter_p).float()[:, None, None, None]
    bright = 1 + cfg.brightness * (2 * u[:, 1] - 1)
    contr = 1 + cfg.contrast * (2 * u[:, 2] - 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    xj = (x * bright[:, None, None, None] - mean) * contr[:, None, None, None] + mean
    if cfg.gamma > 0:
        lg = math.log(1 + cfg.gamma) * (2 * u[:, 3] - 1)
        xj = xj.clamp(0, 1) ** torch.exp(lg)[:, None, None, None]
    x = (jit * xj + (1 - jit) * x).clamp(0, 1)
    if cfg.noise > 0:
        std = (cfg.noise * torch.rand(b, 1, 1, 1, generator=g)).to(dev)
        x = (x + std * torch.randn(x.shape, generator=g).to(dev)).clamp(0, 1)
    if cfg.blur_p > 0:
        lo, hi = cfg.blur_sigma
        sigma = (lo + (hi - lo) * torch.rand(b, generator=g)).to(dev)
        sigma = sigma * (x.shape[-1] / 128.0)  # the range is given for 128 px images
        blur = (u[:, 4] < cfg.blur_p).float()[:, None, None, None]
        x = blur * _gaussian_blur(x, sigma) + (1 - blur) * x
    return x.contiguous(), y


def _monai_pipeline(size: int):
    """Per-sample MONAI dictionary transforms on ``{"image": (1,S,S), "label": (1,S,S)}``."""
    from monai.transforms import (
        Compose,
        Rand2DElasticd,
        RandAdjustContrastd,
        RandAffined,
        RandBiasFieldd,
        RandCoarseDropoutd,
        RandGaussianNoised,
        RandGaussianSharpend,
        RandGaussianSmoothd,
        RandHistogramShiftd,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    both = ("image", "label")
    return Compose([
        RandAffined(both, prob=0.7, rotate_range=math.radians(12), scale_range=(0.15, 0.15),
                    translate_range=(0.08 * size, 0.08 * size), shear_range=(0.05, 0.05),
                    mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        Rand2DElasticd(both, spacing=(size // 4, size // 4), magnitude_range=(0.5, 2.0),
                       prob=0.25, mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        RandBiasFieldd("image", coeff_range=(0.05, 0.3), prob=0.3),
        RandHistogramShiftd("image", num_control_points=(4, 10), prob=0.3),
        RandAdjustContrastd("image", gamma=(0.55, 1.7), prob=0.5),
        RandScaleIntensityd("image", factors=0.3, prob=0.4),
        RandShiftIntensityd("image", offsets=0.15, prob=0.4),
        RandGaussianSmoothd("image", sigma_x=(0.4, 1.6), sigma_y=(0.4, 1.6), prob=0.3),
        RandGaussianSharpend("image", prob=0.2),
        RandGaussianNoised("image", std=0.04, prob=0.4),
        RandCoarseDropoutd("image", holes=1, max_holes=6, spatial_size=size // 16,
                           max_spatial_size=size // 6, fill_value=(0.0, 1.0), prob=0.3),
    ])


_MONAI_CACHE: dict[int, object] = {}


def monai_augment(x: torch.Tensor, y: torch.Tensor, g: torch.Generator, groups: int = 2
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Strong augmentation with MONAI transforms, image and label jointly.

    Geometry: affine (rotation, scale, translation, shear) and elastic deformation;
    intensity: bias field, histogram shift, contrast (gamma), scaling and shifting,
    blur and sharpening, Gaussian noise, coarse dropout. It runs after the per-sample
    basic augmentation; each of ``groups`` slices of the batch gets its own draw (the
    batch's images as channels of one call: per-sample calls cost ~8x more on the
    CPU). The transforms' random state is seeded from ``g``, so a run is reproducible.

    Args:
        x: ``(B, 1, S, S)`` float32 in [0, 1].
        y: ``(B, S, S)`` long labels.

    Returns:
        ``(x (B, 1, S, S) float32 in [0, 1], y (B, S, S) long)`` on the input's device.
    """
    dev, size = x.device, x.shape[-1]
    if size not in _MONAI_CACHE:
        _MONAI_CACHE[size] = _monai_pipeline(size)
    pipe = _MONAI_CACHE[size]
    pipe.set_random_state(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    xs, ys = [], []
    for xi, yi in zip(x.cpu().chunk(groups), y.cpu().chunk(groups)):
        d = pipe({"image": xi[:, 0].clone(), "label": yi.float()})
        xs.append(torch.as_tensor(d["image"]).float().clamp(0, 1)[:, None])
        ys.append(torch.as_tensor(d["label"]).round().long())
    return torch.cat(xs).to(dev).contiguous(), torch.cat(ys).to(dev)


# --- model ----------------------------------------------------------------------------


def init_unet(unet_cfg: UNetConfig, pretrained: str | os.PathLike | None = None) -> DenseUNet:
    """A U-Net with a fresh 3-class head: random, or with the backbone of a bundle.

    The bundle (any kind: "pretrained", "segmentation") must hold a ``unet``
    component; only its ``backbone.*`` weights are copied, every head is new.
    Its own U-Net config is used, so a bundle always rebuilds its network.
    """
    if pretrained is None:
        return build_unet(unet_cfg, heads=("seg",))
    from pcl_viewer.models.bundle import ModelBundle

    bundle = ModelBundle.load(pretrained)
    cfg = UNetConfig.from_dict(bundle.config("unet")["unet"])
    model = build_unet(cfg, heads=("seg",))
    state = {k: v for k, v in bundle.state_dict("unet").items() if k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith("backbone.") for k in missing):
        raise ValueError(f"{pretrained}: backbone weights do not fit: {missing[:3]} {unexpected[:3]}")
    return model


def make_scheduler(opt: torch.optim.Optimizer, total: int, cfg: FinetuneConfig):
    """Linear warm-up from lr/100 over ``warmup_frac`` of the steps, then cosine to ``final_lr``.

    Uses the schedule shared with pre-training (:mod:`pcl_viewer.train.schedule`).
    """
    warm = max(1, int(round(cfg.warmup_frac * total)))
    return warmup_cosine(opt, warm, total, start_factor=0.01, min_lr=cfg.final_lr)


def _loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if name == "ce":
        return F.cross_entropy
    if name == "dicece":
        from monai.losses import DiceCELoss

        dc = DiceCELoss(to_onehot_y=True, softmax=True)
        return lambda logits, y: dc(logits, y[:, None])
    raise ValueError(f"unknown loss {name!r}; choose 'ce' or 'dicece'")


def finetune(
    images: np.ndarray,
    masks: np.ndarray,
    unet_cfg: UNetConfig,
    cfg: FinetuneConfig,
    pretrained: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str | torch.device | None = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
) -> tuple[DenseUNet, dict]:
    """Train the whole U-Net with a new segmentation head.

    Args:
        images: ``(N, 1, S, S)`` float32 in [0, 1].
        masks: ``(N, S, S)`` uint8 labels (0, 1 right lung, 2 left lung).
        unet_cfg: network config (ignored when ``pretrained`` gives its own).
        cfg: :class:`FinetuneConfig`.
        pretrained: a bundle folder to initialise the backbone from, or None (random).
        progress: called as ``progress(step, total)`` after every step.
        device: "auto" (cuda, else mps, else cpu; see :func:`resolve_device`), "cuda",
            "mps" or "cpu". The data, model and augmentation run there; on CUDA the
            network is under bfloat16 autocast and the loss is float32. The weights
            are initialised and the random numbers drawn on the CPU, so every device
            starts from the same weights and sees the same batches.
        checkpoint: optional folder for a resumable run: every ``checkpoint_every``
            steps the model, optimiser, scheduler, data order and random states are
            written atomically to its subfolder ``last`` (:mod:`pcl_viewer.train.checkpoint`;
            nothing else in the folder is touched); a later call with the same folder and
            arguments continues from it, and the result equals an uninterrupted run's on
            the CPU. A checkpoint of another configuration, initialisation or data (a hash
            of the images and masks) raises ``ValueError``. The caller deletes the folder
            once the model is saved, or a later call returns the finished run's weights.
        checkpoint_every: optimiser steps between checkpoints (>= 1).

    Returns:
        the model in eval mode **on the CPU** and a log
        ``{"steps", "seconds", "final_loss", "device"}`` (with ``average_from``, also
        ``"averaged_models"``, the number of snapshots in the average).

    Raises:
        ValueError: bad shapes, unknown loss, or an unavailable ``device``.
    """
    if images.ndim != 4 or images.shape[1] != 1 or masks.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"expected images (N,1,S,S) and masks (N,S,S), got {images.shape}, {masks.shape}")
    if not 0.0 <= cfg.average_from < 1.0 or cfg.average_every < 1:
        raise ValueError(f"average_from must lie in [0, 1) and average_every be >= 1, got "
                         f"{cfg.average_from}, {cfg.average_every}")
    dev = resolve_device(device)
    plain = _plain(dev)
    torch.manual_seed(cfg.seed)
    model = init_unet(unet_cfg, pretrained)
    if not plain:
        model.to(dev)
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(images)
    total = cfg.n_steps(n)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = make_scheduler(opt, total, cfg)
    loss_fn = _loss_fn(cfg.loss)
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(dev)
    y_all = torch.from_numpy(np.ascontiguousarray(masks).astype(np.int64)).to(dev)
    bs = min(cfg.batch_size, n)
    order = torch.randperm(n, generator=g)
    avg, avg_start = None, total
    if cfg.average_from > 0:
        from torch.optim.swa_utils import AveragedModel

        avg, avg_start = AveragedModel(model), int(cfg.average_from * total)
    pos, loss_ema, t0, start = 0, float("nan"), time.perf_counter(), 0
    seconds_before = 0.0
    if checkpoint is not None:
        import hashlib

        from pcl_viewer.train.checkpoint import load_checkpoint

        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        digest = hashlib.blake2b(digest_size=16)
        for a in (images, masks):
            digest.update(np.ascontiguousarray(a).tobytes())
        signature = {"config": asdict(cfg), "n": n, "shape": list(images.shape),
                     "unet": model.cfg.to_dict(), "data": digest.hexdigest(),
                     "pretrained": None if pretrained is None else str(pretrained)}
        checkpoint = Path(checkpoint) / "last"
        state = load_checkpoint(checkpoint)
        if state is not None:
            if json.loads(json.dumps(state["signature"])) != json.loads(json.dumps(signature)):
                raise ValueError(f"{checkpoint}: a checkpoint of another configuration or data; "
                                 "delete it or use another folder")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            g.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            order, pos, start = state["order"], int(state["pos"]), int(state["step"])
            if avg is not None:
                avg.load_state_dict(state["average"])
            loss_ema, seconds_before = float(state["loss_ema"]), float(state["seconds"])
    for step in range(start, total):
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + bs]
        pos += bs
        if not plain:
            idx = idx.to(dev)
        x, y = x_all[idx], y_all[idx]
        if cfg.augment:
            x, y = augment_batch(x, y, cfg, g)
            if cfg.augmentation == "monai":
                x, y = monai_augment(x, y, g)
        if plain:  # exactly the CPU-only code: no autocast, no casts
            loss = loss_fn(model(x), y)
        else:
            with _autocast(dev):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if avg is not None and step + 1 > avg_start and (
                (step + 1 - avg_start) % cfg.average_every == 0 or step + 1 == total):
            avg.update_parameters(model)
        val = float(loss.detach())
        loss_ema = val if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * val
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
            from pcl_viewer.train.checkpoint import save_checkpoint

            save_checkpoint(checkpoint, {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generator": g.get_state(),
                "torch_rng": torch.get_rng_state(), "order": order, "pos": pos,
                "step": step + 1, "loss_ema": loss_ema, "signature": signature,
                "seconds": seconds_before + time.perf_counter() - t0,
                **({"average": avg.state_dict()} if avg is not None else {})})
        if progress is not None:
            progress(step + 1, total)
    extra: dict = {}
    if avg is not None:
        model = _averaged(avg, x_all, bs)
        extra["averaged_models"] = int(avg.n_averaged)
    model.eval()
    if not plain:
        model.to("cpu")
    return model, {**extra, "steps": total, "seconds": seconds_before + time.perf_counter() - t0,
                   "final_loss": loss_ema, "device": str(dev),
                   **({"resumed_at_step": start} if start else {})}


@torch.no_grad()
def _averaged(avg: torch.optim.swa_utils.AveragedModel, x_all: torch.Tensor,
              batch_size: int, max_images: int = 2048) -> DenseUNet:
    """The averaged network with batch-norm statistics recomputed on (at most
    ``max_images``, evenly spaced) training images ``x_all`` (N,1,S,S): the running
    statistics of the averaged weights are not the average of the models' statistics."""
    from torch.optim.swa_utils import update_bn

    step = max(1, len(x_all) // max_images)
    loader = [x_all[i:i + batch_size * step:step]
              for i in range(0, len(x_all), batch_size * step)]
    update_bn(loader, avg.module)
    net: DenseUNet = avg.module
    return net


@torch.no_grad()
def predict(
    model: DenseUNet,
    images: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device | None = "auto",
    amp: bool = True,
) -> np.ndarray:
    """``(N, 1, S, S)`` float32 -> labels ``(N, S, S)`` uint8 (argmax of the seg logits).

    Args:
        model: the U-Net, on any device; it is moved to ``device`` for the call and
            back to where it was afterwards.
        images: ``(N, 1, S, S)`` float32 in [0, 1].
        batch_size: images per forward pass.
        device: as for :func:`finetune` ("auto": cuda, else mps, else cpu).
        amp: bfloat16 autocast on CUDA (ignored elsewhere); ``False`` for float32 logits.

    Returns:
        ``(N, S, S)`` uint8 labels, a NumPy array (CPU).
    """
    dev = resolve_device(device)
    model.eval()
    home = next(model.parameters()).device
    moved = home != dev
    if moved:
        model.to(dev)
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
            if _plain(dev):  # exactly the CPU-only code
                out.append(model(x).argmax(1).to(torch.uint8).numpy())
                continue
            with _autocast(dev) if amp else contextlib.nullcontext():
                logits = model(x.to(dev, non_blocking=True))
            out.append(logits.float().argmax(1).to(torch.uint8).cpu().numpy())
    finally:
        if moved:
            model.to(home)
    return np.concatenate(out) if out else np.zeros((0, *images.shape[2:]), np.uint8)


def save_segmentation_bundle(
    path: str | os.PathLike, model: DenseUNet, card: dict
) -> Path:
    """Write ``model`` as a "segmentation" bundle (component ``unet``, heads ``["seg"]``).

    The model may be on any device: the bundle always holds CPU tensors
    (:func:`pcl_viewer.models.bundle.save_bundle` copies them to the CPU).
    """
    from pcl_viewer.models.bundle import save_bundle

    full = {"kind": "segmentation", "input": {"size": model.cfg.image_size,
                                              "intensity": "float32 [0, 1]"}}
    full.update(card)
    config = {"unet": model.cfg.to_dict(), "heads": ["seg"]}
    save_bundle(path, full, {"unet": ("dense-unet", config, model)})
    return Path(path)
