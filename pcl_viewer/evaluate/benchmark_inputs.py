"""What the benchmark grid consumes: its phantom data sets and each row's initialisation.

Data sets (generated once per preset under ``CACHE/data/<preset>/``, each with
its own seed, so no gold or OOD image is ever seen in pre-training):

- ``gold``: the evaluation set the folds are drawn from; one study per patient,
  effusion oversampled to about a third, both training scanners (seed 101);
- ``portable``: the held-out scanner style (seed 102);
- ``severe``: severe effusion, training scanners (seed 103);
- ``pool``: the pre-training pool with silver and gold labels (seed 100).

Rows are initialised by :class:`RowInitialiser`: random, a U-Net trained on the
pool's silver or gold labels, or a bundle of the contrastive pre-training
library; every result is cached under ``CACHE/runs/<preset>/<row>/bundle`` and
reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from pcl_viewer.evaluate.benchmark import BenchPreset, BenchSets, Row, RowUnavailable

SEEDS = {"pool": 100, "gold": 101, "portable": 102, "severe": 103}
TRAINING_STYLES = ("imagingdynamics", "philips")


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
                     silver: bool = False, silver_steps: int = 150,
                     regime: str | None = None) -> Path:
    """Generate a phantom data set at ``root`` once (a ``.complete`` marker makes it reusable).

    ``silver``: also label it with the CheXmask-like silver segmenter (``pcl phantom silver``).
    ``regime``: the phantom's look (default :data:`pcl_viewer.data.phantom.DEFAULT_REGIME`).
    The marker names the phantom version and regime, so a set rendered by another
    version or regime is generated again rather than reused.
    """
    from pcl_viewer.data.phantom import DEFAULT_REGIME, PHANTOM_VERSION
    from pcl_viewer.data.phantom.generate import default_workers, generate

    root = Path(root)
    regime = regime or DEFAULT_REGIME
    marker = f"phantom_version={PHANTOM_VERSION} regime={regime}\n"
    if (root / ".complete").is_file() and (root / ".complete").read_text() == marker:
        return root
    if root.exists():
        shutil.rmtree(root)
    generate(root, n, size, seed, counterfactuals=true_cf, oversample=effusion_oversample,
             styles=tuple(styles), severe=severe, studies_per_patient=studies_per_patient,
             workers=default_workers(), regime=regime)
    if silver:
        import torch

        from pcl_viewer.data.phantom.silver import make_silver

        threads = torch.get_num_threads()  # make_silver sets its own thread count
        make_silver(root, seed=seed, steps=silver_steps, echo=lambda *a, **k: None)
        torch.set_num_threads(threads)
    (root / ".complete").write_text(marker)
    return root


def load_arrays(root: Path, size: int) -> dict[str, np.ndarray]:
    """image ``(N,1,S,S)``, gold ``(N,S,S)``, silver (if any), effusion ``(N,)``, patients."""
    from pcl_viewer.data.dataset import load_dataset

    ds = load_dataset(root)
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
    return BenchSets(g["image"], g["gold"], g["effusion"], g["patients"], ood)


class RowInitialiser:
    """Callable ``row -> bundle path | None``: the starting weights of a row, cached.

    Raises :class:`RowUnavailable` when a row cannot be initialised here (no
    counterfactual model for model views): the grid skips that row and says so.
    """

    def __init__(self, preset: BenchPreset, data_root: Path, runs: Path,
                 cf_bundle: str | None = None) -> None:
        self.preset, self.data_root, self.runs, self.cf_bundle = preset, data_root, runs, cf_bundle
        self._data: dict = {}

    def pool(self) -> Path:
        return generate_phantom(self.data_root / "pool", self.preset.pool_n, SEEDS["pool"],
                                self.preset.image_size, effusion_oversample=4.0,
                                studies_per_patient=2, true_cf=True, silver=True,
                                silver_steps=self.preset.silver_steps)

    def __call__(self, row: Row) -> Path | None:
        if row.kind == "none":
            return None
        out = self.runs / row.slug / "bundle"
        if (out / "card.json").is_file() and any(out.glob("*.safetensors")):
            self.check_cf_views(row)
            return out
        if row.kind == "segmentation":
            return self._segmentation(row, out)
        return self._pretrain(row, out)

    def _segmentation(self, row: Row, out: Path) -> Path:
        """The "Segmentation (silver/gold)" rows: a U-Net trained on the pool's labels."""
        from pcl_viewer.train.finetune import finetune, save_segmentation_bundle

        arr = load_arrays(self.pool(), self.preset.image_size)
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
        model, log = finetune(arr["image"][keep], masks[keep], self.preset.unet_config(),
                              self.preset.seg_pretrain)
        save_segmentation_bundle(out, model, {
            "name": f"bench-{self.preset.name}-{row.slug}", "version": "0",
            "kind": "pretrained",
            "training": {"command": f"pcl bench --preset {self.preset.name} (row {row.slug})",
                         "seed": self.preset.seg_pretrain.seed, "data": str(self.pool()),
                         "labels": row.labels, "log": log},
        })
        return out

    def _pretrain(self, row: Row, out: Path) -> Path:
        """Contrastive rows: the pre-training library, in this process; resumes its run."""
        from pcl_viewer.train.pretrain import METHODS, PretrainConfig, PretrainData, pretrain

        views = row.views or "true"
        need_cf = METHODS[row.method].views != "real" and row.augment
        if need_cf and views == "model" and not self.has_cf_model():
            raise RowUnavailable(f"{row.name}: no counterfactual model bundle for model views "
                                 f"at {self.preset.image_size} px")
        cfg = PretrainConfig.for_preset(self.preset.name, method=row.method, dagger=not row.augment,
                                        views=views, **self.preset.pretrain_options)
        key = (views, need_cf)
        if key not in self._data:
            self._data[key] = PretrainData.from_dataset(
                self.pool(), self.preset.image_size, views=views, bundle=self.cf_bundle,
                need_counterfactuals=need_cf, min_quality=self.preset.silver_min_quality)
        command = (f"pcl pretrain --method {row.method}{'' if row.augment else ' --dagger'} "
                   f"--views {views} --data {self.pool()} --preset {self.preset.name} "
                   f"--out {out.parent}  # via pcl bench, options {self.preset.pretrain_options}")
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

    def check_cf_views(self, row: Row) -> None:
        """Refuse a cached model-view pre-training made with another counterfactual model.

        Its cells would mix two CF models in one table; delete ``runs/<preset>/<row>`` and
        ``cells/<row>`` to redo the row with the current model.
        """
        stamp = self.runs / row.slug / "cf_bundle.txt"
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
