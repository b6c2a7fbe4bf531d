"""Pre-computed counterfactual views: batched, cached in the dataset cache, same as direct calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_cf_model import SIZE, perturbed_toy_hvae, toy_data

from pcl_viewer.data import cf_views
from pcl_viewer.data.cf_views import load_views, precompute_views
from pcl_viewer.models.bundle import save_bundle
from pcl_viewer.models.counterfactual import CounterfactualModel
from pcl_viewer.parents import VIEW_KINDS


class _Record:
    def __init__(self, i: int) -> None:
        self.image_id = f"toy_{i:03d}.png"


class ToyDataset:
    """The slice of CXRDataset that the views need: records, cache_dir, arrays(size)."""

    def __init__(self, root: Path, n: int = 10) -> None:
        data = toy_data(n=n + 32)
        self.x, self.pa = data.x_train[:n], data.pa_train[:n]
        self.records = [_Record(i) for i in range(n)]
        self.root = root
        self.cache_dir = root / ".cache"
        self.true = np.repeat(self.x[:, None], len(VIEW_KINDS), axis=1)

    def arrays(self, size: int) -> dict:
        assert size == SIZE
        return {"image": self.x, "parents": self.pa, "true_cf": self.true}


def _bundle(path: Path):
    hvae = perturbed_toy_hvae()
    card = {"name": "toy", "kind": "counterfactual", "input": {"size": SIZE}}
    return save_bundle(path, card, {"hvae": ("hvae", {"hvae": hvae.cfg.to_dict()}, hvae)})


@pytest.fixture(scope="module")
def toy(tmp_path_factory, one_torch_thread):
    """A toy data set, a toy bundle and the model views loaded once (so cached)."""
    root = tmp_path_factory.mktemp("views")
    ds, bundle = ToyDataset(root / "data"), _bundle(root / "bundle")
    return ds, bundle, load_views(ds, "model", bundle)


def test_model_views_are_float32_in_view_kinds_order(toy):
    ds, _, views = toy
    assert (views.shape, views.dtype) == ((len(ds.x), len(VIEW_KINDS), 1, SIZE, SIZE), np.float32)


def test_model_views_are_written_to_one_cache_file(toy):
    ds, _, _ = toy
    assert len(list(ds.cache_dir.glob("cf_views_*.npy"))) == 1
    assert not [p for p in ds.cache_dir.iterdir() if p.name.startswith(".")]  # no temp left


def test_model_views_match_direct_inference(toy):
    ds, bundle, views = toy
    model = CounterfactualModel.from_bundle(bundle)
    direct = model.standard_views(torch.from_numpy(ds.x), ds.pa).numpy()
    np.testing.assert_allclose(views, direct, atol=1e-5)


def test_a_second_load_reads_the_cache(toy, monkeypatch):
    ds, bundle, views = toy
    monkeypatch.setattr(cf_views, "write_views", lambda *a, **k: pytest.fail("recomputed"))
    np.testing.assert_array_equal(load_views(ds, "model", bundle), views)


def test_ragged_batches_give_every_view(toy):
    ds, bundle, views = toy
    model = CounterfactualModel.from_bundle(bundle)
    assert precompute_views(ds, model, batch_size=3).shape == views.shape


def test_true_views_come_from_the_dataset(tmp_path):
    ds = ToyDataset(tmp_path / "data")
    assert load_views(ds, "true", size=SIZE) is ds.true
