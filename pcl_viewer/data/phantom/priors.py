"""Probability tables of the phantom's causal graph, derived from real PadChest labels.

Graph (all variables per study)::

    sex -> age_bin -> care <- sex        care -> scanner
    (age_bin, sex, care) -> effusion
    (age_bin, sex, effusion) ~ cardiomegaly   (realistic regime; see below)

``care`` (outpatient / inpatient) is latent in PadChest. It is identified by
fixing how each care setting uses the two scanners, ``P(philips | care)`` (a
documented assumption, :data:`SCANNER_GIVEN_CARE`), and then solving, in
every (age bin, sex) cell exactly, for ``P(inpatient | age, sex)`` from the
observed Philips share and for ``P(effusion | age, sex, care)`` from the two
observed effusion rates per scanner. Scanner and effusion are then independent
given (care, age, sex), and the model reproduces the observed joint
``P(scanner, effusion | age, sex)`` of every cell, hence every marginal.

Cardiomegaly is drawn with the rate PadChest shows for the study's age bin, sex and
effusion status, as exogenous noise of the study: it shares causes with the effusion
(heart failure) but is not its effect, so ``do(effusion)`` leaves the heart as it is.

Source: ``data/PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz`` in the
torchxrayvision package, PA views, sex M/F, known age.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

import numpy as np

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
AGE_EDGES: tuple[int, ...] = (0, 20, 30, 40, 50, 60, 70, 80, 101)
SEXES: tuple[str, str] = ("F", "M")
CARES: tuple[str, str] = ("outpatient", "inpatient")
MANUFACTURER = {
    "philips": "PhilipsMedicalSystems",
    "imagingdynamics": "ImagingDynamicsCompanyLtd",
    "portable": "PortablePhantomDR",
}
#: Assumption that identifies the latent care setting: share of Philips per setting.
SCANNER_GIVEN_CARE: dict[str, float] = {"outpatient": 0.25, "inpatient": 0.80}


def read_padchest_pa(csv_path: Path):
    """PA rows of the PadChest CSV as a DataFrame with sex, age, scanner, effusion."""
    import pandas as pd

    cols = ["ImageID", "PatientID", "PatientBirth", "StudyDate_DICOM", "PatientSex_DICOM",
            "Projection", "Manufacturer_DICOM", "Labels"]
    df = pd.read_csv(csv_path, usecols=cols)
    df = df[df.Projection == "PA"].copy()
    df["age"] = df.StudyDate_DICOM // 10000 - df.PatientBirth
    df = df[df.PatientSex_DICOM.isin(SEXES) & df.age.between(0, 100)]
    df["philips"] = df.Manufacturer_DICOM == MANUFACTURER["philips"]
    df["effusion"] = df.Labels.fillna("").str.contains("pleural effusion", regex=False)
    df["cardiomegaly"] = df.Labels.fillna("").str.contains("cardiomegaly", regex=False)
    df["age_bin"] = np.searchsorted(np.array(AGE_EDGES), df.age.to_numpy(), side="right") - 1
    return df


def build_tables(df) -> dict:
    """Fit the tables (see module docstring) from the PA DataFrame of :func:`read_padchest_pa`."""
    nb = len(AGE_EDGES) - 1
    s0, s1 = SCANNER_GIVEN_CARE["outpatient"], SCANNER_GIVEN_CARE["inpatient"]
    p_age = {}
    p_inpatient = {}
    p_eff = {c: {} for c in CARES}
    for sex in SEXES:
        d = df[df.PatientSex_DICOM == sex]
        counts = np.bincount(d.age_bin, minlength=nb).astype(float)
        p_age[sex] = (counts / counts.sum()).round(6).tolist()
        pis, e0s, e1s = [], [], []
        for b in range(nb):
            cell = d[d.age_bin == b]
            ph = float(cell.philips.mean())
            pi = float(np.clip((ph - s0) / (s1 - s0), 0.01, 0.99))
            # joint effusion rates: P(eff, philips) and P(eff, ID) in the cell
            a = np.array([[pi * s1, (1 - pi) * s0], [pi * (1 - s1), (1 - pi) * (1 - s0)]])
            rhs = np.array([(cell.effusion & cell.philips).mean(),
                            (cell.effusion & ~cell.philips).mean()])
            e1, e0 = np.clip(np.linalg.solve(a, rhs), 0.0005, 0.9)
            pis.append(round(pi, 6))
            e0s.append(round(float(e0), 6))
            e1s.append(round(float(e1), 6))
        p_inpatient[sex] = pis
        p_eff["outpatient"][sex] = e0s
        p_eff["inpatient"][sex] = e1s
    p_male = float((df.PatientSex_DICOM == "M").mean())
    p_cardio = {}
    for eff in (False, True):
        key = "effusion" if eff else "no_effusion"
        p_cardio[key] = {}
        for sex in SEXES:
            d = df[(df.PatientSex_DICOM == sex) & (df.effusion == eff)]
            rates = []
            for b in range(nb):
                cell = d[d.age_bin == b]
                # add-one smoothing: young effusion cells hold few images
                rates.append(round(float((cell.cardiomegaly.sum() + 1) / (len(cell) + 2)), 6))
            p_cardio[key][sex] = rates
    return {
        "source": f"torchxrayvision data/{PADCHEST_CSV}, Projection == 'PA'",
        "n_images": int(len(df)),
        "age_edges": list(AGE_EDGES),
        "p_sex": {"F": round(1 - p_male, 6), "M": round(p_male, 6)},
        "p_age_bin_given_sex": p_age,
        "p_inpatient_given_age_sex": p_inpatient,
        "p_philips_given_care": dict(SCANNER_GIVEN_CARE),
        "p_effusion_given_age_sex_care": p_eff,
        "p_cardiomegaly_given_age_sex_effusion": p_cardio,
        "observed": observed_marginals(df),
        "manufacturer_strings": MANUFACTURER,
    }


def observed_marginals(df) -> dict:
    """The headline figures the tables must reproduce (computed from the data)."""
    by_age = df.groupby("age_bin").effusion.mean()
    return {
        "p_philips": round(float(df.philips.mean()), 4),
        "p_effusion": round(float(df.effusion.mean()), 4),
        "p_effusion_philips": round(float(df[df.philips].effusion.mean()), 4),
        "p_effusion_imagingdynamics": round(float(df[~df.philips].effusion.mean()), 4),
        "p_effusion_male": round(float(df[df.PatientSex_DICOM == "M"].effusion.mean()), 4),
        "p_effusion_female": round(float(df[df.PatientSex_DICOM == "F"].effusion.mean()), 4),
        "p_effusion_by_age_bin": [round(float(v), 4) for v in by_age.to_numpy()],
        "p_cardiomegaly": round(float(df.cardiomegaly.mean()), 4),
        "p_cardiomegaly_effusion": round(float(df[df.effusion].cardiomegaly.mean()), 4),
        "p_cardiomegaly_no_effusion": round(float(df[~df.effusion].cardiomegaly.mean()), 4),
    }


class Priors:
    """The committed probability tables, with sampling of the parents of one study."""

    def __init__(self, tables: dict) -> None:
        self.tables = tables
        self.edges = np.asarray(tables["age_edges"])
        self._edges = [float(e) for e in tables["age_edges"]]

    @classmethod
    def load(cls, path: str | Path | None = None) -> Priors:
        if path is None:
            from pcl_viewer.paths import priors_dir

            path = priors_dir() / "padchest_tables.json"
        return cls(json.loads(Path(path).read_text()))

    def sample_patient(self, rng: np.random.Generator) -> tuple[str, int, float]:
        """(sex 'F'/'M', age bin, age in years) of a new patient."""
        t = self.tables
        sex = "M" if rng.random() < t["p_sex"]["M"] else "F"
        probs = np.asarray(t["p_age_bin_given_sex"][sex], dtype=np.float64)
        b = int(rng.choice(len(probs), p=probs / probs.sum()))
        age = float(rng.uniform(self.edges[b], self.edges[b + 1]))
        return sex, b, age

    def age_bin(self, age: float) -> int:
        b = bisect.bisect_right(self._edges, float(age)) - 1
        return min(max(b, 0), len(self._edges) - 2)

    def p_inpatient(self, sex: str, age: float) -> float:
        return float(self.tables["p_inpatient_given_age_sex"][sex][self.age_bin(age)])

    def p_philips(self, care: str) -> float:
        return float(self.tables["p_philips_given_care"][care])

    def p_cardiomegaly(self, sex: str, age: float, effusion: bool) -> float:
        """P(cardiomegaly | age, sex, effusion) as in PadChest's PA labels."""
        key = "effusion" if effusion else "no_effusion"
        return float(self.tables["p_cardiomegaly_given_age_sex_effusion"][key][sex]
                     [self.age_bin(age)])

    def p_effusion(self, sex: str, age: float, care: str, oversample: float = 1.0) -> float:
        """P(effusion | age, sex, care); ``oversample`` multiplies the odds (1 = calibrated)."""
        p = float(self.tables["p_effusion_given_age_sex_care"][care][sex][self.age_bin(age)])
        odds = oversample * p / (1.0 - p)
        return odds / (1.0 + odds)


def model_marginals(tables: dict, oversample: float = 1.0) -> dict:
    """Exact marginals implied by the tables (what an infinite sample would give)."""
    pr = Priors(tables)
    edges = tables["age_edges"]
    tot = {"philips": 0.0, "eff": 0.0, "eff_philips": 0.0, "eff_id": 0.0}
    by_sex = {"M": [0.0, 0.0], "F": [0.0, 0.0]}
    by_age = np.zeros((len(edges) - 1, 2))
    for sex in SEXES:
        ps = tables["p_sex"][sex]
        for b, pb in enumerate(tables["p_age_bin_given_sex"][sex]):
            age = 0.5 * (edges[b] + edges[b + 1])
            pi = pr.p_inpatient(sex, age)
            for care, pc in (("inpatient", pi), ("outpatient", 1 - pi)):
                w = ps * pb * pc
                ph, pe = pr.p_philips(care), pr.p_effusion(sex, age, care, oversample)
                tot["philips"] += w * ph
                tot["eff"] += w * pe
                tot["eff_philips"] += w * ph * pe
                tot["eff_id"] += w * (1 - ph) * pe
                by_sex[sex][0] += w * pe
                by_sex[sex][1] += w
                by_age[b] += (w * pe, w)
    return {
        "p_philips": tot["philips"],
        "p_effusion": tot["eff"],
        "p_effusion_philips": tot["eff_philips"] / tot["philips"],
        "p_effusion_imagingdynamics": tot["eff_id"] / (1 - tot["philips"]),
        "p_effusion_male": by_sex["M"][0] / by_sex["M"][1],
        "p_effusion_female": by_sex["F"][0] / by_sex["F"][1],
        "p_effusion_by_age_bin": (by_age[:, 0] / by_age[:, 1]).tolist(),
    }
