"""Dense contrastive pre-training loop (docs/method.md §3).

One step: take B images, stack their V views (real + counterfactuals, or
copies of the real image), augment them with tracked affines, sample N
canonical pixels per image visible in every view, run the U-Net on all B*V
views, read the 32-channel features at the sampled points, project them
(32 -> 256 -> 128, L2-normalised) and apply the method's loss.

Reproducibility and resume: every random choice of a step comes from a CPU
generator seeded by (seed, epoch, step, rank), the epoch order from (seed,
epoch), so a run resumed from its last epoch checkpoint (model, optimiser,
scheduler, torch RNG) is bit-identical to an uninterrupted one.

Distributed: under ``torchrun`` (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel (NCCL on CUDA, gloo on CPU); the global batch is split
over ranks and the losses gather keys over ranks (pcl_viewer.contrastive.losses).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pcl_viewer.atomic import atomic_write_text
from pcl_viewer.contrastive.losses import PIXEL_LOSSES, SimCLRLoss
from pcl_viewer.contrastive.sampling import sample_pixels
from pcl_viewer.data.views import make_views
from pcl_viewer.device import available_devices, resolve_device
from pcl_viewer.models.unet import DenseUNet, UNetConfig, build_unet
from pcl_viewer.presets import IMAGE_SIZE, check_preset
from pcl_viewer.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from pcl_viewer.train.probe import linear_probe, probe_split
from pcl_viewer.train.schedule import adamw, warmup_cosine


@dataclass(frozen=True)
class Method:
    """A pre-training method: its loss, which views it contrasts, and labels."""

    name: str
    loss: str  # key of PIXEL_LOSSES, or "simclr"
    views: str  # "counterfactuals" (real + 3 CFs), "real" (2 real views), "effusion" (real + effusion CF)
    supervised: bool = False

    @property
    def n_views(self) -> int:
        return 4 if self.views == "counterfactuals" else 2

    @property
    def heads(self) -> tuple[str, ...]:
        return ("global",) if self.loss == "simclr" else ("proj",)


METHODS: dict[str, Method] = {
    "dvd-cl": Method("dvd-cl", "dvd", "counterfactuals"),
    "mvd-cl": Method("mvd-cl", "mvd", "counterfactuals"),
    "s-dvd-cl": Method("s-dvd-cl", "s-dvd", "counterfactuals", supervised=True),
    "s-mvd-cl": Method("s-mvd-cl", "s-mvd", "counterfactuals", supervised=True),
    "vader": Method("vader", "vader", "real"),
    "ssdcl": Method("ssdcl", "ssdcl", "real", supervised=True),
    "simclr": Method("simclr", "simclr", "effusion"),
}


@dataclass
class PretrainConfig:
    """Everything that defines a pre-training run (saved as RUN/config.json)."""

    method: str = "dvd-cl"
    dagger: bool = False
    # Where the counterfactual views come from: "model" (the CF model), "true" (the
    # phantom's), or "real": augmented copies of the real image in their place (the
    # augmented-views control of a counterfactual method: same loss, V and augmentation).
    views: str = "true"
    preset: str = "cpu"
    epochs: int = 20
    batch_size: int = 8  # global, images (each with V views)
    pixels: int = 1000
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 5
    min_lr: float = 1e-6
    grad_clip: float = 1.0
    temperature: float = 0.7
    radius: float = 0.1
    seed: int = 0
    max_steps_per_epoch: int | None = None  # cap (smoke tests, timing); None = full epoch
    probe_train: int = 256
    probe_eval: int = 128
    probe_steps: int = 150
    unet: dict = field(default_factory=dict)  # UNetConfig overrides

    @classmethod
    def for_preset(cls, preset: str, **overrides: Any) -> PretrainConfig:
        check_preset(preset)
        base = cls(preset=preset)
        if preset == "smoke":
            base = replace(base, epochs=2, batch_size=4, pixels=64, warmup_epochs=1,
                           probe_train=6, probe_eval=4, probe_steps=20)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def unet_config(self) -> UNetConfig:
        cfg = UNetConfig.for_preset(self.preset)
        return replace(cfg, **self.unet) if self.unet else cfg


@dataclass
class PretrainData:
    """In-memory pre-training pool.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in [0, 1].
        counterfactuals: ``(N, 3, 1, S, S)`` (scanner, effusion, both) or None.
        silver: ``(N, S, S)`` uint8 masks or None.
        has_silver: ``(N,)`` bool, which silver masks are usable.
        description: where the data came from (for the model card).
    """

    images: torch.Tensor
    counterfactuals: torch.Tensor | None = None
    silver: torch.Tensor | None = None
    has_silver: torch.Tensor | None = None
    description: str = "in-memory"

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    @classmethod
    def from_dataset(cls, root: str | os.PathLike, size: int, views: str = "true",
                     bundle: str | None = None, need_counterfactuals: bool = True,
                     min_quality: float = 0.7) -> PretrainData:
        """Load a pool with ``load_dataset`` (silver kept where quality > min_quality).

        ``views="true"``: the phantom's true counterfactuals; ``"model"``: the
        counterfactual model's views from ``pcl_viewer.data.cf_views.load_views``;
        ``"real"``: none (augmented copies of the real image stand in for them).
        ``root`` may also be a loaded :class:`~pcl_viewer.data.dataset.CXRDataset`
        (e.g. the pre-training part of a real PadChest folder, ``ds.subset(...)``).
        """
        from pcl_viewer.data.dataset import CXRDataset, load_dataset

        ds = root if isinstance(root, CXRDataset) else load_dataset(root)
        root = ds.root
        arr = ds.arrays(size)
        if views == "real":
            need_counterfactuals = False
        cf = None
        if need_counterfactuals:
            if views == "true":
                if "true_cf" not in arr:
                    raise ValueError(f"{root}: no true counterfactuals in this dataset; use --views model")
                cf = torch.from_numpy(arr["true_cf"])
            elif views == "model":
                from pcl_viewer.data.cf_views import load_views

                cf = torch.as_tensor(load_views(ds, "model", bundle))
                if cf.shape[-1] != size:
                    raise ValueError(
                        f"the counterfactual model makes {cf.shape[-1]} px views; preset needs {size} px"
                    )
            elif views != "real":
                raise ValueError(f"views must be 'model', 'true' or 'real', got {views!r}")
        silver = has = None
        if "silver" in arr:
            silver = torch.from_numpy(arr["silver"])
            q = arr.get("silver_quality")
            ok = arr["has_silver"].copy()
            if q is not None:
                ok &= ~(q <= min_quality)  # NaN quality (not recorded) is kept
            has = torch.from_numpy(ok)
        return cls(images=torch.from_numpy(arr["image"]), counterfactuals=cf, silver=silver,
                   has_silver=has, description=f"{Path(root)} ({len(ds)} images, views={views})")

    @classmethod
    def synthetic(cls, n: int, size: int, seed: int = 0) -> PretrainData:
        """A tiny chest-like pool for tests: two dark lung ellipses (silver = truth),
        and three "counterfactuals" that shift brightness or add a basal opacity."""
        g = torch.Generator().manual_seed(seed)
        c = torch.linspace(-1, 1, size)
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        images = torch.zeros(n, 1, size, size)
        silver = torch.zeros(n, size, size, dtype=torch.uint8)
        for i in range(n):
            dx, sx, sy = 0.4 + 0.1 * torch.rand(3, generator=g) * torch.tensor([1.0, 0.5, 0.5])
            right = ((xx + dx) / (0.3 * sx / 0.4)) ** 2 + (yy / (0.6 * sy / 0.4)) ** 2 < 1
            left = ((xx - dx) / (0.3 * sx / 0.4)) ** 2 + (yy / (0.6 * sy / 0.4)) ** 2 < 1
            silver[i][right], silver[i][left] = 1, 2
            noise = 0.04 * torch.randn(size, size, generator=g)
            images[i, 0] = 0.75 - 0.1 * yy - 0.4 * (right | left).float() + noise
        images = images.clamp(0, 1)
        base = (yy > 0.4).float() * 0.3
        cf = torch.stack([images + 0.1, images + base, images + 0.1 + base], dim=1).clamp(0, 1)
        return cls(images=images, counterfactuals=cf, silver=silver,
                   has_silver=torch.ones(n, dtype=torch.bool), description=f"synthetic({n}, {size})")

    def restrict_to_silver(self) -> PretrainData:
        """The images with a usable silver mask (the reference pool is the filtered one)."""
        if self.has_silver is None or bool(self.has_silver.all()):
            return self
        idx = self.has_silver.nonzero().flatten()
        return PretrainData(
            images=self.images[idx],
            counterfactuals=None if self.counterfactuals is None else self.counterfactuals[idx],
            silver=self.silver[idx], has_silver=self.has_silver[idx],
            description=f"{self.description}, {len(idx)} with silver",
        )


class ContrastiveNet(nn.Module):
    """U-Net + head as one module (so DDP sees one forward).

    ``forward(views (B, V, 1, S, S), grids (B, V, N, 2) | None)`` returns dense
    embeddings at the sampled points ``(B, V, N, D)`` (L2-normalised) or, for
    the global head, ``(B, V, D)``.
    """

    def __init__(self, unet: DenseUNet) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, views: torch.Tensor, grids: torch.Tensor | None = None) -> torch.Tensor:
        b, v = views.shape[:2]
        feats = self.unet.features(views.flatten(0, 1))  # (B*V, C, S, S)
        if grids is None:
            return self.unet.global_head(feats).view(b, v, -1)
        # Project only the sampled points: the head is per-pixel (1x1 convs), and
        # running it on N points instead of S*S saves most of its cost.
        # float32 sampling: under bf16 autocast the sub-pixel positions must not be rounded
        grid = grids.flatten(0, 1)[:, :, None, :].to(feats.device, torch.float32)
        pts = F.grid_sample(feats.float(), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        z = self.unet.project(pts)  # (B*V, D, N, 1)
        return z.squeeze(-1).transpose(1, 2).reshape(b, v, grids.shape[2], -1)


def build_loss(method: Method, cfg: PretrainConfig) -> nn.Module:
    if method.loss == "simclr":
        return SimCLRLoss(temperature=0.5)
    cls = PIXEL_LOSSES[method.loss]
    kw = {"radius": cfg.radius} if method.loss == "mvd" else {}
    return cls(temperature=cfg.temperature, **kw)


def stack_views(data: PretrainData, idx: torch.Tensor, method: Method, dagger: bool,
                real_views: bool = False) -> torch.Tensor:
    """``(B, V, 1, S, S)`` un-augmented views of images ``idx``.

    Dagger, or ``real_views`` (the augmented-views control): every counterfactual view
    is replaced by the real image; the caller augments them (not for dagger).
    """
    real = data.images[idx].float()
    if method.views == "real" or dagger or real_views:
        return real[:, None].expand(-1, method.n_views, -1, -1, -1)
    if data.counterfactuals is None:
        raise ValueError(f"method {method.name} needs counterfactual views; none were loaded")
    cf = data.counterfactuals[idx].float()
    others = cf if method.views == "counterfactuals" else cf[:, 1:2]  # effusion
    return torch.cat([real[:, None], others], dim=1)


def _generator(*keys: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed % (1 << 63))


def _dist_setup() -> tuple[int, int, torch.device]:
    """Rank, world size and this process's device.

    Pre-training's own rule (``pcl bench --device`` does not apply to it): the local rank's
    CUDA device (``LOCAL_RANK`` under torchrun, else 0) when CUDA is present, else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = "cuda" in available_devices()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if not cuda:
        return rank, world, torch.device("cpu")
    device = resolve_device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(device)
    return rank, world, device


def _write_json(path: Path, obj: Any, lines: bool = False) -> None:
    text = "".join(json.dumps(o) + "\n" for o in obj) if lines else json.dumps(obj, indent=2) + "\n"
    atomic_write_text(path, text)


def pretrain(
    cfg: PretrainConfig,
    data: PretrainData,
    out: str | os.PathLike,
    command: str = "",
    progress: bool = True,
    stop_after_epoch: int | None = None,
    echo=print,
) -> dict[str, Any]:
    """Run (or resume) a pre-training into ``out``; returns the summary.

    ``stop_after_epoch`` ends the process-local run early after that many
    epochs (as a kill would, but cleanly); a later call resumes.
    """
    from tqdm.auto import tqdm

    method = METHODS[cfg.method]
    rank, world, device = _dist_setup()
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    if method.supervised or data.silver is not None:
        data = data.restrict_to_silver()
    if data.size != IMAGE_SIZE[cfg.preset]:
        raise ValueError(f"data are {data.size} px, preset {cfg.preset} needs {IMAGE_SIZE[cfg.preset]}")
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    local_batch = cfg.batch_size // world
    steps = len(data) // cfg.batch_size
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{len(data)} images are fewer than one batch of {cfg.batch_size}")

    torch.manual_seed(cfg.seed)
    unet_cfg = cfg.unet_config()
    unet = build_unet(unet_cfg, heads=method.heads)
    net: nn.Module = ContrastiveNet(unet).to(device)
    opt = adamw(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The reference warms up for 5 of 20 epochs; a shorter run keeps that quarter
    # rather than ending inside its warm-up.
    warm_epochs = min(cfg.warmup_epochs, cfg.epochs / 4)
    sched = warmup_cosine(opt, max(1, round(warm_epochs * steps)), cfg.epochs * steps,
                          min_lr=cfg.min_lr)
    loss_fn = build_loss(method, cfg)
    amp = device.type == "cuda"

    start_epoch, history, best = 0, [], {"epoch": -1, "dice": -1.0}
    state = load_checkpoint(ckpt_dir / "last")
    if state is not None:
        if json.loads(json.dumps(state["config"])) != json.loads(json.dumps(asdict(cfg))):
            raise ValueError(f"{out}: has a checkpoint of a different configuration; use a new --out")
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        start_epoch, history, best = state["epoch"], state["history"], state["best"]
        echo(f"resuming {out} after epoch {start_epoch}")
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if amp else None)
    model = net.module if world > 1 else net

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", {"config": asdict(cfg), "unet": unet_cfg.to_dict(),
                                          "heads": list(method.heads), "data": data.description,
                                          "images": len(data), "world_size": world,
                                          "command": command})
    probe_idx = None
    if data.silver is not None:
        probe_idx = probe_split(data.has_silver if data.has_silver is not None
                                else torch.ones(len(data), dtype=torch.bool),
                                cfg.probe_train, cfg.probe_eval)

    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        net.train()
        order = torch.randperm(len(data), generator=_generator(cfg.seed, epoch))
        batches = order[: steps * cfg.batch_size].view(steps, world, local_batch)[:, rank]
        bar = tqdm(range(steps), desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and rank == 0), leave=False)
        # CPU seconds (all threads) next to wall seconds: on a shared machine the
        # wall clock measures the neighbours, the CPU time the work
        t0, c0, loss_sum = time.perf_counter(), time.process_time(), 0.0
        for step in bar:
            g = _generator(cfg.seed, epoch, step, rank)
            idx = batches[step]
            stacks = stack_views(data, idx, method, cfg.dagger, cfg.views == "real")
            views, theta = make_views(stacks, augment=not cfg.dagger, generator=g,
                                      min_visible=cfg.pixels)
            views = views.to(device, non_blocking=True)
            sample = None
            if method.loss != "simclr":
                labels = data.silver[idx] if method.supervised else None
                sample = sample_pixels(theta, data.size, cfg.pixels, g, labels)
            # AMP (CUDA only) for the network; the loss always runs in float32.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                z = net(views, None if sample is None else sample.grids.to(device))
            z = z.float()
            if sample is None:
                loss = loss_fn(z[:, 0], z[:, 1])
            else:
                lab = None if sample.labels is None else sample.labels.to(device)
                loss = loss_fn(z, sample.positions.to(device), lab)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += float(loss.detach())
            rate = (step + 1) * cfg.batch_size / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{rate:.1f}")
        bar.close()
        train_s = time.perf_counter() - t0
        cpu_s = time.process_time() - c0
        record = {
            "epoch": epoch + 1, "steps": steps, "loss": loss_sum / steps,
            "lr": sched.get_last_lr()[0], "s_per_step": train_s / steps,
            "images_per_s": steps * cfg.batch_size / train_s,
            "cpu_s_per_step": cpu_s / steps, "threads": torch.get_num_threads(),
        }
        if rank == 0:
            if probe_idx is not None:
                res, _ = linear_probe(model.unet, data.images, data.silver, *probe_idx,
                                      steps=cfg.probe_steps, seed=0, device=device)
                record["probe_dice"] = res.dice
                record["probe"] = res.to_dict()
            dice = record.get("probe_dice", float(epoch))  # no labels: keep the last epoch
            if dice > best["dice"]:
                best = {"epoch": epoch + 1, "dice": dice}
                save_checkpoint(ckpt_dir / "best", {"model": model.unet.state_dict(), **best})
            history.append(record)
            save_checkpoint(ckpt_dir / "last", {
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history,
                "best": best, "rng": rng_state(), "config": asdict(cfg),
            })
            _write_json(out / "log.jsonl", history, lines=True)
            echo(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {record['loss']:.4f}, "
                f"{record['images_per_s']:.2f} images/s ({record['s_per_step']:.2f} s/step, "
                f"{record['cpu_s_per_step']:.2f} CPU-s/step; views counted once)"
                + (f", probe Dice {record['probe_dice']:.4f}" if "probe_dice" in record else "")
            )
        if world > 1:
            dist.barrier()
    else:
        if rank == 0:
            summary = _finish(cfg, method, unet_cfg, out, history, best, data, command)
    if world > 1:
        dist.barrier()
    return summary


def _finish(cfg, method, unet_cfg, out: Path, history, best, data, command) -> dict[str, Any]:
    from pcl_viewer.models.bundle import save_bundle

    state = load_checkpoint(out / "checkpoints" / "best")
    rates = [h["images_per_s"] for h in history]
    summary = {
        "method": cfg.method, "dagger": cfg.dagger, "views": cfg.views,
        "best_epoch": best["epoch"], "probe_dice": best["dice"] if "probe_dice" in history[-1] else None,
        "per_epoch": [{k: h.get(k) for k in ("epoch", "loss", "probe_dice")} for h in history],
        "images_per_s": float(np.median(rates)) if rates else None,
        "s_per_step": float(np.median([h["s_per_step"] for h in history])) if history else None,
    }
    _write_json(out / "probe.json", summary)
    name = f"pretrained-{cfg.method}{'-dagger' if cfg.dagger else ''}"
    card = {
        "name": name, "version": "1", "kind": "pretrained", "method": cfg.method,
        "dagger": cfg.dagger, "views": cfg.views, "preset": cfg.preset,
        "input": {"size": unet_cfg.image_size, "intensity": "float32 [0, 1]"},
        "training": {"command": command, "seed": cfg.seed, "data": data.description,
                     "epochs": cfg.epochs, "best_epoch": best["epoch"], "config": asdict(cfg)},
        "metrics": {"probe_dice": summary["probe_dice"], "images_per_s": summary["images_per_s"]},
    }
    config = {"unet": unet_cfg.to_dict(), "heads": list(method.heads)}
    save_bundle(out / "bundle", card, {"unet": ("dense-unet", config, state["model"])})
    return summary
