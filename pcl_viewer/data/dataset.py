"""Datasets: the phantom layout and real PadChest + CheXmask, behind one interface.

``load_dataset(root)`` auto-detects the layout:

- phantom: ``root/dataset.json`` with ``"format": "pcl-phantom"`` (see
  :mod:`pcl_viewer.data.phantom.generate`);
- real: a PadChest label CSV (``ImageID, ImageDir, PatientID, PatientSex_DICOM,
  PatientBirth, StudyDate_DICOM, Manufacturer_DICOM, Labels, Projection``; PA rows
  are kept) and optionally a CheXmask CSV (``ImageID, Right Lung, Left Lung,
  Height, Width, Dice RCA (Mean)``) giving the silver masks. Images are looked
  up at ``root/<ImageDir>/<ImageID>``, then ``root/images/<ImageID>``, then
  ``root/<ImageID>``.

``ds.arrays(size)`` caches stacked arrays as ``.npz`` (no pickle) under
``root/.cache``.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pcl_viewer.data import rle
from pcl_viewer.data.preprocess import to_model
from pcl_viewer.parents import VIEW_KINDS, Parents

MANUFACTURER_STYLE = {"PhilipsMedicalSystems": "philips",
                      "ImagingDynamicsCompanyLtd": "imagingdynamics",
                      "PortablePhantomDR": "portable"}
PADCHEST_REQUIRED = {"ImageID", "PatientID", "PatientSex_DICOM", "Manufacturer_DICOM",
                     "Labels", "Projection"}
CHEXMASK_REQUIRED = {"ImageID", "Right Lung", "Left Lung", "Height", "Width"}


@dataclass
class Record:
    """One image of a dataset (``age`` in years, NaN if unknown)."""

    image_id: str
    patient_id: str
    path: Path
    style: str
    sex: str
    age: float
    effusion: bool
    labels: list[str]
    split: str
    silver_quality: float | None = None
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def parents(self) -> Parents:
        """The model's parents; ValueError for styles other than the two scanners."""
        return Parents(scanner=self.style, sex=self.sex,
                       effusion="present" if self.effusion else "absent")


def read_image(path: Path) -> np.ndarray:
    """8/16-bit grey PNG/JPEG -> ``(H, W)`` float32 in [0, 1]."""
    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY)
    scale = 65535.0 if arr.dtype == np.uint16 else 255.0
    return (arr.astype(np.float32) / scale).clip(0.0, 1.0)


def _parse_labels(value) -> list[str]:
    if not isinstance(value, str) or not value.strip():
        return []
    try:
        out = ast.literal_eval(value)
        return [str(v).strip() for v in out] if isinstance(out, list | tuple) else [str(out)]
    except (ValueError, SyntaxError):
        return [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip()]


def _read_masks(path: Path) -> dict[str, tuple]:
    """ImageID -> (right RLE, left RLE, H, W, score) of a CheXmask-style CSV."""
    import pandas as pd

    if not path.is_file():
        return {}
    df = pd.read_csv(path)
    score = df["Dice RCA (Mean)"] if "Dice RCA (Mean)" in df else pd.Series(np.nan, df.index)
    return {iid: (r, lf, int(h), int(w), float(s)) for iid, r, lf, h, w, s in zip(
        df.ImageID, df["Right Lung"], df["Left Lung"], df.Height, df.Width, score)}


class CXRDataset:
    """A list of :class:`Record` with images, gold/silver masks and true counterfactuals."""

    def __init__(self, root: Path, records: list[Record], kind: str,
                 gold: dict, silver: dict, cf_gold: dict[str, dict]) -> None:
        self.root = Path(root)
        self.records = records
        self.kind = kind
        self._gold = gold
        self._silver = silver
        self._cf_gold = cf_gold

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return f"CXRDataset({self.kind}, n={len(self)}, root={self.root})"

    @property
    def cache_dir(self) -> Path:
        return self.root / ".cache"

    @property
    def provenance(self) -> dict:
        """What made a phantom folder (``dataset.json``: phantom version, regime, seed,
        renderer hash); empty for real data. Part of every array-cache key."""
        f = self.root / "dataset.json"
        if self.kind != "phantom" or not f.is_file():
            return {}
        d = json.loads(f.read_text())
        return {"phantom_version": d.get("phantom_version", 1), "regime": d.get("regime", "easy"),
                "seed": d.get("seed"), "renderer": d.get("renderer")}

    def image(self, i: int) -> np.ndarray:
        """``(H, W)`` float32 in [0, 1]."""
        return read_image(self.records[i].path)

    def _mask(self, table: dict, i: int) -> np.ndarray | None:
        row = table.get(self.records[i].image_id)
        if row is None:
            return None
        return rle.decode_lungs(row[0], row[1], row[2], row[3])

    def gold_mask(self, i: int) -> np.ndarray | None:
        """``(H, W)`` uint8 0/1/2 or None."""
        return self._mask(self._gold, i)

    def silver_mask(self, i: int) -> np.ndarray | None:
        """``(H, W)`` uint8 0/1/2 or None (no silver mask for this image)."""
        return self._mask(self._silver, i)

    def true_counterfactual(self, i: int, kind: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(image, gold mask)`` of the true counterfactual ``kind``, or None."""
        if kind not in VIEW_KINDS:
            raise ValueError(f"kind must be one of {VIEW_KINDS}")
        rec = self.records[i]
        path = self.root / "counterfactuals" / kind / rec.image_id
        if not path.is_file():
            return None
        mask = self._mask(self._cf_gold.get(kind, {}), i)
        return read_image(path), mask

    @property
    def has_counterfactuals(self) -> bool:
        return bool(self.records) and (self.root / "counterfactuals" / "both" /
                                       self.records[0].image_id).is_file()

    def subset(self, indices) -> CXRDataset:
        """A dataset view on ``indices`` (shares root, masks and cache)."""
        recs = [self.records[int(i)] for i in indices]
        return CXRDataset(self.root, recs, self.kind, self._gold, self._silver, self._cf_gold)

    def parents_array(self) -> np.ndarray:
        """``(N, 3)`` float32 parents; the scanner is NaN for other styles (portable)."""
        out = np.zeros((len(self), 3), np.float32)
        for i, r in enumerate(self.records):
            out[i, 0] = {"imagingdynamics": 0.0, "philips": 1.0}.get(r.style, np.nan)
            out[i, 1] = 1.0 if r.sex == "male" else 0.0
            out[i, 2] = 1.0 if r.effusion else 0.0
        return out

    def arrays(self, size: int) -> dict[str, np.ndarray]:
        """Stacked arrays at ``size`` (cached ``.npz``, loaded without pickle).

        Non-square scans are mapped as :func:`pcl_viewer.data.preprocess.to_model` does
        (centred square padding, then resize); masks the same way, nearest neighbour.

        Keys: ``image (N,1,S,S) float32``; ``gold (N,S,S) uint8`` when every image has
        one; ``silver (N,S,S) uint8`` + ``silver_quality (N,)`` (NaN: none) +
        ``has_silver (N,) bool`` when any; ``parents (N,3) float32``;
        ``true_cf (N,3,1,S,S) float32`` (order scanner, effusion, both) when present.
        """
        ids = "\n".join(r.image_id for r in self.records)
        made = json.dumps(self.provenance, sort_keys=True)  # another renderer -> another key
        key = hashlib.sha1(f"{self.kind}|{size}|{made}|{ids}".encode()).hexdigest()[:16]
        path = self.cache_dir / f"arrays_{size}_{key}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        out = self._build_arrays(size)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        from pcl_viewer.atomic import atomic_writer

        with atomic_writer(path, "wb") as fh:  # unique temp name: concurrent loaders never collide
            np.savez(fh, **out)
        return out

    def _build_arrays(self, size: int) -> dict[str, np.ndarray]:
        n = len(self)

        def img_at(a: np.ndarray) -> np.ndarray:
            return a if a.shape == (size, size) else to_model(a, size)[0]

        def mask_at(m: np.ndarray) -> np.ndarray:
            """Same geometry as :func:`to_model` (centred square padding), nearest."""
            if m.shape == (size, size):
                return m
            h, w = m.shape
            side = max(h, w)
            sq = np.zeros((side, side), np.uint8)
            top, left = (side - h) // 2, (side - w) // 2
            sq[top:top + h, left:left + w] = m
            return cv2.resize(sq, (size, size), interpolation=cv2.INTER_NEAREST)

        out: dict[str, np.ndarray] = {
            "image": np.zeros((n, 1, size, size), np.float32),
            "parents": self.parents_array(),
        }
        gold = np.zeros((n, size, size), np.uint8)
        silver = np.zeros((n, size, size), np.uint8)
        has_gold = np.zeros(n, bool)
        has_silver = np.zeros(n, bool)
        quality = np.full(n, np.nan, np.float32)
        for i in range(n):
            out["image"][i, 0] = img_at(self.image(i))
            g = self.gold_mask(i)
            if g is not None:
                gold[i], has_gold[i] = mask_at(g), True
            s = self.silver_mask(i)
            if s is not None:
                silver[i], has_silver[i] = mask_at(s), True
                q = self.records[i].silver_quality
                quality[i] = np.nan if q is None else q
        if n and has_gold.all():
            out["gold"] = gold
        if has_silver.any():
            out["silver"], out["has_silver"], out["silver_quality"] = silver, has_silver, quality
        if self.has_counterfactuals:
            cf = np.zeros((n, 3, 1, size, size), np.float32)
            for i in range(n):
                for k, kind in enumerate(VIEW_KINDS):
                    res = self.true_counterfactual(i, kind)
                    if res is not None:
                        cf[i, k, 0] = img_at(res[0])
            out["true_cf"] = cf
        return out


def _load_phantom(root: Path) -> CXRDataset:
    import pandas as pd

    df = pd.read_csv(root / "padchest_phantom.csv")
    silver = _read_masks(root / "silver_masks.csv")
    records = []
    for row in df.itertuples(index=False):
        s = silver.get(row.ImageID)
        records.append(Record(
            image_id=row.ImageID, patient_id=str(row.PatientID),
            path=root / "images" / row.ImageID, style=str(row.style),
            sex="male" if row.PatientSex_DICOM == "M" else "female", age=float(row.PatientAge),
            effusion=bool(row.effusion), labels=_parse_labels(row.Labels), split=str(row.split),
            silver_quality=None if s is None else s[4],
            extra={"care": row.care, "effusion_side": row.effusion_side,
                   "effusion_severity": float(row.effusion_severity)}))
    cf_gold = {k: _read_masks(root / "counterfactuals" / f"gold_{k}.csv") for k in VIEW_KINDS}
    return CXRDataset(root, records, "phantom", _read_masks(root / "gold_masks.csv"),
                      silver, cf_gold)


def _find_csvs(root: Path) -> tuple[Path | None, Path | None]:
    import pandas as pd

    padchest = chexmask = None
    for path in sorted(list(root.glob("*.csv")) + list(root.glob("*.csv.gz"))):
        cols = set(pd.read_csv(path, nrows=0).columns)
        if padchest is None and PADCHEST_REQUIRED <= cols:
            padchest = path
        elif chexmask is None and CHEXMASK_REQUIRED <= cols:
            chexmask = path
    return padchest, chexmask


def _resolve_image(root: Path, image_dir, image_id: str) -> Path:
    cands = []
    if image_dir is not None and not (isinstance(image_dir, float) and np.isnan(image_dir)):
        d = str(int(image_dir)) if isinstance(image_dir, float) else str(image_dir)
        cands.append(root / d / image_id)
    cands += [root / "images" / image_id, root / image_id]
    return next((c for c in cands if c.is_file()), cands[0])


def _load_real(root: Path, padchest: Path, chexmask: Path | None) -> CXRDataset:
    import pandas as pd

    df = pd.read_csv(padchest, low_memory=False)
    df = df[df.Projection == "PA"]
    silver = _read_masks(chexmask) if chexmask else {}
    gold = _read_masks(root / "gold_masks.csv")
    records = []
    for row in df.to_dict("records"):
        iid = row["ImageID"]
        try:
            age = float(str(row.get("StudyDate_DICOM"))[:4]) - float(row.get("PatientBirth"))
        except (TypeError, ValueError):
            age = float("nan")
        manu = str(row.get("Manufacturer_DICOM"))
        labels = _parse_labels(row.get("Labels"))
        s = silver.get(iid)
        records.append(Record(
            image_id=iid, patient_id=str(row["PatientID"]),
            path=_resolve_image(root, row.get("ImageDir"), iid),
            style=MANUFACTURER_STYLE.get(manu, manu.lower()),
            sex="male" if row["PatientSex_DICOM"] == "M" else "female", age=age,
            effusion="pleural effusion" in labels, labels=labels,
            split=str(row.get("split", "train")) if "split" in row else "train",
            silver_quality=None if s is None else s[4]))
    return CXRDataset(root, records, "padchest", gold, silver, {})


def load_dataset(root: str | Path) -> CXRDataset:
    """Load a phantom dataset or a real PadChest (+ CheXmask) folder; see module docstring."""
    root = Path(root)
    meta = root / "dataset.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        if info.get("format") == "pcl-phantom":
            return _load_phantom(root)
    padchest, chexmask = _find_csvs(root)
    if padchest is None:
        raise FileNotFoundError(
            f"{root}: neither a phantom dataset (dataset.json) nor a PadChest CSV with "
            f"columns {sorted(PADCHEST_REQUIRED)}")
    return _load_real(root, padchest, chexmask)
