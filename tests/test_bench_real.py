"""`pcl bench --data DIR` on a tiny folder in the real PadChest + CheXmask layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcl_viewer.data import rle

# One torch thread for the module (a `pcl bench` run sets its own --threads, 1 by
# default): on a shared 2-core machine more threads only spin (10x slower when loaded).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, SIZE, N_GOOD = 30, 64, 16


def _make_real_folder(root: Path, gold: bool = False) -> Path:
    """PadChest label CSV, CheXmask RLE CSV and 64 px PNGs under ``root/0/``: one image
    per patient; the first N_GOOD have CheXmask quality 0.95, the others 0.8; every third
    image has a pleural effusion. ``gold``: also a gold_masks.csv for images 20..29."""
    rng = np.random.default_rng(0)
    (root / "0").mkdir(parents=True)
    pad, chex, gold_rows = [], [], []
    for i in range(N):
        iid = f"img{i:03d}.png"
        mask = np.zeros((SIZE, SIZE), np.uint8)
        t, b = rng.integers(8, 14), rng.integers(46, 58)
        mask[t:b, 8:28], mask[t:b, 36:56] = 1, 2
        img = 0.7 - 0.4 * (mask > 0) + 0.05 * rng.standard_normal((SIZE, SIZE))
        cv2.imwrite(str(root / "0" / iid), (np.clip(img, 0, 1) * 255).astype(np.uint8))
        eff = i % 3 == 0
        pad.append({"ImageID": iid, "ImageDir": 0, "PatientID": f"pat{i}",
                    "PatientSex_DICOM": "M" if i % 2 else "F", "PatientBirth": 1950,
                    "StudyDate_DICOM": 20150101,
                    "Manufacturer_DICOM": "PhilipsMedicalSystems" if i % 2 else
                    "ImagingDynamicsCompanyLtd",
                    "Labels": "['pleural effusion']" if eff else "['normal']",
                    "Projection": "PA"})
        right, left = rle.encode_lungs(mask)
        row = {"ImageID": iid, "Right Lung": right, "Left Lung": left, "Height": SIZE,
               "Width": SIZE, "Dice RCA (Mean)": 0.95 if i < N_GOOD else 0.8}
        chex.append(row)
        if gold and i >= 20:
            gold_rows.append(row)
    for name, rows in (("padchest_labels.csv", pad), ("chexmask.csv", chex),
                       ("gold_masks.csv", gold_rows)):
        if rows:
            with open(root / name, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    return root


def test_real_split_evaluates_on_good_chexmask_or_gold_and_pools_the_other_patients(tmp_path):
    from pcl_viewer.data.dataset import load_dataset
    from pcl_viewer.evaluate.benchmark_inputs import real_split

    ds = load_dataset(_make_real_folder(tmp_path / "a"))
    ev, pool, ref = real_split(ds, n_eval=100)
    assert sorted(ev.tolist()) == list(range(N_GOOD)) and "CheXmask" in ref
    assert sorted(pool.tolist()) == list(range(N_GOOD, N))
    ev, pool, _ = real_split(ds, n_eval=5)  # at most n_eval patients
    assert len(ev) == 5 and len(pool) == N - 5
    pats = {ds.records[i].patient_id for i in ev}
    assert not pats & {ds.records[i].patient_id for i in pool}
    ds = load_dataset(_make_real_folder(tmp_path / "b", gold=True))
    ev, pool, ref = real_split(ds, n_eval=100)
    assert sorted(ev.tolist()) == list(range(20, N)) and "gold" in ref


def test_bench_runs_the_grid_on_a_real_folder_and_skips_the_oracle(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench
    from pcl_viewer.evaluate.benchmark import bench_preset
    from pcl_viewer.evaluate.benchmark_inputs import data_key

    folder = _make_real_folder(tmp_path / "padchest")
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--data", str(folder), "--cache",
                                   str(tmp_path / "cache"), "--out", str(tmp_path / "res"),
                                   "--rows", "none,vader,dvd-aug,s-mvd-cl-oracle",
                                   "--seeds", "0", "--threads", "1"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "skipped row s-mvd-cl-oracle: S-MVD-CL (oracle CF): real data have no true " \
           "counterfactuals" in r.output
    assert "note: the oracle row (true counterfactuals) is skipped on real data" in r.output
    preset = bench_preset("smoke")
    runs = tmp_path / "cache" / "runs" / "smoke" / data_key(folder)
    cells = sorted(runs.glob("cells/*/seed0/*.json"))
    assert {p.parent.parent.name for p in cells} == {"none", "vader", "dvd-aug"}
    assert len(cells) == 3 * preset.n_folds * len(preset.budgets)
    cell = json.loads(cells[0].read_text())
    assert f"{N_GOOD} evaluation images (CheXmask masks of quality >= 0.9" in cell["data"]
    assert cell["n_train"] + cell["n_test"] == N_GOOD or cell["budget"] != "all"
    assert set(cell["scores"]) <= {"overall", "nf", "pe"}  # no OOD sets on real data
    card = json.loads((runs / "dvd-aug" / "seed0" / "bundle" / "card.json").read_text())
    assert card["views"] == "real" and card["method"] == "dvd-cl"
    # the pool is the other patients' images: 14, all with CheXmask silver labels
    assert f"{N - N_GOOD} images" in card["training"]["data"]
    with open(tmp_path / "res" / "benchmark.csv") as fh:
        assert [row["method"] for row in csv.DictReader(fh)] == ["None", "VADeR", "DVD-aug"]


@pytest.mark.parametrize("few", [3])
def test_a_real_folder_too_small_for_the_folds_is_refused(tmp_path, few):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    folder = _make_real_folder(tmp_path / "p")
    with open(folder / "chexmask.csv") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        row["Dice RCA (Mean)"] = 0.95 if i < few else 0.5
    with open(folder / "chexmask.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = CliRunner().invoke(bench, ["--preset", "smoke", "--data", str(folder), "--cache",
                                   str(tmp_path / "c"), "--rows", "none", "--prepare"])
    assert r.exit_code == 1 and f"{few} images qualify for evaluation" in r.output
