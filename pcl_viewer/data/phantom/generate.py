"""Write a phantom dataset in a PadChest/CheXmask-like layout.

Layout of ``DIR``::

    dataset.json                  format marker, arguments, counts, measured speed
    padchest_phantom.csv          one row per image, PadChest column names + phantom columns
    images/<ImageID>              16-bit grey PNG, bone bright
    gold_masks.csv                CheXmask-style RLE of the gold masks ("Dice RCA (Mean)" = 1)
    noise.jsonl                   {"ImageID", "parents", "noise"} per line (replayable)
    counterfactuals/<kind>/<ImageID>   true counterfactual images (--counterfactuals)
    counterfactuals/gold_<kind>.csv    their gold masks (RLE), kind in scanner/effusion/both
    silver_masks.csv              written later by `pcl phantom silver`
"""

from __future__ import annotations

import csv
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from pcl_viewer.data import rle
from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
from pcl_viewer.data.phantom.noise import StudyParents
from pcl_viewer.data.phantom.priors import MANUFACTURER
from pcl_viewer.data.phantom.scm import Renderer, Study, sample_studies, standard_dos
from pcl_viewer.parents import VIEW_KINDS

FORMAT = "pcl-phantom"
META_COLUMNS = ["ImageID", "ImageDir", "StudyID", "PatientID", "PatientBirth",
                "StudyDate_DICOM", "PatientSex_DICOM", "PatientAge", "Projection",
                "Manufacturer_DICOM", "Labels", "split", "style", "care", "effusion",
                "effusion_side", "effusion_severity", "patient_index", "study_index"]
MASK_COLUMNS = ["ImageID", "Dice RCA (Mean)", "Right Lung", "Left Lung", "Height", "Width"]
SPLIT_P = (0.7, 0.15, 0.15)


def write_png16(path: Path, image: np.ndarray, bits: int = 16) -> None:
    """Save a float [0, 1] image as a 16-bit grey PNG holding ``bits`` significant bits
    (12 as in PadChest's ``BitsStored_DICOM``: smaller files, same reader)."""
    levels = (1 << bits) - 1
    arr = np.round(np.clip(image, 0.0, 1.0) * levels).astype(np.uint32)
    arr = (arr * 65535 // levels).astype(np.uint16)
    if not cv2.imwrite(str(path), arr):
        raise OSError(f"cannot write {path}")


def labels_string(effusion: bool) -> str:
    """PadChest-style label list."""
    return "['pleural effusion']" if effusion else "['normal']"


def patient_split(seed: int, patient_index: int) -> str:
    """Deterministic train/val/test split by patient."""
    u = np.random.default_rng([seed, patient_index, 7]).random()
    return "train" if u < SPLIT_P[0] else ("val" if u < SPLIT_P[0] + SPLIT_P[1] else "test")


def _mask_row(image_id: str, mask: np.ndarray, score: float = 1.0) -> list:
    r, lft = rle.encode_lungs(mask)
    return [image_id, score, r, lft, mask.shape[0], mask.shape[1]]


def _meta_row(image_id: str, st: Study, seed: int) -> list:
    p: StudyParents = st.parents
    year = 2014 + (st.patient_index + st.study_index) % 4
    return [image_id, 0, f"s{seed}-st{st.patient_index:06d}-{st.study_index}",
            f"s{seed}-p{st.patient_index:06d}", round(year - p.age), year * 10000 + 101,
            "M" if p.sex == "male" else "F", round(p.age, 1), "PA", MANUFACTURER[p.style],
            labels_string(p.effusion), patient_split(seed, st.patient_index), p.style, p.care,
            int(p.effusion), st.noise.effusion.side, round(st.noise.effusion.severity, 4),
            st.patient_index, st.study_index]


def _work(args: tuple) -> tuple[list, list, list, dict, float]:
    """Render and write a chunk of studies (runs in a worker process); the last item is
    the CPU seconds it used."""
    cpu0 = time.process_time()
    chunk, out, size, seed, with_cf = args
    out = Path(out)
    metas, golds, noises = [], [], []
    cfs: dict[str, list] = {k: [] for k in VIEW_KINDS}
    for idx, st in chunk:
        image_id = f"phantom_s{seed}_{idx:06d}.png"
        r = Renderer(st.noise)
        img, mask = r.render(st.parents, size)
        write_png16(out / "images" / image_id, img)
        metas.append(_meta_row(image_id, st, seed))
        golds.append(_mask_row(image_id, mask))
        noises.append(json.dumps({"ImageID": image_id, "parents": st.parents.to_dict(),
                                  "patient_index": st.patient_index,
                                  "noise": st.noise.to_dict()}, separators=(",", ":")))
        if with_cf:
            for kind, do in standard_dos(st.noise, st.parents).items():
                cimg, cmask = r.counterfactual(st.parents, do, size)
                write_png16(out / "counterfactuals" / kind / image_id, cimg)
                cfs[kind].append(_mask_row(image_id, cmask))
    return metas, golds, noises, cfs, time.process_time() - cpu0


def _write_csv(path: Path, header: list, rows: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


@lru_cache(maxsize=1)
def renderer_source_sha256() -> str:
    """SHA-256 (16 hex) over the phantom's source files and priors: the key every cache of
    rendered images carries. Computed once per process (the sources do not change while it
    runs)."""
    import hashlib

    from pcl_viewer.paths import resources_dir

    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    files = sorted(here.glob("*.py"))
    priors = resources_dir() / "priors"
    if priors.is_dir():
        files += sorted(p for p in priors.rglob("*") if p.is_file())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def renderer_version() -> dict:
    """What made the images: :func:`renderer_source_sha256`, and the git commit when run
    from a checkout, so a cached dataset can be matched to its renderer."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                cwd=Path(__file__).resolve().parent, text=True,
                                capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"source_sha256": renderer_source_sha256(), "commit": commit}


def generate(out: Path, n: int, size: int = 128, seed: int = 0, *, counterfactuals: bool = False,
             oversample: float = 1.0, styles: tuple[str, ...] = ("philips", "imagingdynamics"),
             severe: bool = False, studies_per_patient: int = 2, workers: int = 1,
             progress=None, regime: str | None = None) -> dict:
    """Sample and write ``n`` images; returns the summary written to ``dataset.json``.

    ``progress`` is an optional callable ``(done, total)``.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if counterfactuals:
        for k in VIEW_KINDS:
            (out / "counterfactuals" / k).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    regime = regime or DEFAULT_REGIME
    studies = sample_studies(n, seed, studies_per_patient=studies_per_patient,
                             oversample=oversample, styles=tuple(styles), severe=severe,
                             regime=regime)
    items = list(enumerate(studies))
    step = max(8, min(64, n // max(1, 4 * workers) or 8))
    jobs = [(items[i:i + step], str(out), size, seed, counterfactuals)
            for i in range(0, n, step)]
    metas, golds, noises = [], [], []
    cfs: dict[str, list] = {k: [] for k in VIEW_KINDS}
    cpu = [0.0]

    def collect(res):
        m, g, nz, c, used = res
        cpu[0] += used
        metas.extend(m)
        golds.extend(g)
        noises.extend(nz)
        for k in VIEW_KINDS:
            cfs[k].extend(c[k])
        if progress:
            progress(len(metas), n)

    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            for res in ex.map(_work, jobs):
                collect(res)
    else:
        for job in jobs:
            collect(_work(job))
    _write_csv(out / "padchest_phantom.csv", META_COLUMNS, metas)
    _write_csv(out / "gold_masks.csv", MASK_COLUMNS, golds)
    (out / "noise.jsonl").write_text("\n".join(noises) + "\n")
    if counterfactuals:
        for k in VIEW_KINDS:
            _write_csv(out / "counterfactuals" / f"gold_{k}.csv", MASK_COLUMNS, cfs[k])
    elapsed = time.perf_counter() - t0
    eff = [int(m[14]) for m in metas]
    summary = {
        "format": FORMAT, "version": 1, "phantom_version": PHANTOM_VERSION, "regime": regime,
        "n": n, "size": size, "seed": seed,
        "counterfactuals": counterfactuals, "effusion_oversample": oversample,
        "styles": list(styles), "severe": severe, "studies_per_patient": studies_per_patient,
        "n_patients": len({m[3] for m in metas}), "effusion_rate": float(np.mean(eff)),
        "seconds": round(elapsed, 2), "images_per_second": round(n / elapsed, 1),
        "images_per_second_incl_cf": round(n * (4 if counterfactuals else 1) / elapsed, 1),
        "workers": workers,
        "renderer": renderer_version(),
        "cpu_ms_per_image": round(1000 * cpu[0] / max(n, 1), 2),
        "images_per_cpu_second": round(n / max(cpu[0], 1e-9), 1),
    }
    (out / "dataset.json").write_text(json.dumps(summary, indent=1))
    return summary


def default_workers() -> int:
    """Worker processes for phantom generation: ``PCL_WORKERS`` if set, else at most 2
    (the 2-core development machine)."""
    env = os.environ.get("PCL_WORKERS", "").strip()
    if env:
        return max(1, int(env))
    return max(1, min(2, os.cpu_count() or 1))
