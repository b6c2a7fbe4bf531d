"""The segmentation/feature U-Net and its heads, built from a preset config.

Every U-Net ends in a 32-channel full-resolution decoder feature map
(``features``), on which sit a dense projection head for contrastive
pre-training, a global head for SimCLR, and a 1x1-conv segmentation head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from pcl_viewer.presets import IMAGE_SIZE, check_preset


@dataclass
class UNetConfig:
    """Config of :class:`DenseUNet`.

    arch: ``"monai-unet"`` (small residual U-Net, cpu/smoke) or ``"flexible-unet"``
    (MONAI FlexibleUNet with a ResNet encoder, the paper's network).
    """

    arch: str = "monai-unet"
    image_size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 2
    backbone: str = "resnet50"
    decoder_channels: tuple[int, ...] = (1024, 512, 256, 128, 32)
    feature_channels: int = 32
    num_classes: int = 3
    proj_hidden: int = 256
    proj_dim: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_preset(cls, name: str) -> UNetConfig:
        check_preset(name)
        if name == "smoke":
            return cls(image_size=IMAGE_SIZE[name], channels=(8, 16, 32), num_res_units=1,
                       proj_hidden=32, proj_dim=16)
        if name == "cpu":
            return cls(image_size=IMAGE_SIZE[name])
        return cls(arch="flexible-unet", image_size=IMAGE_SIZE[name])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
        d = dict(d)
        for key in ("channels", "decoder_channels"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


class _FlexibleFeatures(nn.Module):
    """FlexibleUNet without its segmentation head: returns decoder features."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        from monai.networks.nets import FlexibleUNet

        net = FlexibleUNet(
            in_channels=1, out_channels=cfg.num_classes, backbone=cfg.backbone, pretrained=False,
            decoder_channels=cfg.decoder_channels, spatial_dims=2,
        )
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.skip_connect = net.skip_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: torch.Tensor = self.decoder(self.encoder(x), self.skip_connect)
        return feats


class DenseUNet(nn.Module):
    """U-Net with a 32-channel full-resolution feature map and optional heads.

    Input ``(B, 1, H, W)`` float in [0, 1]; H and W divisible by 16 (cpu) or 32 (paper).
    """

    def __init__(self, cfg: UNetConfig, heads: tuple[str, ...] = ("seg",)) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone: nn.Module
        if cfg.arch == "monai-unet":
            from monai.networks.nets import UNet

            self.backbone = UNet(
                spatial_dims=2, in_channels=1, out_channels=cfg.feature_channels,
                channels=cfg.channels, strides=(2,) * (len(cfg.channels) - 1),
                num_res_units=cfg.num_res_units, norm="batch",
            )
        elif cfg.arch == "flexible-unet":
            self.backbone = _FlexibleFeatures(cfg)
        else:
            raise ValueError(f"unknown U-Net arch {cfg.arch!r}")
        f = cfg.feature_channels
        self.heads = tuple(heads)
        if "seg" in heads:
            self.seg_head = nn.Conv2d(f, cfg.num_classes, kernel_size=1)
        if "proj" in heads:
            # Dense projection head of the method: 1x1 conv 32->256, ReLU, 1x1 conv 256->128.
            self.proj_head = nn.Sequential(
                nn.Conv2d(f, cfg.proj_hidden, 1), nn.ReLU(inplace=True),
                nn.Conv2d(cfg.proj_hidden, cfg.proj_dim, 1),
            )
        if "global" in heads:
            self.global_head = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(f, cfg.proj_hidden),
                nn.ReLU(inplace=True), nn.Linear(cfg.proj_hidden, cfg.proj_dim),
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> decoder features ``(B, 32, H, W)``."""
        feats: torch.Tensor = self.backbone(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> segmentation logits ``(B, num_classes, H, W)``."""
        logits: torch.Tensor = self.seg_head(self.features(x))
        return logits

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Dense embeddings ``(B, proj_dim, H, W)``, L2-normalised per pixel."""
        return nn.functional.normalize(self.proj_head(feats), dim=1)


def build_unet(preset_or_cfg: str | UNetConfig, heads: tuple[str, ...] = ("seg",)) -> DenseUNet:
    """The one factory: a preset name or a config -> :class:`DenseUNet`."""
    cfg = preset_or_cfg if isinstance(preset_or_cfg, UNetConfig) else UNetConfig.for_preset(preset_or_cfg)
    return DenseUNet(cfg, heads=heads)


def build_from_config(config: dict[str, Any]) -> DenseUNet:
    """Bundle builder: ``{"unet": UNetConfig dict, "heads": [...]}``."""
    return DenseUNet(UNetConfig.from_dict(config["unet"]), heads=tuple(config.get("heads", ["seg"])))
