"""Counterfactual inference (docs/method.md §2) on a toy structural causal model, and model bundles.

Toy SCM at 32 px: a disc whose brightness is set by ``scanner`` (0.45 vs 0.85) on a
background also set by it, and a bright blob in the lower left when ``effusion`` is present;
disc position is exogenous noise. ``sex`` has no effect on the image.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pcl_viewer.models.bundle import BundleError, ModelBundle
from pcl_viewer.models.classifiers import AttributeClassifiers, ClassifierConfig
from pcl_viewer.models.counterfactual import CounterfactualModel, intervene
from pcl_viewer.models.hvae import HVAE, HVAEConfig
from pcl_viewer.parents import Parents
from pcl_viewer.train.cf import CFTrainConfig, TrainingData, export_bundle, train_cf

SIZE = 32
# The smoke HVAE shrunk to 32 px inputs (16 px working size) so training takes seconds.
TOY_HVAE = {"image_size": SIZE, "work_size": 16, "widths": (8, 16, 16), "blocks": (1, 1, 1),
            "latents": {4: 4, 8: 4}}


def toy_images(pa: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, 3)`` parents -> ``(N, 1, 32, 32)`` float32 images of the toy SCM."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.zeros((len(pa), 1, SIZE, SIZE), np.float32)
    for i, (scanner, _sex, effusion) in enumerate(pa):
        cx, cy = 16 + rng.uniform(-2, 2), 14 + rng.uniform(-2, 2)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < 7**2).astype(np.float32)
        img = 0.1 + 0.1 * scanner + disc * (0.35 + 0.4 * scanner)
        if effusion:
            img += 0.3 * (((xx - 7) ** 2 + (yy - 26) ** 2) < 4**2)
        out[i, 0] = np.clip(img, 0, 1)
    return out


def perturbed_toy_hvae(seed: int = 0) -> HVAE:
    """An untrained toy-size HVAE with every weight nudged off its initial value (zero-
    initialised layers included), so that every parent reaches the decoder."""
    torch.manual_seed(seed)
    hvae = HVAE(HVAEConfig(**TOY_HVAE, embed_dim=8, bottleneck=2))
    for p in hvae.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return hvae


def toy_data(n: int = 256, seed: int = 0) -> TrainingData:
    rng = np.random.default_rng(seed)
    pa = rng.integers(0, 2, (n, 3)).astype(np.float32)
    x = toy_images(pa, rng)
    return TrainingData(x[: n - 32], pa[: n - 32], x[n - 32:], pa[n - 32:], "toy")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_torch_thread):
    """A smoke-preset model overfitted for a few seconds on the toy SCM, exported as a bundle."""
    data = toy_data()
    cfg = CFTrainConfig(preset="smoke", steps=150, batch_size=16, lr=5e-3, warmup=10,
                        kl_warmup=50, ema_decay=0.9, cls_steps=60, cls_batch_size=32,
                        checkpoint_every=1000, hvae_overrides=TOY_HVAE)
    run_dir = tmp_path_factory.mktemp("run")
    run = train_cf(data, cfg, run_dir, progress=False)
    bundle = export_bundle(run, data, run_dir / "bundle", command="test")
    return data, bundle


def test_null_intervention_reproduces_the_image_and_the_mean_fits_after_overfit(trained):
    data, bundle = trained
    model = CounterfactualModel.from_bundle(bundle.path)
    x = torch.from_numpy(data.x_val)
    ab = model.abduct(x, data.pa_val)
    x_null = (ab.x + model.residual(ab, {})).clamp(0, 1)
    assert float((x_null - x).abs().mean()) < 1e-5  # composition, exact by construction
    # the decoder explains the toy images far better than their mean image does
    mean_image = torch.from_numpy(data.x_train.mean(axis=0, keepdims=True))
    assert float((ab.mu - x).abs().mean()) < 0.7 * float((mean_image - x).abs().mean())


def test_scanner_intervention_changes_brightness_and_sex_intervention_changes_little(trained):
    data, bundle = trained
    model = CounterfactualModel.from_bundle(bundle.path)
    keep = data.pa_val[:, 0] == 0  # imagingdynamics -> do(philips): the disc gets brighter
    x = torch.from_numpy(data.x_val[keep])
    ab = model.abduct(x, data.pa_val[keep])
    to_philips = model.residual(ab, {"scanner": "philips"})
    flip_sex = model.residual(ab, {"sex": "flip"})
    assert float(to_philips.mean()) > 0.05
    assert float(flip_sex.abs().mean()) < 0.5 * float(to_philips.abs().mean())
    half = model.residual(ab, {"scanner": "philips"}, strength=0.5)
    assert torch.allclose(half, 0.5 * to_philips, atol=1e-6)


def test_a_parent_the_decoder_ignores_has_a_zero_residual():
    hvae = perturbed_toy_hvae()
    hvae.parent_embed[0].weight.data[:, 1] = 0.0  # sex no longer reaches the decoder
    model = CounterfactualModel(hvae)
    x = torch.rand(4, 1, SIZE, SIZE)
    ab = model.abduct(x, Parents("philips", "female", "absent"))
    assert float(model.residual(ab, {"sex": "male"}).abs().max()) < 1e-6  # float rounding only
    assert float(model.residual(ab, {"scanner": "imagingdynamics"}).abs().max()) > 0.0


def test_standard_views_are_pixel_aligned_residuals_from_one_abduction():
    hvae = perturbed_toy_hvae()
    model = CounterfactualModel(hvae)
    x = torch.rand(2, 1, SIZE, SIZE) * 0.5 + 0.25
    pa = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    views = model.standard_views(x, pa)
    assert views.shape == (2, 3, 1, SIZE, SIZE)
    ab = model.abduct(x, pa)
    both = (x + model.residual(ab, {"scanner": "flip", "effusion": "flip"})).clamp(0, 1)
    assert torch.allclose(views[:, 2], both, atol=1e-5)
    assert torch.equal(intervene(pa, {"scanner": "flip"})[:, 0], 1 - pa[:, 0])


def test_a_bundle_holds_the_hvae_and_the_classifiers(trained):
    loaded = ModelBundle.load(trained[1].path)
    assert set(loaded.components) == {"hvae", "classifier"}


def test_a_bundle_card_records_the_parent_encoding_and_input_size(trained):
    card = ModelBundle.load(trained[1].path).card
    assert card["parents"]["scanner"]["encoding"] == {"imagingdynamics": 0, "philips": 1}
    assert card["input"]["size"] == SIZE


def test_a_bundle_loaded_twice_abducts_the_same(trained):
    data, bundle = trained
    x = torch.from_numpy(data.x_val[:4])
    a = CounterfactualModel.from_bundle(ModelBundle.load(bundle.path))
    b = CounterfactualModel.from_bundle(bundle.path)
    assert torch.equal(a.abduct(x, data.pa_val[:4]).mu, b.abduct(x, data.pa_val[:4]).mu)


def test_the_bundles_classifiers_give_a_probability_per_parent(trained):
    data, bundle = trained
    probs = CounterfactualModel.from_bundle(bundle.path).infer_parents(
        torch.from_numpy(data.x_val[:4]))
    assert set(probs) == {"scanner", "sex", "effusion"}
    assert all(((p >= 0) & (p <= 1)).all() for p in probs.values())


def test_the_bundles_classifiers_are_rebuilt_from_their_preset_config(trained):
    model = CounterfactualModel.from_bundle(trained[1].path)
    assert isinstance(model.classifier, AttributeClassifiers)
    assert model.classifier.cfg == ClassifierConfig.for_preset("smoke")


def test_tampered_weights_are_refused(trained, tmp_path):
    _, bundle = trained
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(bundle.path, copy)
    weights = copy / "hvae.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="sha256"):
        CounterfactualModel.from_bundle(copy)
    card = json.loads((copy / "card.json").read_text())
    assert card["components"]["hvae"]["file"] == "hvae.safetensors"
