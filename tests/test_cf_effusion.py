"""Region-aware effusion metrics and the effusion-noise latent of the HVAE.

The metrics are checked on synthetic images where the answer is known: a "fluid" blob at
the base of one image half, and model counterfactuals that put it in the right place, the
mirrored place, or nowhere.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pcl_viewer.evaluate.cf_quality import (
    acceptance,
    change_sides,
    effusion_direction_metrics,
    fluid_regions,
    region_share,
)
from pcl_viewer.models.hvae import HVAE, HVAEConfig

S = 32


def blob(side: str, value: float = 0.3) -> np.ndarray:
    """``(1, S, S)`` fluid-like patch at the base of the patient's ``side`` (right = image left)."""
    out = np.zeros((1, S, S), np.float32)
    cols = slice(4, 12) if side == "right" else slice(20, 28)
    out[0, 22:28, cols] = value
    return out


def test_sides_follow_the_patient_convention():
    change = np.stack([blob("right")[0], blob("left")[0], blob("right")[0] + blob("left")[0],
                       np.zeros((S, S), np.float32)])
    assert list(change_sides(change)) == ["right", "left", "bilateral", "none"]


def test_fluid_region_is_the_true_change_dilated():
    x = np.full((1, 1, S, S), 0.2, np.float32)
    truth = x + blob("right")[None]
    region = fluid_regions(x, truth, threshold=0.005, dilate=2)
    assert region.shape == (1, S, S)
    assert region[0, 22:28, 4:12].all()
    assert region[0, 20, 4] and region[0, 29, 13]  # 2 px around the blob
    assert not region[0, 19, 4] and not region[0, 25, 14]
    assert region_share(np.abs(truth - x)[:, 0], region) == pytest.approx(1.0)
    assert np.isnan(region_share(np.zeros((1, S, S)), region))


def _case(n: int, true_sides: list[str], model_sides: list[str | None], direction: str):
    """Factual images, true and model counterfactuals (None: no change) for one direction."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.5, (n, 1, S, S)).astype(np.float32)
    sign = 1.0 if direction == "add" else -1.0
    fluid = lambda s: sum(blob(p) for p in (("right", "left") if s == "bilateral" else (s,)))  # noqa: E731
    x = base - (sign < 0) * np.stack([fluid(s) for s in true_sides]) * sign
    truth = base + (sign > 0) * np.stack([fluid(s) for s in true_sides])
    x_cf = np.stack([x[i] + sign * fluid(m) if m else x[i] for i, m in enumerate(model_sides)])
    return x.astype(np.float32), x_cf.astype(np.float32), truth.astype(np.float32)


@pytest.fixture(scope="module")
def removed_right():
    """Metrics of effusions removed exactly where they are."""
    sides = ["right", "left", "right", "bilateral"]
    x, x_cf, truth = _case(4, sides, sides, "remove")
    return effusion_direction_metrics("remove", x, x_cf, x, truth, np.zeros(4),
                                      np.array([0.1, 0.2, 0.3, 0.9]))


@pytest.fixture(scope="module")
def removed_mirrored():
    """Metrics of the same amount of change on the mirrored side."""
    x, wrong, truth = _case(4, ["right"] * 4, ["left"] * 4, "remove")
    return effusion_direction_metrics("remove", x, wrong, x, truth, None, None)


def test_an_exact_removal_has_no_error(removed_right):
    assert removed_right["mae"] == pytest.approx(0.0, abs=1e-7)
    assert removed_right["mae_reduction_vs_identity"] == pytest.approx(1.0)


def test_an_exact_removal_changes_only_the_fluid_region_on_the_true_side(removed_right):
    assert removed_right["change_in_fluid_region"] == pytest.approx(1.0)
    assert removed_right["side_agreement"] == 1.0


def test_removal_effectiveness_is_read_from_the_classifiers_probabilities(removed_right):
    assert (removed_right["effectiveness"], removed_right["judge_effectiveness"]) == (1.0, 0.75)


def test_the_judge_is_also_scored_on_the_true_counterfactuals():
    sides = ["right", "left", "right", "bilateral"]
    x, x_cf, truth = _case(4, sides, sides, "remove")
    m = effusion_direction_metrics("remove", x, x_cf, x, truth, None, np.zeros(4),
                                   judge_true_probs=np.array([0.9, 0.2, 0.1, 0.3]))
    assert m["judge_effectiveness"] == 1.0
    assert m["judge_effectiveness_true_cf"] == 0.75  # it reads one true removal as effusion


def test_a_mirrored_removal_changes_nothing_inside_the_fluid_region(removed_mirrored):
    assert removed_mirrored["change_in_fluid_region"] == pytest.approx(0.0)
    assert removed_mirrored["side_agreement"] == 0.0


def test_a_mirrored_removal_is_worse_than_doing_nothing(removed_mirrored):
    assert removed_mirrored["mae_reduction_vs_identity"] < 0


SIDE_PRIOR = {"right": 0.55, "left": 0.33, "bilateral": 0.12}
TRUE_SIDES = ["right"] * 5 + ["left"] * 3 + ["bilateral"] * 2


@pytest.fixture(scope="module")
def added_collapsed():
    """Effusions added always on the right, whatever side the truth has."""
    x, collapsed, truth = _case(10, TRUE_SIDES, ["right"] * 10, "add")
    return effusion_direction_metrics("add", x, collapsed, x, truth, None, np.ones(10),
                                      side_prior=SIDE_PRIOR)


@pytest.fixture(scope="module")
def added_spread():
    """Effusions added on sides as often as the truth has them (50/30/20 %)."""
    x, spread, truth = _case(10, TRUE_SIDES, TRUE_SIDES[::-1], "add")
    return effusion_direction_metrics("add", x, spread, x, truth, None, np.ones(10),
                                      side_prior=SIDE_PRIOR)


def test_a_collapse_to_one_side_shows_in_the_side_shares(added_collapsed):
    assert added_collapsed["model_sides"] == {"right": 1.0, "left": 0.0, "bilateral": 0.0}
    assert added_collapsed["side_share_max_deviation_points"] == pytest.approx(45.0)


def test_the_fluid_region_is_scored_on_the_side_matched_images(added_collapsed):
    assert added_collapsed["n_side_matched"] == 5
    assert added_collapsed["change_in_fluid_region_side_matched"] == pytest.approx(1.0)


def test_side_shares_are_compared_with_the_prior(added_spread):
    assert added_spread["side_share_max_deviation_points"] == pytest.approx(8.0)  # vs 55/33/12


def test_acceptance_judges_the_reported_targets_and_leaves_the_rest_open(added_spread):
    acc = acceptance({"effusion_add": added_spread, "interventions": {}, "composition_mae": 0.0})
    assert acc["effusion_add.side_share_max_deviation_points"]["met"] is True
    assert acc["effusion_add.judge_effectiveness"]["met"] is True
    assert acc["scanner.judge_effectiveness"]["met"] is None


def test_dice_gap_uses_the_segmenter_on_model_and_true_counterfactuals():
    x, x_cf, truth = _case(3, ["right"] * 3, [None] * 3, "remove")
    masks = np.zeros((3, S, S), np.uint8)
    masks[:, 4:28, 4:12] = 1
    masks[:, 4:28, 20:28] = 2

    def segment(images: np.ndarray) -> np.ndarray:  # lungs = pixels below 0.55, split by half
        lab = np.zeros((len(images), S, S), np.uint8)
        lab[:, 4:28, 4:12] = 1
        lab[:, 4:28, 20:28] = 2
        dark = images[:, 0] < 0.55
        return np.where(dark, lab, 0).astype(np.uint8)

    # the factual has fluid (bright, > 0.55 where base + 0.3 is): the unchanged "model CF"
    # loses lung there; the true counterfactual does not
    x = x + 0.3 * (blob("right")[None] > 0)
    m = effusion_direction_metrics("remove", x, x, x, truth, None, None, segment, masks)
    assert m["dice_true_cf"] == pytest.approx(100.0)
    assert m["dice_model_cf"] < 100.0 and m["dice_gap_points"] > 0


def test_add_dice_gap_is_also_given_where_the_model_drew_the_true_side():
    lab = np.zeros((S, S), np.uint8)
    lab[4:28, 4:12] = 1
    lab[4:28, 20:28] = 2

    def segment(images: np.ndarray) -> np.ndarray:  # lung where the image is dark
        return np.where(images[:, 0] < 0.55, lab[None], 0).astype(np.uint8)

    x = np.full((4, 1, S, S), 0.2, np.float32)
    truth = x + blob("right", 0.6)[None]
    x_cf = np.stack([x[i] + blob(side, 0.6) for i, side in
                     enumerate(["right", "left", "left", "right"])])
    masks = segment(truth)  # the true counterfactual's gold: fluid-covered lung left out
    m = effusion_direction_metrics("add", x, x_cf, x, truth, None, None, segment, masks)
    assert m["n_side_matched"] == 2
    assert m["dice_true_cf"] == pytest.approx(100.0) and m["dice_gap_points"] > 0
    # where the drawn side is the true one the drawn fluid is the truth's: no gap there
    assert m["dice_gap_points_side_matched"] == pytest.approx(0.0)


def _fluid_hvae(mode: str = "embed", **extra) -> HVAE:
    torch.manual_seed(0)
    cfg = HVAEConfig(image_size=S, work_size=16, widths=(8, 16, 16), blocks=(1, 1, 1),
                     latents={4: 4, 8: 4}, embed_dim=8, bottleneck=2, fluid_dim=2,
                     fluid_mode=mode, **extra)
    model = HVAE(cfg)
    for p in model.parameters():  # no zero-initialised layers: every path carries signal
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


PARENTS = torch.tensor([[0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.float32)
FLUID_MODES = pytest.mark.parametrize("mode", ["embed", "head"])


def _abducted(mode: str) -> tuple[HVAE, torch.Tensor, dict, torch.Tensor]:
    """A random fluid HVAE, 4 images, their latents and their factual mean."""
    model = _fluid_hvae(mode)
    x = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(1))
    lat = model.abduct(x, PARENTS)
    return model, x, lat, lat.pop("mu")


@FLUID_MODES
def test_abduction_infers_one_effusion_noise_per_image(mode):
    _, _, lat, _ = _abducted(mode)
    assert lat["fluid"].shape == (4, 2)


@FLUID_MODES
def test_decoding_the_abducted_latents_gives_the_factual_mean(mode):
    model, _, lat, mu = _abducted(mode)
    assert torch.allclose(model.decode(lat, PARENTS), mu, atol=1e-6)


@FLUID_MODES
def test_effusion_noise_acts_only_where_effusion_is_present(mode):
    model, _, lat, mu = _abducted(mode)
    changed = (model.decode(dict(lat, fluid=lat["fluid"] + 3.0), PARENTS) - mu
               ).abs().flatten(1).amax(1)
    effusion = PARENTS[:, 2] > 0.5
    assert torch.all(changed[~effusion] < 1e-6)
    assert torch.all(changed[effusion] > 1e-3)


@FLUID_MODES
def test_the_noise_draw_is_deterministic_per_image_and_seed(mode):
    model, x, lat, _ = _abducted(mode)
    assert torch.equal(model.abduct(x, PARENTS)["fluid"], lat["fluid"])
    assert not torch.equal(model.abduct(x, PARENTS, fluid_seed=1)["fluid"], lat["fluid"])


def test_fluid_head_is_the_only_path_of_the_effusion_parent():
    model = _fluid_hvae("head")
    x = torch.rand(4, 1, S, S)
    pa = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    flip = pa.clone()
    flip[:, 2] = 1 - flip[:, 2]
    lat = model.abduct(x, pa)
    lat.pop("mu")
    assert (model.decode(lat, flip) - model.decode(lat, pa)).abs().amax() > 1e-3
    with torch.no_grad():  # without the head, do(effusion) changes nothing at all
        model.fluid_head.c3.weight.zero_()
        model.fluid_head.c3.bias.zero_()
    assert torch.equal(model.decode(lat, flip), model.decode(lat, pa))
    assert torch.equal(model.embed(pa), model.embed(flip))  # priors and decoder never see it


def test_pair_loss_reads_added_fluid_from_the_true_counterfactual():
    model = _fluid_hvae().train()
    x = torch.rand(2, 1, S, S)
    pa = torch.tensor([[0, 0, 0], [0, 0, 0]], dtype=torch.float32)
    pa_true = torch.tensor([[0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    x_true = x.clone()
    x_true[:, :, 24:30, 2:10] += 0.3
    loss = model.cf_pair_loss(x, pa, x_true, pa_true)
    loss.backward()
    grad = model.enc_fluid[0].weight.grad
    assert loss.item() > 0
    assert grad is not None and grad.abs().sum() > 0


def test_a_null_intervention_with_an_identical_target_costs_nothing():
    model = _fluid_hvae().train()
    x = torch.rand(2, 1, S, S)
    pa = torch.zeros(2, 3)
    assert model.cf_pair_loss(x, pa, x, pa).item() == pytest.approx(0.0, abs=1e-3)


def test_old_bundles_without_effusion_noise_still_build():
    cfg = HVAEConfig.from_dict({k: v for k, v in HVAEConfig.for_preset("smoke").to_dict().items()
                                if k not in ("fluid_dim", "fluid_beta")})
    model = HVAE(cfg).eval()
    x = torch.rand(2, 1, cfg.image_size, cfg.image_size)
    lat = model.abduct(x, torch.zeros(2, 3))
    assert "fluid" not in lat and model.enc_fluid is None


def test_the_spatial_noise_encoder_tells_mirrored_fluid_apart():
    # a global pool cannot tell which side the fluid is on; the whole map can
    x = torch.from_numpy(np.stack([blob("right"), blob("left")]))
    codes = {}
    for enc in ("pooled", "spatial"):
        model = _fluid_hvae("head", fluid_enc=enc)
        # make the encoder mirror-equivariant, so only the encoder input can break the tie
        with torch.no_grad():
            for block in [model.stem, *[m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]]:
                block.weight.copy_((block.weight + block.weight.flip(-1)) / 2)
        q = model.fluid_posterior(model.encode(x))
        codes[enc] = (q[0][0] - q[0][1]).abs().amax().item()
    assert codes["pooled"] < 1e-5
    assert codes["spatial"] > 1e-3


def test_added_effusion_draws_from_the_stored_codes_once_filled():
    model = _fluid_hvae("head", fluid_bank=3)
    x = torch.rand(6, 1, S, S, generator=torch.Generator().manual_seed(2))
    pa = torch.tensor([[0, 0, 1]] * 4 + [[0, 0, 0]] * 2, dtype=torch.float32)
    normal = pa[:, 2] < 0.5
    before = model.abduct(x, pa)["fluid"][normal]  # bank empty: N(0, I) draws
    assert model.fill_fluid_codes(x, pa, seed=0) == 3
    bank = model.fluid_codes
    assert bank is not None and bank.abs().sum() > 0
    effusion_codes = model.fluid_posterior(model.encode(x[~normal]))[0]
    # every stored code is the posterior mean of one of the effusion images
    assert all(torch.isclose(row, effusion_codes, atol=1e-6).all(1).any() for row in bank)
    after = model.abduct(x, pa)["fluid"][normal]
    assert not torch.equal(after, before)
    assert all(torch.equal(row, bank[torch.isclose(bank, row).all(1)][0]) for row in after)
    assert torch.equal(model.abduct(x, pa)["fluid"][normal], after)  # deterministic
    assert "fluid_codes" in model.state_dict()  # saved with the weights


def test_filling_codes_without_effusion_images_keeps_the_prior():
    model = _fluid_hvae("head", fluid_bank=3)
    x = torch.rand(2, 1, S, S)
    assert model.fill_fluid_codes(x, torch.zeros(2, 3)) == 0
    assert model.fluid_codes is not None and model.fluid_codes.abs().sum() == 0


def test_free_bits_stop_charging_the_noise_kl_below_the_floor():
    x = torch.rand(2, 1, S, S, generator=torch.Generator().manual_seed(3))
    pa = torch.tensor([[0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    pa_true = torch.zeros(2, 3)
    grads = {}
    for bits in (0.0, 50.0):
        model = _fluid_hvae("head", fluid_free_bits=bits).train()
        # the same pair error reaches the encoder of u_f in both; the KL's pull only without
        # the floor (batch-mean KL per dimension here is far below 50 nats)
        model.cf_pair_loss(x, pa, x.clone(), pa_true).backward()
        grads[bits] = model.enc_fluid[2].weight.grad.abs().sum().item()
    assert grads[0.0] > 0
    assert grads[50.0] < grads[0.0]


def test_the_elbo_does_not_charge_the_noise_of_the_fluid_head():
    # u_f acts only through the head, which the ELBO takes as a constant
    model = _fluid_hvae("head").train()
    x = torch.rand(2, 1, S, S)
    model(x, torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.float32))["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.enc_fluid.parameters())


def test_the_noise_readout_learns_from_the_scm_labels_of_the_used_code():
    model = _fluid_hvae("head", fluid_aux=1.0).train()
    x = torch.rand(3, 1, S, S, generator=torch.Generator().manual_seed(4))
    pa = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.float32)  # add, remove, scanner
    pa_true = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.float32)
    labels = torch.tensor([[1, 0.6], [0, 0.3], [2, 0.9]])
    torch.manual_seed(5)
    base = model.cf_pair_loss(x, pa, x.flip(0), pa_true)  # no labels: no readout term
    torch.manual_seed(5)
    with_aux = model.cf_pair_loss(x, pa, x.flip(0), pa_true, labels)
    with_aux.backward()
    assert model.fluid_readout is not None and model.fluid_readout.weight.grad.abs().sum() > 0
    # the readout term: side cross-entropy + severity squared error on the two pairs whose
    # code names an effusion (the addition's from x_true, the removal's from x), x 2/3 of them
    with torch.no_grad():
        q_x = model.fluid_posterior(model.encode(x))[0]
        q_t = model.fluid_posterior(model.encode(x.flip(0)))[0]
        read = model.fluid_readout(torch.stack([q_t[0], q_x[1]]))
        aux = (torch.nn.functional.cross_entropy(read[:, :3], torch.tensor([1, 0]))
               + (read[:, 3] - torch.tensor([0.6, 0.3])).square().mean())
    assert with_aux.item() - base.item() == pytest.approx(aux.item() * 2 / 3, rel=1e-4)
    # the third pair changes only the scanner of a normal image: its code says nothing
    no_fluid = torch.tensor([[0, 0, 0]], dtype=torch.float32)
    model.zero_grad()
    model.cf_pair_loss(x[2:], no_fluid, x[2:], torch.tensor([[1, 0, 0]], dtype=torch.float32),
                       labels[2:]).backward()
    assert model.fluid_readout.weight.grad is None or model.fluid_readout.weight.grad.abs().sum() == 0


def test_effusion_noise_is_read_from_every_record_or_not_at_all():
    from types import SimpleNamespace

    from pcl_viewer.train.cf import effusion_noise

    rec = [SimpleNamespace(extra={"effusion_side": s, "effusion_severity": v})
           for s, v in (("right", 0.2), ("left", 0.5), ("bilateral", 0.9))]
    np.testing.assert_allclose(effusion_noise(rec), [[0, 0.2], [1, 0.5], [2, 0.9]], rtol=1e-6)
    assert effusion_noise(rec + [SimpleNamespace(extra={})]) is None  # real data


def test_the_fluid_head_with_coordinates_can_tell_left_from_right():
    from pcl_viewer.models.hvae import FluidHead

    h = torch.ones(1, 8, 16, 16)  # a featureless map: only coordinates can break the symmetry
    spreads = {}
    for coords in (False, True):
        torch.manual_seed(0)
        head = FluidHead(8, 2, hidden=4, coords=coords)
        for p in head.parameters():
            torch.nn.init.normal_(p, std=0.5)
        if head.coord is not None:
            torch.nn.init.normal_(head.coord.weight, std=3.0)
        out = head(h, torch.zeros(1, 2))[0, 0, 4:12].detach()  # rows away from the border
        spreads[coords] = (out[:, 4] - out[:, 11]).abs().amax().item()  # image left vs right
    assert spreads[False] < 1e-5
    assert spreads[True] > 1e-3


def _multiscale() -> HVAE:
    return _fluid_hvae("head", fluid_coords=True, fluid_head="multiscale")


def test_a_multiscale_head_decodes_the_abducted_latents_to_the_factual_mean():
    model = _multiscale()
    x = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(1))
    lat = model.abduct(x, PARENTS)
    mu = lat.pop("mu")
    assert lat["xw"].shape == (4, 1, 16, 16)  # the image it reads is part of the abduction
    assert torch.allclose(model.decode(lat, PARENTS), mu, atol=1e-6)
    flip = PARENTS.clone()
    flip[:, 2] = 1 - flip[:, 2]
    assert (model.decode(lat, flip) - mu).abs().amax() > 1e-3


def test_a_multiscale_head_reads_the_image_over_a_whole_hemithorax():
    """A one-pixel change of the image moves the fluid 6 px away with the multiscale head;
    the local head (two 3x3 convolutions) cannot see that far."""
    from pcl_viewer.models.hvae import FluidHead

    torch.manual_seed(0)
    head = FluidHead(8, 2, hidden=4, coords=True, multiscale=True)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h, u = torch.zeros(1, 8, 16, 16), torch.zeros(1, 2)
    x = torch.zeros(1, 1, 16, 16)
    poked = x.clone()
    poked[0, 0, 8, 2] = 1.0
    far = (head(h, u, poked) - head(h, u, x))[0, 0, 8, 8].abs().item()
    assert far > 1e-4
    with pytest.raises(ValueError, match="working-size image"):
        head(h, u)
    # the same poke in the decoder features: seen 6 px away by the multiscale head only
    torch.manual_seed(0)
    local = FluidHead(8, 2, hidden=4, coords=True)
    for p in local.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h2 = h.clone()
    h2[0, :, 8, 2] = 1.0
    assert (local(h2, u) - local(h, u))[0, 0, 8, 8].abs().item() == 0.0
    assert (head(h2, u, x) - head(h, u, x))[0, 0, 8, 8].abs().item() > 1e-4


@pytest.mark.parametrize("option, prefix", [({"fluid_head": "multiscale"}, "fluid_head."),
                                            ({"fluid_coarse": 8}, "fluid_coarse."),
                                            ({"fluid_remap": 4}, "fluid_remap.")])
def test_a_wider_effusion_path_warm_started_from_a_local_head_computes_the_same(option, prefix):
    """The layers a local head lacks (a multiscale head's, the coarse stages) start at zero,
    so a warm start changes nothing until training moves them."""
    local = _fluid_hvae("head", fluid_coords=True)
    torch.manual_seed(5)
    wide = HVAE(replace(local.cfg, **option)).eval()
    missing, unexpected = wide.load_state_dict(local.state_dict(), strict=False)
    assert missing and not unexpected and all(k.startswith(prefix) for k in missing)
    x = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(2))
    flip = PARENTS.clone()
    flip[:, 2] = 1 - flip[:, 2]
    a, b = local.abduct(x, PARENTS), wide.abduct(x, PARENTS)
    assert torch.allclose(local.decode(a, flip), wide.decode(b, flip), atol=1e-6)


# -- coarse effusion stages --------------------------------------------------------------
def _coarse_hvae() -> HVAE:
    model = _fluid_hvae("head", fluid_coords=True, fluid_coarse=8)
    with torch.no_grad():  # the head off: only the coarse stages carry the effusion parent
        model.fluid_head.c3.weight.zero_()
        model.fluid_head.c3.bias.zero_()
    return model


def test_coarse_effusion_stages_sit_at_the_resolutions_asked_for():
    model = _coarse_hvae()
    assert sorted(model.fluid_coarse.keys()) == ["4", "8"]  # work 16: stages 16, 8, 4
    with pytest.raises(ValueError, match="needs the fluid head"):
        HVAE(HVAEConfig(image_size=S, work_size=16, widths=(8, 16, 16), blocks=(1, 1, 1),
                        latents={4: 4, 8: 4}, embed_dim=8, bottleneck=2, fluid_coarse=8))


def test_coarse_stages_change_the_whole_image_and_only_under_effusion():
    model = _coarse_hvae()
    x = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(3))
    lat = model.abduct(x, PARENTS)
    mu = lat.pop("mu")
    flip = PARENTS.clone()
    flip[:, 2] = 1 - flip[:, 2]
    change = (model.decode(lat, flip) - mu).abs()
    # an 8 px stage upsampled twice reaches every pixel, unlike the 5 px fluid head
    assert (change > 1e-4).float().mean() > 0.9
    # a scanner intervention with effusion absent on both sides: the stages add nothing, so
    # the model decodes exactly what it does with the stages removed
    plain = HVAE(replace(model.cfg, fluid_coarse=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("fluid_coarse.")})
    none = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    scan = none.clone()
    scan[:, 0] = 1 - scan[:, 0]
    a, b = model.abduct(x[:2], none), plain.abduct(x[:2], none)
    assert torch.allclose(model.decode(a, scan), plain.decode(b, scan), atol=1e-6)




# -- tone re-mapping around the fluid ------------------------------------------------------
def _remap_hvae() -> HVAE:
    model = _fluid_hvae("head", fluid_coords=True, fluid_remap=4)
    torch.manual_seed(7)
    with torch.no_grad():  # the head off, the re-mapping on: only it carries effusion
        model.fluid_head.c3.weight.zero_()
        model.fluid_head.c3.bias.zero_()
        torch.nn.init.normal_(model.fluid_remap.c3.weight, std=0.5)
    return model


def test_a_tone_remapping_needs_the_fluid_head_and_fits_the_working_size():
    base = dict(image_size=S, work_size=16, widths=(8, 16, 16), blocks=(1, 1, 1),
                latents={4: 4, 8: 4}, embed_dim=8, bottleneck=2)
    with pytest.raises(ValueError, match="needs the fluid head"):
        HVAE(HVAEConfig(**base, fluid_remap=4))
    with pytest.raises(ValueError, match="exceeds the working size"):
        HVAE(HVAEConfig(**base, fluid_dim=2, fluid_mode="head", fluid_remap=32))


def test_a_tone_remapping_changes_each_pixel_by_a_curve_of_its_own_brightness():
    """Two pixels of one cell with the same features get different changes when their
    brightness differs (a re-mapped tone curve), and the same change when it does not."""
    from pcl_viewer.models.hvae import LocalRemap

    torch.manual_seed(0)
    remap = LocalRemap(8, 2, grid=2)
    for p in remap.parameters():
        torch.nn.init.normal_(p, std=0.5)
    h, u = torch.zeros(1, 8, 16, 16), torch.zeros(1, 2)
    x = torch.full((1, 1, 16, 16), 0.5)
    flat = remap(h, u, x)[0, 0]
    x2 = x.clone()
    x2[0, 0, 3, 3] = 0.9  # one brighter pixel: its own change moves most
    bright = remap(h, u, x2)[0, 0]
    own = (bright[3, 3] - flat[3, 3]).abs().item()
    assert own > 1e-3
    # the cell's histogram changed a little too, so its neighbours move, but far less
    assert (bright[3, 4] - flat[3, 4]).abs().item() < own / 5
    assert flat.shape == (16, 16)


def test_a_tone_remapping_acts_only_under_effusion_and_decodes_the_factual_mean():
    model = _remap_hvae()
    x = torch.rand(4, 1, S, S, generator=torch.Generator().manual_seed(3))
    lat = model.abduct(x, PARENTS)
    mu = lat.pop("mu")
    assert lat["xw"].shape == (4, 1, 16, 16)  # it reads the abducted image
    assert torch.allclose(model.decode(lat, PARENTS), mu, atol=1e-6)
    flip = PARENTS.clone()
    flip[:, 2] = 1 - flip[:, 2]
    change = (model.decode(lat, flip) - mu).abs()
    assert (change > 1e-4).float().mean() > 0.9  # a smooth field over the whole image
    none = torch.tensor([[0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    scan = none.clone()
    scan[:, 0] = 1 - scan[:, 0]
    plain = HVAE(replace(model.cfg, fluid_remap=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("fluid_remap.")})
    a, b = model.abduct(x[:2], none), plain.abduct(x[:2], none)
    assert torch.allclose(model.decode(a, scan), plain.decode(b, scan), atol=1e-6)


@pytest.mark.parametrize("path", ["fluid_coarse", "fluid_remap"])
def test_wider_effusion_paths_learn_from_the_pairs_not_from_the_elbo(path):
    model = {"fluid_coarse": _coarse_hvae, "fluid_remap": _remap_hvae}[path]().train()
    params = list(getattr(model, path).parameters())
    x = torch.rand(2, 1, S, S)
    pa = torch.tensor([[0, 0, 1], [1, 0, 1]], dtype=torch.float32)
    model(x, pa)["loss"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in params)
    model.zero_grad()
    model.cf_pair_loss(x, pa, x.flip(0), pa * torch.tensor([1.0, 1.0, 0.0])).backward()
    assert sum(float(p.grad.abs().sum()) for p in params) > 0


@FLUID_MODES
def test_the_cycle_loss_is_zero_for_a_null_intervention_and_trains_both_edits(mode):
    model = _fluid_hvae(mode).train()
    x = torch.rand(4, 1, S, S)
    assert model.cycle_loss(x, PARENTS, PARENTS).item() == pytest.approx(0.0, abs=1e-6)
    flip = PARENTS.clone()
    flip[:, 0] = 1 - flip[:, 0]  # do(scanner) and back
    loss = model.cycle_loss(x, PARENTS, flip)
    loss.backward()
    assert loss.item() > 0
    for part in (model.stem, model.dec_blocks):  # both abductions and all decodes learn
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_the_absolute_pair_error_is_relative_to_the_identitys_too():
    model = _fluid_hvae("head").train()
    x = torch.rand(2, 1, S, S)
    pa = torch.zeros(2, 3)
    assert model.cf_pair_loss(x, pa, x, pa, error="absolute").item() == pytest.approx(0.0, abs=1e-3)
    pa_true = torch.tensor([[0, 0, 1], [0, 0, 1]], dtype=torch.float32)
    x_true = x.clone()
    x_true[:, :, 24:30, 2:10] += 0.3
    loss = model.cf_pair_loss(x, pa, x_true, pa_true, error="absolute")
    loss.backward()
    assert loss.item() > 0 and model.fluid_head.c3.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pair error"):
        model.cf_pair_loss(x, pa, x_true, pa_true, error="huber")
