"""Causal parents of a chest radiograph and interventions on them.

The counterfactual model conditions on three binary parents, encoded 0/1 in
this order: ``scanner`` (imagingdynamics=0, philips=1), ``sex`` (female=0,
male=1), ``effusion`` (absent=0, present=1). The phantom also renders a third,
held-out acquisition style ``portable`` which no model is trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

PARENT_VALUES: dict[str, tuple[str, str]] = {
    "scanner": ("imagingdynamics", "philips"),
    "sex": ("female", "male"),
    "effusion": ("absent", "present"),
}
PARENT_NAMES: tuple[str, ...] = tuple(PARENT_VALUES)
PHANTOM_STYLES: tuple[str, ...] = ("imagingdynamics", "philips", "portable")
#: The counterfactual views of a scan, in their canonical order: flip the scanner,
#: flip the effusion, flip both. Data sets, caches and montages store them in this order.
VIEW_KINDS: tuple[str, ...] = ("scanner", "effusion", "both")


@dataclass(frozen=True)
class Parents:
    """Values of the causal parents of one scan."""

    scanner: str
    sex: str
    effusion: str

    def __post_init__(self) -> None:
        for name in PARENT_NAMES:
            value = getattr(self, name)
            if value not in PARENT_VALUES[name]:
                raise ValueError(
                    f"invalid {name}={value!r}; expected one of {PARENT_VALUES[name]}"
                )

    def to_vector(self) -> np.ndarray:
        """Shape (3,) float32 of 0/1 in PARENT_NAMES order."""
        return np.array(
            [PARENT_VALUES[n].index(getattr(self, n)) for n in PARENT_NAMES], dtype=np.float32
        )

    @classmethod
    def from_vector(cls, vec) -> Parents:
        vals = [float(v) for v in vec]
        return cls(**{n: PARENT_VALUES[n][int(round(v))] for n, v in zip(PARENT_NAMES, vals)})

    def intervene(self, do: dict[str, str]) -> Parents:
        """Return the parents after ``do(...)``; unknown names or values raise ValueError."""
        for name in do:
            if name not in PARENT_VALUES:
                raise ValueError(f"cannot intervene on {name!r}; parents are {PARENT_NAMES}")
        return replace(self, **do)

    def flipped(self, name: str) -> str:
        """The other value of a binary parent (used for the default interventions)."""
        a, b = PARENT_VALUES[name]
        return b if getattr(self, name) == a else a

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def intervention_name(do: dict[str, str], strength: float = 1.0) -> str:
    """Human-readable name, e.g. ``do(scanner=philips, effusion=present)``; a strength
    other than 1 is named (``x0.5``), and above 1 marked ``(extrapolated)``: beyond the
    model's counterfactual. Below 1 the residual is only attenuated."""
    inner = ", ".join(f"{k}={v}" for k, v in do.items())
    name = f"do({inner})"
    if strength > 1.0 + 1e-9:
        name += f" x{strength:g} (extrapolated)"
    elif abs(strength - 1.0) > 1e-9:
        name += f" x{strength:g}"
    return name


def parse_do(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Parse CLI ``--do scanner=philips`` items into an intervention dict."""
    do: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--do expects NAME=VALUE, got {item!r}")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in PARENT_VALUES:
            raise ValueError(f"unknown parent {key!r}; parents are {', '.join(PARENT_NAMES)}")
        if value not in PARENT_VALUES[key]:
            raise ValueError(f"invalid value {value!r} for {key}; expected {PARENT_VALUES[key]}")
        do[key] = value
    return do


def standard_interventions(parents: Parents) -> dict[str, dict[str, str]]:
    """The three counterfactual views of the method: flip scanner, flip effusion, both."""
    return {
        "scanner": {"scanner": parents.flipped("scanner")},
        "effusion": {"effusion": parents.flipped("effusion")},
        "both": {"scanner": parents.flipped("scanner"), "effusion": parents.flipped("effusion")},
    }
