"""A scan as the whole library sees it, and the error every reader raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class ScanReadError(ValueError):
    """A file that cannot be read as a 2-D grey scan. The message names the file and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass
class Scan:
    """One 2-D grey radiograph.

    Attributes:
        image: ``(H, W)`` float32 in [0, 1] at native size, bone bright, air dark.
        spacing: pixel spacing ``(row, col)`` in mm, or None if unknown.
        name: display name (file stem).
        path: source file, if any.
        metadata: reader metadata (DICOM tags, notices, original dtype ...).
    """

    image: np.ndarray
    spacing: tuple[float, float] | None = None
    name: str = "scan"
    path: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        img = np.asarray(self.image)
        if img.ndim != 2:
            raise ValueError(f"Scan image must be 2-D, got shape {img.shape}")
        self.image = img.astype(np.float32, copy=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.image.shape  # type: ignore[return-value]
