"""What the benchmark grid consumes: its phantom data sets and each row's initialisation.

Data sets (generated once per preset under ``CACHE/data/<preset>/``, each with
its own seed, so no gold or OOD image is ever seen in pre-training):

- ``gold``: the evaluation set the folds are drawn from; one study per patient,
  effusion oversampled to about a third, both training scanners (seed 101);
- ``portable``: the held-out scanner style (seed 102);
- ``severe``: severe effusion, training scanners (seed 103);
- ``pool``: the pre-training pool with silver and gold labels (seed 100).

A real PadChest + CheXmask folder (``pcl bench --data DIR``, the layout
:func:`pcl_viewer.data.dataset.load_dataset` reads) replaces all of them
(:func:`real_sets`): the evaluation set is the images with a gold mask
(``gold_masks.csv``) or, without one, the images whose CheXmask quality is at
least :data:`REAL_EVAL_MIN_QUALITY` (CheXmask masks are then the reference), one
per patient; the pre-training pool is every image of the other patients, with
CheXmask as its silver labels. Real data have no OOD sets and no true
counterfactuals (the oracle row is skipped).

Rows are initialised by :class:`RowInitialiser`: random, a U-Net trained on the
pool's silver or gold labels, or a bundle of the contrastive pre-training
library; every result is cached under ``RUNS/<row>/seed<s>/bundle`` and reused
(``RUNS`` = ``CACHE/runs/<preset>/<data key>``, :func:`data_key`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np

from pcl_viewer.evaluate.benchmark import BenchPreset, BenchSets, Row, RowUnavailable

SEEDS = {"pool": 100, "gold": 101, "portable": 102, "severe": 103}
TRAINING_STYLES = ("imagingdynamics", "philips")
# Real data without gold masks: CheXmask masks at least this good are the reference.
REAL_EVAL_MIN_QUALITY = 0.9


def data_key(real: Path | None = None) -> str:
    """Name of one grid's data under ``CACHE/runs/<preset>/``: cells and pre-trainings
    of another phantom version, regime, renderer or real folder never mix with these.

    ``phantom-v<version>-<regime>-<renderer source hash, 8 hex>-<silver recipe>`` (the
    data sets are regenerated when the renderer or the silver segmenter changes, so the
    cells made on the old ones must not be reused), or ``real-<folder name>-<hash of its
    path>``.
    """
    if real is not None:
        path = str(Path(real).resolve())
        return f"real-{Path(real).name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"
    from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
    from pcl_viewer.data.phantom.generate import renderer_source_sha256
    from pcl_viewer.data.phantom.silver import SILVER_RECIPE

    renderer = renderer_source_sha256()[:8]
    return f"phantom-v{PHANTOM_VERSION}-{DEFAULT_REGIME}-{renderer}-{SILVER_RECIPE}"


def git_commit() -> str:
    """Short commit of the working tree (with ``-dirty`` when it has local changes).

    ``PCL_GIT_COMMIT`` overrides it, for copies of the tree without ``.git`` (a lent
    GPU machine gets the files, not the repository).
    """
    env = os.environ.get("PCL_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                "pcl_viewer"], capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def generate_phantom(root: Path, n: int, seed: int, size: int,
                     styles: list[str] | tuple[str, ...] = TRAINING_STYLES,
                     effusion_oversample: float = 1.0, severe: bool = False,
                     studies_per_patient: int = 1, true_cf: bool = False,
                     silver: bool = False, silver_steps: int = 800,
                     regime: str | None = None) -> Path:
    """Generate a phantom data set at ``root`` once (a ``.complete`` marker makes it reusable).

    ``silver``: also label it with the CheXmask-like silver segmenter (``pcl phantom silver``).
    ``regime``: the phantom's look (default :data:`pcl_viewer.data.phantom.DEFAULT_REGIME`).
    The marker names the phantom version, regime and renderer source hash, so a set
    rendered by another version, regime or renderer is generated again, not reused.
    """
    from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
    from pcl_viewer.data.phantom.generate import default_workers, generate, renderer_source_sha256

    root = Path(root)
    regime = regime or DEFAULT_REGIME
    # the renderer's source hash too: an edited renderer never reuses stale images
    marker = (f"phantom_version={PHANTOM_VERSION} regime={regime} "
              f"renderer={renderer_source_sha256()}")
    if silver:  # and the silver recipe: a pool labelled by an older silver segmenter is redone
        from pcl_viewer.data.phantom.silver import SILVER_RECIPE

        marker += f" silver={SILVER_RECIPE} silver_steps={silver_steps}"
    marker += "\n"
    if (root / ".complete").is_file() and (root / ".complete").read_text() == marker:
        return root
    if root.exists():
        shutil.rmtree(root)
    generate(root, n, size, seed, counterfactuals=true_cf, oversample=effusion_oversample,
             styles=tuple(styles), severe=severe, studies_per_patient=studies_per_patient,
             workers=default_workers(), regime=regime)
    if silver:
        from pcl_viewer.data.phantom.silver import make_silver

        # runs with its own thread count and restores ours
        make_silver(root, seed=seed, steps=silver_steps, echo=lambda *a, **k: None)
    (root / ".complete").write_text(marker)
    return root


def load_arrays(root, size: int) -> dict[str, np.ndarray]:
    """image ``(N,1,S,S)``, gold ``(N,S,S)``, silver (if any), effusion ``(N,)``, patients.

    ``root``: a dataset folder or a loaded ``CXRDataset`` (e.g. a subset).
    """
    from pcl_viewer.data.dataset import CXRDataset, load_dataset

    ds = root if isinstance(root, CXRDataset) else load_dataset(root)
    arr = dict(ds.arrays(size))
    arr["effusion"] = np.array([r.effusion for r in ds.records], bool)
    arr["patients"] = np.array([str(r.patient_id) for r in ds.records])
    return arr


def bench_sets(preset: BenchPreset, data_root: Path) -> BenchSets:
    """Generate (once) and load the gold and OOD sets of ``preset``."""
    s = preset.image_size
    gold = generate_phantom(data_root / "gold", preset.gold_n, SEEDS["gold"], s,
                            effusion_oversample=18.0)
    port = generate_phantom(data_root / "portable", preset.ood_n, SEEDS["portable"], s,
                            styles=("portable",), effusion_oversample=6.0)
    sev = generate_phantom(data_root / "severe", preset.ood_n, SEEDS["severe"], s,
                           effusion_oversample=1000.0, severe=True)
    g = load_arrays(gold, s)
    ood = {}
    for name, root in (("portable", port), ("severe", sev)):
        a = load_arrays(root, s)
        ood[name] = (a["image"], a["gold"])
    return BenchSets(g["image"], g["gold"], g["effusion"], g["patients"], ood,
                     description=data_key())


def real_split(ds, n_eval: int, seed: int = SEEDS["gold"]) -> tuple[np.ndarray, np.ndarray, str]:
    """(evaluation indices, pre-training pool indices, reference) of a real folder.

    Evaluation: one image per patient among the images with a gold mask, or (no gold
    masks) with a CheXmask quality >= :data:`REAL_EVAL_MIN_QUALITY`; at most ``n_eval``
    patients drawn with ``seed``. Pool: every image of every other patient.
    """
    n = len(ds)
    # Membership in the gold table, not gold_mask(i): decoding every RLE of a large
    # folder only to test for presence would take minutes.
    gold_ids = getattr(ds, "_gold", {}) or {}
    has_gold = np.array([r.image_id in gold_ids for r in ds.records], bool)
    if has_gold.any():
        eligible, reference = has_gold, "gold masks (gold_masks.csv)"
    else:
        q = np.array([np.nan if r.silver_quality is None else r.silver_quality
                      for r in ds.records], float)
        eligible = q >= REAL_EVAL_MIN_QUALITY
        reference = f"CheXmask masks of quality >= {REAL_EVAL_MIN_QUALITY} (no gold masks)"
    patients = np.array([str(r.patient_id) for r in ds.records])
    rng = np.random.default_rng(seed)
    first: dict[str, int] = {}
    for i in rng.permutation(np.flatnonzero(eligible)):
        first.setdefault(patients[i], int(i))
    chosen = list(first.values())[:n_eval]
    eval_patients = set(patients[chosen])
    pool = np.array([i for i in range(n) if patients[i] not in eval_patients], int)
    return np.sort(np.array(chosen, int)), pool, reference


def real_sets(preset: BenchPreset, folder: Path) -> tuple[BenchSets, object]:
    """The evaluation set of a real folder and its pre-training pool (a ``CXRDataset``)."""
    from pcl_viewer.data.dataset import load_dataset

    ds = load_dataset(folder)
    eval_idx, pool_idx, reference = real_split(ds, preset.gold_n)
    if len(eval_idx) < 2 * preset.n_folds:
        raise ValueError(f"{folder}: {len(eval_idx)} images qualify for evaluation "
                         f"({reference}); the {preset.n_folds}-fold benchmark needs at least "
                         f"{2 * preset.n_folds}")
    a = load_arrays(ds.subset(eval_idx), preset.image_size)
    masks = a["gold"] if "gold" in a else a["silver"]
    desc = (f"{data_key(folder)}: {len(eval_idx)} evaluation images ({reference}), "
            f"pool {len(pool_idx)}")
    return (BenchSets(a["image"], masks, a["effusion"], a["patients"], {}, description=desc),
            ds.subset(pool_idx))


class RowInitialiser:
    """Callable ``row -> bundle path | None``: the starting weights of a row, cached.

    Raises :class:`RowUnavailable` when a row cannot be initialised here (no
    counterfactual model for model views): the grid skips that row and says so.
    """

    def __init__(self, preset: BenchPreset, data_root: Path, runs: Path,
                 cf_bundle: str | None = None, real_pool=None) -> None:
        """``real_pool``: the pre-training pool of a real folder (a ``CXRDataset``), in
        place of the generated phantom pool."""
        self.preset, self.data_root, self.runs, self.cf_bundle = preset, data_root, runs, cf_bundle
        self.real_pool = real_pool
        self._data: dict = {}

    def pool(self) -> Path:
        """The pool's folder (the real folder for real data)."""
        if self.real_pool is not None:
            return Path(self.real_pool.root)
        return generate_phantom(self.data_root / "pool", self.preset.pool_n, SEEDS["pool"],
                                self.preset.image_size, effusion_oversample=4.0,
                                studies_per_patient=2, true_cf=True, silver=True,
                                silver_steps=self.preset.silver_steps)

    def pool_dataset(self):
        """The pool as a ``CXRDataset`` (a subset of the real folder for real data)."""
        from pcl_viewer.data.dataset import load_dataset

        return self.real_pool if self.real_pool is not None else load_dataset(self.pool())

    def run_dir(self, row: Row, seed: int) -> Path:
        """``RUNS/<row>/seed<s>``: the row's pre-training run of one seed."""
        return self.runs / row.slug / f"seed{seed}"

    def __call__(self, row: Row, seed: int = 0) -> Path | None:
        if row.kind == "none":
            return None
        if row.views == "true" and self.real_pool is not None:
            raise RowUnavailable(f"{row.name}: real data have no true counterfactuals "
                                 "(the oracle row runs on the phantom only)")
        out = self.run_dir(row, seed) / "bundle"
        if (out / "card.json").is_file() and any(out.glob("*.safetensors")):
            self.check_cf_views(row, seed)
            return out
        if row.kind == "segmentation":
            return self._segmentation(row, out, seed)
        return self._pretrain(row, out, seed)

    def _segmentation(self, row: Row, out: Path, seed: int = 0) -> Path:
        """The "Segmentation (silver/gold)" rows: a U-Net trained on the pool's labels
        (the pre-training seed is the seed of that training)."""
        from pcl_viewer.train.finetune import finetune, save_segmentation_bundle

        arr = load_arrays(self.pool_dataset(), self.preset.image_size)
        masks = arr.get(row.labels)
        if masks is None:
            raise RuntimeError(f"the pool has no {row.labels} labels for row {row.name!r}")
        keep = np.ones(len(masks), bool)
        if row.labels == "silver" and "has_silver" in arr:
            # The CheXmask-style quality filter, as the pre-training library applies it.
            keep = arr["has_silver"].astype(bool)
            q = arr.get("silver_quality")
            if q is not None:
                keep &= ~(q <= self.preset.silver_min_quality)
        cfg = replace(self.preset.seg_pretrain, seed=self.preset.seg_pretrain.seed + seed)
        model, log = finetune(arr["image"][keep], masks[keep], self.preset.unet_config(), cfg)
        save_segmentation_bundle(out, model, {
            "name": f"bench-{self.preset.name}-{row.slug}", "version": "0",
            "kind": "pretrained",
            "training": {"command": f"pcl bench --preset {self.preset.name} (row {row.slug})",
                         "seed": cfg.seed, "data": str(self.pool()),
                         "labels": row.labels, "log": log},
        })
        return out

    def _pretrain(self, row: Row, out: Path, seed: int = 0) -> Path:
        """Contrastive rows: the pre-training library, in this process; resumes its run."""
        from pcl_viewer.train.pretrain import METHODS, PretrainConfig, PretrainData, pretrain

        views = row.views or ("model" if self.real_pool is not None else "true")
        need_cf = METHODS[row.method].views != "real" and row.augment and views != "real"
        if need_cf and views == "model" and not self.has_cf_model():
            raise RowUnavailable(f"{row.name}: no counterfactual model bundle for model views "
                                 f"at {self.preset.image_size} px")
        cfg = PretrainConfig.for_preset(self.preset.name, method=row.method, dagger=not row.augment,
                                        views=views, seed=seed, **self.preset.pretrain_options)
        key = (views, need_cf)
        if key not in self._data:
            self._data[key] = PretrainData.from_dataset(
                self.pool_dataset(), self.preset.image_size, views=views, bundle=self.cf_bundle,
                need_counterfactuals=need_cf, min_quality=self.preset.silver_min_quality)
        command = (f"pcl pretrain --method {row.method}{'' if row.augment else ' --dagger'} "
                   f"--views {views} --data {self.pool()} --preset {self.preset.name} "
                   f"--seed {seed} --out {out.parent}  # via pcl bench, options "
                   f"{self.preset.pretrain_options}")
        pretrain(cfg, self._data[key], out.parent, command=command, progress=False,
                 echo=lambda *a, **k: None)
        if not (out / "card.json").is_file():
            raise RuntimeError(f"pre-training of {row.name!r} wrote no bundle at {out}")
        if need_cf and views == "model":
            (out.parent / "cf_bundle.txt").write_text(self._cf_fingerprint() + "\n")
        return out

    def _cf_fingerprint(self) -> str:
        from pcl_viewer.models.bundle import ModelBundle, find_bundle

        return ModelBundle.load(find_bundle(self.cf_bundle or "cf-cpu")).fingerprint

    def check_cf_views(self, row: Row, seed: int = 0) -> None:
        """Refuse a cached model-view pre-training made with another counterfactual model.

        Its cells would mix two CF models in one table; delete ``RUNS/<row>`` and
        ``RUNS/cells/<row>`` to redo the row with the current model.
        """
        stamp = self.run_dir(row, seed) / "cf_bundle.txt"
        if row.views == "model" and stamp.is_file() and self.has_cf_model():
            old, now = stamp.read_text().strip(), self._cf_fingerprint()
            if old != now:
                raise RowUnavailable(f"{row.name}: pre-trained with CF model {old}, the current "
                                     f"one is {now}; delete {self.runs / row.slug} and its cells")

    def has_cf_model(self) -> bool:
        """A counterfactual bundle exists and works at this preset's image size."""
        from pcl_viewer.models.bundle import BundleError, ModelBundle, find_bundle

        try:
            card = ModelBundle.load(find_bundle(self.cf_bundle or "cf-cpu")).card
        except BundleError:
            return False
        size = card.get("input", {}).get("size")
        return size is None or int(size) == self.preset.image_size
