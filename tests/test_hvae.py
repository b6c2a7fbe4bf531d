"""The conditional HVAE: shapes, likelihood, presets, and abduction round trips."""

from __future__ import annotations

import pytest
import torch

from pcl_viewer.models.hvae import HVAE, HVAEConfig, build_from_config, discretised_gaussian_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def smoke():
    """The smoke HVAE (seed 0), two images and their parents."""
    torch.manual_seed(0)
    model = HVAE(HVAEConfig.for_preset("smoke"))
    return model, torch.rand(2, 1, 64, 64), torch.tensor([[0, 1, 0], [1, 0, 1]],
                                                          dtype=torch.float32)


def test_forward_returns_a_finite_scalar_loss_and_a_nonnegative_kl(smoke):
    model, x, pa = smoke
    out = model(x, pa)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert float(out["kl"].detach()) >= 0.0


def test_forward_returns_the_mean_at_full_size(smoke):
    model, x, pa = smoke
    assert model(x, pa)["mu"].shape == (2, 1, 64, 64)


def test_abduction_gives_one_latent_per_latent_resolution(smoke):
    model, x, pa = smoke
    assert [z.shape for z in model.abduct(x, pa)["z"]] == [(2, 4, 4, 4), (2, 4, 8, 8)]


def test_decoding_gives_a_full_size_image(smoke):
    model, x, pa = smoke
    assert model.decode(model.abduct(x, pa), pa).shape == (2, 1, 64, 64)


def test_decode_modes_agree_under_factual_parents():
    torch.manual_seed(1)
    model = HVAE(HVAEConfig.for_preset("smoke"))
    for p in model.parameters():  # leave the zero-initialised state so the prior matters
        p.data.add_(0.05 * torch.randn_like(p))
    x, pa = torch.rand(3, 1, 64, 64), torch.tensor([[0, 1, 0], [1, 0, 1], [1, 1, 1]]).float()
    lat = model.abduct(x, pa)
    a = model.decode(lat, pa, mode="posterior")
    b = model.decode(lat, pa, mode="prior-relative")
    assert torch.allclose(a, b, atol=1e-5)


def test_discretised_gaussian_prefers_the_true_value():
    x = torch.tensor([[-0.5, 0.0, 0.5, 0.9]])
    near = discretised_gaussian_nll(x, x, 0.05)
    far = discretised_gaussian_nll(x, x + 0.3, 0.05)
    assert (near < far).all()
    assert torch.isfinite(discretised_gaussian_nll(x, x + 5.0, 0.01)).all()  # no log(0)


def test_config_round_trips_through_the_bundle_builder():
    cfg = HVAEConfig.for_preset("cpu")
    model = build_from_config({"hvae": cfg.to_dict()})
    assert model.cfg == cfg
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.slow
def test_paper_preset_builds_and_takes_one_step():
    torch.manual_seed(0)
    model = HVAE(HVAEConfig.for_preset("paper"))
    n_params = sum(p.numel() for p in model.parameters())
    assert 25e6 < n_params < 60e6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, pa = torch.rand(1, 1, 224, 224), torch.tensor([[1.0, 0.0, 1.0]])
    out = model(x, pa)
    out["loss"].backward()
    opt.step()
    assert torch.isfinite(out["loss"])
