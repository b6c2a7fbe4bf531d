"""Preset names shared by every component.

Each component keeps its own typed config (``UNetConfig``, ``HVAEConfig`` ...)
with a ``for_preset(name)`` constructor; this module only holds what they share.

- ``smoke``: tiny and fast, for tests (64 px).
- ``cpu``: the shipped default, trainable on a 2-core CPU (128 px).
- ``paper``: the reference sizes (224 px), for GPUs.
"""

from __future__ import annotations

PRESETS: tuple[str, ...] = ("smoke", "cpu", "paper")
IMAGE_SIZE: dict[str, int] = {"smoke": 64, "cpu": 128, "paper": 224}


def check_preset(name: str) -> str:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return name
