"""The phantom structural causal model: sampling, rendering and true counterfactuals.

Causal graph (``care`` latent, as in PadChest)::

    sex, age -> care -> scanner (style)
    sex, age, care -> effusion
    image := f(anatomy noise, sex, age | study noise, scanner | effusion noise, effusion)
    gold mask := g(anatomy noise, sex, age, study pose, effusion noise, effusion)

The gold mask does not depend on the scanner (for the two training styles), so
``do(scanner)`` leaves it unchanged; ``do(effusion)`` changes it only where
fluid replaces aerated lung at the base of the chosen side(s).

The held-out ``portable`` style is a bedside AP acquisition: it magnifies the
heart and tilts the patient more, so its geometry (and gold mask) differs from
a PA study of the same patient. Its scanner counterfactual flips to one of
the two training scanners (chosen by the study's acquisition seed) and renders
that PA study, so for portable images ``do(scanner)`` may change the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcl_viewer.data.phantom import DEFAULT_REGIME, REGIMES
from pcl_viewer.data.phantom.acquisition import acquire, pose_matrix, warp
from pcl_viewer.data.phantom.anatomy import Anatomy, build_anatomy, default_shape_model
from pcl_viewer.data.phantom.noise import (
    SEVERITY_BETA,
    EffusionNoise,
    ExogenousNoise,
    ExtraNoise,
    PatientNoise,
    StudyNoise,
    StudyParents,
)
from pcl_viewer.data.phantom.priors import Priors
from pcl_viewer.data.phantom.render import Layers, compose, compose_realistic, rasterise

TRAINING_STYLES: tuple[str, str] = ("imagingdynamics", "philips")


@dataclass
class Study:
    """One sampled study: its exogenous noise and parent values."""

    noise: ExogenousNoise
    parents: StudyParents
    patient_index: int
    study_index: int


def sample_studies(n: int, seed: int, *, studies_per_patient: int = 2,
                   oversample: float = 1.0, styles: tuple[str, ...] = TRAINING_STYLES,
                   severe: bool = False, priors: Priors | None = None,
                   regime: str = DEFAULT_REGIME) -> list[Study]:
    """Sample ``n`` studies from the calibrated SCM (``oversample`` = 1 reproduces PadChest).

    ``regime`` ``realistic`` adds :class:`ExtraNoise` (cardiomegaly, opacities, devices,
    appearance jitter) and Beta-distributed effusion severity, all from a second random
    stream, so ``easy`` reproduces the earlier renderer's studies seed for seed.

    Patients get 1..``studies_per_patient`` studies (same anatomy, new acquisition,
    possibly another care setting, scanner and effusion status). ``styles``
    restricts the scanner: training styles are drawn from ``P(scanner | care)``; a
    listed ``portable`` style takes a share ``1/len(styles)`` of inpatient studies and
    half that of outpatient ones; a single style is assigned to every study.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {REGIMES}")
    priors = priors or Priors.load()
    k = default_shape_model().n_modes
    rng = np.random.default_rng(seed)
    rng2 = np.random.default_rng([seed, 2])  # the realistic regime's own stream
    out: list[Study] = []
    pi = 0
    while len(out) < n:
        sex, _, age0 = priors.sample_patient(rng)
        patient = PatientNoise.sample(rng, k)
        n_st = int(rng.integers(1, studies_per_patient + 1))
        for si in range(min(n_st, n - len(out))):
            age = float(min(age0 + si * rng.uniform(0.1, 1.5), 100.0))
            care = "inpatient" if rng.random() < priors.p_inpatient(sex, age) else "outpatient"
            style = "philips" if rng.random() < priors.p_philips(care) else "imagingdynamics"
            if len(styles) == 1:
                style = styles[0]
            elif "portable" in styles:
                share = 1.0 / len(styles) * (1.0 if care == "inpatient" else 0.5)
                if rng.random() < share:
                    style = "portable"
            if style != "portable" and style not in styles:
                style = next(s for s in styles if s != "portable")
            eff = bool(rng.random() < priors.p_effusion(sex, age, care, oversample))
            noise = ExogenousNoise(patient, StudyNoise.sample(rng),
                                   EffusionNoise.sample(rng, severe=severe))
            if regime == "realistic":
                b = float(rng2.beta(*SEVERITY_BETA))
                noise.effusion.severity = round(0.45 + 0.55 * b if severe else b, 5)
                cardio = bool(rng2.random() < priors.p_cardiomegaly(sex, age, eff))
                noise.extra = ExtraNoise.sample(rng2, cardiomegaly=cardio,
                                                inpatient=care == "inpatient",
                                                portable=style == "portable")
                noise.regime = "realistic"
            parents = StudyParents(style=style, sex="male" if sex == "M" else "female",
                                   effusion=eff, age=round(age, 1), care=care)
            out.append(Study(noise, parents, pi, si))
        pi += 1
    return out


def _geometry_key(parents: StudyParents) -> tuple:
    return (parents.sex, parents.age, parents.style == "portable")


class Renderer:
    """Deterministic renderer of one noise record that reuses the anatomy across
    counterfactuals (layers are rasterised once per geometry and size)."""

    def __init__(self, noise: ExogenousNoise) -> None:
        self.noise = noise
        self._cache: dict[tuple, tuple[Anatomy, Layers]] = {}

    def _layers(self, parents: StudyParents, size: int) -> tuple[Anatomy, Layers]:
        key = _geometry_key(parents) + (size,)
        if key not in self._cache:
            an = build_anatomy(self.noise, parents)
            self._cache[key] = (an, rasterise(an, size, self.noise.patient.vessel_seed,
                                              self.noise))
        return self._cache[key]

    def render(self, parents: StudyParents, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Image ``(S, S)`` float32 in [0, 1] and gold mask ``(S, S)`` uint8 in {0, 1, 2}."""
        an, layers = self._layers(parents, size)
        realistic = self.noise.regime == "realistic" and self.noise.extra is not None
        if realistic:
            atten, mask = compose_realistic(an, layers, parents, self.noise)
        else:
            atten, mask = compose(an, layers, parents.effusion, self.noise.effusion)
        m = pose_matrix(self.noise.study, parents.style, size, realistic)
        atten = warp(atten, m)
        mask = warp(mask, m, nearest=True)
        extra = self.noise.extra if realistic else None
        return acquire(atten, parents.style, self.noise.study, extra), mask

    def counterfactual(self, parents: StudyParents, do: dict,
                       size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """The true counterfactual under ``do`` (same noise, intervened parents)."""
        return self.render(parents.intervene(do), size)


def render(noise: ExogenousNoise, parents: StudyParents,
           size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ``(image (S,S) float32 [0,1], gold mask (S,S) uint8 0/1/2)``."""
    return Renderer(noise).render(parents, size)


def counterfactual(noise: ExogenousNoise, parents: StudyParents, do: dict,
                   size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """True counterfactual image and gold mask of ``noise`` under ``do(...)``.

    ``do`` keys: ``scanner`` (any style name), ``effusion`` (bool or
    ``present``/``absent``), ``sex``, ``age``.
    """
    return Renderer(noise).counterfactual(parents, do, size)


def flipped_scanner(noise: ExogenousNoise, parents: StudyParents) -> str:
    """Scanner of the scanner-flip counterfactual; ``portable`` studies flip to a
    training scanner chosen by their acquisition seed (documented convention)."""
    if parents.style == "portable":
        return TRAINING_STYLES[noise.study.acq_seed % 2]
    return "philips" if parents.style == "imagingdynamics" else "imagingdynamics"


def standard_dos(noise: ExogenousNoise, parents: StudyParents) -> dict[str, dict]:
    """The three interventions of the method: scanner, effusion, both flipped."""
    sc = flipped_scanner(noise, parents)
    ef = not parents.effusion
    return {"scanner": {"scanner": sc}, "effusion": {"effusion": ef},
            "both": {"scanner": sc, "effusion": ef}}
