"""train-cf: preset defaults, the learning-rate schedule, and checkpoints (a run interrupted
and resumed ends exactly where an uninterrupted one does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_cf_model import TOY_HVAE, toy_data

from pcl_viewer.models.classifiers import expected_calibration_error, fit_temperature
from pcl_viewer.presets import PRESETS
from pcl_viewer.train.cf import PRESET_DEFAULTS, CFTrainConfig, _lr, train_cf

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg() -> CFTrainConfig:
    return CFTrainConfig.for_preset("smoke", seed=3, steps=6, batch_size=8, warmup=2,
                                    kl_warmup=2, cls_steps=4, cls_batch_size=8,
                                    checkpoint_every=2, hvae_overrides=TOY_HVAE)


@pytest.fixture(scope="module")
def data():
    return toy_data(n=64)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory, one_torch_thread):
    """An uninterrupted run of :func:`_cfg` and its run folder."""
    run_dir = tmp_path_factory.mktemp("ref")
    return train_cf(data, _cfg(), run_dir, progress=False), run_dir


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{key} differs"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_has_its_run_length_and_batch(preset):
    cfg = CFTrainConfig.for_preset(preset)
    assert {k: getattr(cfg, k) for k in PRESET_DEFAULTS[preset]} == PRESET_DEFAULTS[preset]


def test_preset_overrides_replace_the_defaults_and_none_keeps_them():
    cfg = CFTrainConfig.for_preset("cpu", steps=7, batch_size=None, lr=1e-3)
    assert (cfg.steps, cfg.batch_size, cfg.lr) == (7, 32, 1e-3)


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        CFTrainConfig.for_preset("huge")


def test_a_warm_start_starts_at_the_full_kl_weight_unless_told_otherwise():
    assert CFTrainConfig.for_preset("cpu", init_bundle="cf-cpu").kl_warmup == 0
    assert CFTrainConfig.for_preset("cpu", init_bundle="cf-cpu", kl_warmup=5).kl_warmup == 5
    assert CFTrainConfig.for_preset("cpu").kl_warmup == CFTrainConfig().kl_warmup


def test_learning_rate_warms_up_linearly_then_decays_to_a_tenth():
    lrs = [_lr(step, 100, 2e-3, 10) for step in range(101)]
    assert lrs[:10] == pytest.approx([2e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(2e-3)
    assert lrs[100] == pytest.approx(2e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_resume_after_interrupt_equals_uninterrupted(data, reference, tmp_path):
    ref, ref_dir = reference
    # "Kill" after 4 classifier + 3 HVAE steps: the last checkpoint is at HVAE step 2.
    train_cf(data, _cfg(), tmp_path / "resumed", stop_after=7, progress=False)
    resumed = train_cf(data, _cfg(), tmp_path / "resumed", progress=False)
    assert resumed.stage == ref.stage == "done"
    for name in ("hvae", "ema", "cls"):
        _assert_same_weights(getattr(ref, name), getattr(resumed, name))


def test_history_is_logged_at_every_checkpoint(reference):
    _, ref_dir = reference
    hist = [json.loads(line) for line in (ref_dir / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist if h["stage"] == "hvae"] == [2, 4, 6]


def test_temperature_scaling_reduces_calibration_error_of_overconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 2000)
    clean = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.0, 2000)
    logits = torch.tensor(4.0 * clean, dtype=torch.float32)  # calibrated logit is 2 * clean
    t = fit_temperature(logits, torch.tensor(labels))
    before = expected_calibration_error(torch.sigmoid(logits).numpy(), labels)
    after = expected_calibration_error(torch.sigmoid(logits / t).numpy(), labels)
    assert 1.6 < t < 2.5
    assert after < 0.5 * before


def test_cf_finetune_keeps_the_encoder_frozen_and_reports_its_constraint(data, tmp_path):
    from pcl_viewer.train.cf import finetune_cf

    run = train_cf(data, _cfg(), tmp_path / "run", progress=False)
    stem = run.ema.stem.weight.clone()
    out_before = run.ema.out.weight.clone()
    summary = finetune_cf(run, data, steps=2, batch_size=8, progress=False)
    assert summary["steps"] == 2 and summary["bound"] > summary["elbo_before"]
    assert torch.equal(run.ema.stem.weight, stem)  # encoder frozen
    assert not torch.equal(run.ema.out.weight, out_before)  # decoder trained


def test_hvae_batches_balance_effusion_without_inventing_groups():
    from pcl_viewer.train.cf import _batch_indices

    pa = np.zeros((100, 3), np.float32)
    pa[:5, 2] = 1  # 5 % effusion
    rng = np.random.default_rng(0)
    idx = np.concatenate([_batch_indices(rng, pa, 32, 0.5) for _ in range(50)])
    assert abs(pa[idx, 2].mean() - 0.5) < 1e-6  # exactly half of every batch
    assert set(idx[pa[idx, 2] > 0]) <= set(range(5))
    # no effusion images at all (or no balancing): plain uniform draws
    none = np.zeros((40, 3), np.float32)
    assert _batch_indices(rng, none, 16, 0.5).shape == (16,)
    assert _batch_indices(rng, pa, 16, None).shape == (16,)


def test_bilateral_pairs_are_drawn_as_often_as_their_weight_says():
    from pcl_viewer.train.cf import CFTrainConfig, TrainingData, _batch_indices, _pair_weights

    n = 400
    pa = np.zeros((n, 3), np.float32)
    pa[:100, 2] = 1  # a quarter with effusion
    fluid = np.zeros((n, 2), np.float32)
    fluid[::10, 0] = 2  # every tenth study's effusion noise is bilateral (in both groups)
    data = TrainingData(np.zeros((n, 1, 4, 4), np.float32), pa, np.zeros((0, 1, 4, 4)),
                        np.zeros((0, 3)), fluid_train=fluid)
    assert _pair_weights(CFTrainConfig.for_preset("smoke"), data) is None  # weight 1: uniform
    assert _pair_weights(CFTrainConfig.for_preset("smoke", cf_pair_bilateral=4.0),
                         TrainingData(data.x_train, pa, data.x_val, data.pa_val)) is None
    w = _pair_weights(CFTrainConfig.for_preset("smoke", cf_pair_bilateral=4.0), data)
    assert w is not None and set(np.unique(w)) == {1.0, 4.0}
    rng = np.random.default_rng(0)
    idx = np.concatenate([_batch_indices(rng, pa, 32, 0.5, w) for _ in range(400)])
    assert abs(pa[idx, 2].mean() - 0.5) < 1e-6  # the effusion balance is kept
    share = (fluid[idx, 0] == 2).mean()
    assert abs(share - 4 * 0.1 / (4 * 0.1 + 0.9)) < 0.03  # 0.31 instead of 0.10
    # uniform draws are unchanged by the new argument: the same stream as before
    a = _batch_indices(np.random.default_rng(1), pa, 16, 0.5)
    b = _batch_indices(np.random.default_rng(1), pa, 16, 0.5, None)
    assert np.array_equal(a, b)


def test_warm_start_reproduces_the_bundle_and_adds_effusion_noise_at_zero(data, tmp_path):
    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.classifiers import build_classifiers
    from pcl_viewer.models.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    cfg = HVAEConfig.for_preset("smoke")
    for key, value in TOY_HVAE.items():
        setattr(cfg, key, value)
    src, clf = HVAE(cfg), build_classifiers("smoke")
    for p in src.parameters():  # no zero-initialised layers, so outputs depend on every weight
        torch.nn.init.normal_(p, std=0.2)
    save_bundle(tmp_path / "b", {"name": "b", "version": "0", "kind": "counterfactual"},
                {"hvae": ("hvae", {"hvae": cfg.to_dict()}, src),
                 "classifier": ("attribute-classifier", {"classifier": clf.cfg.to_dict()}, clf)})
    c = _cfg()
    c.hvae_overrides = {**TOY_HVAE, "fluid_dim": 2}
    c.init_bundle = str(tmp_path / "b")
    c.steps, c.cls_steps = 0, 0
    run = train_cf(data, c, tmp_path / "run", progress=False)
    assert run.init_info["widened"] == 1 and run.init_info["fresh"] > 0
    x = torch.rand(4, 1, 32, 32)
    pa = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    src.eval()
    ref = src.abduct(x, pa)["mu"]
    out = run.ema.eval().abduct(x, pa)["mu"]
    assert torch.allclose(out, ref, atol=1e-5)  # the effusion noise enters at zero weight
    assert torch.equal(run.cls.state_dict()["temperature"], clf.state_dict()["temperature"])
    with torch.no_grad():  # and from here on it is a parameter like any other
        run.ema.parent_embed[0].weight[:, 3:] = 1.0
    assert not torch.allclose(run.ema.abduct(x, pa)["mu"][1:3], ref[1:3], atol=1e-4)
    # a warm-started run that is stopped and resumed still names the bundle it began from
    c.steps, c.checkpoint_every = 2, 1
    train_cf(data, c, tmp_path / "run2", progress=False, stop_after=1)
    resumed = train_cf(data, c, tmp_path / "run2", progress=False)
    assert resumed.stage == "done" and resumed.init_info == run.init_info


def test_until_step_stops_the_hvae_stage_and_a_rerun_continues_exactly(data, reference,
                                                                       tmp_path):
    ref, _ = reference
    cut = train_cf(data, _cfg(), tmp_path / "cut", progress=False, until_step=3)
    assert (cut.stage, cut.step) == ("hvae", 3)  # 3 is not a checkpoint multiple: saved anyway
    again = train_cf(data, _cfg(), tmp_path / "cut", progress=False)
    assert again.stage == "done"
    _assert_same_weights(ref.ema, again.ema)


def test_a_judge_can_be_larger_than_the_presets_classifiers(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.cf import train_cf
    from pcl_viewer.data.phantom.generate import generate
    from pcl_viewer.models.bundle import ModelBundle

    phantom_smoke = tmp_path / "ds"
    generate(phantom_smoke, 24, 64, seed=3, workers=1)

    out = tmp_path / "judge"
    res = CliRunner().invoke(train_cf, [
        "--data", str(phantom_smoke), "--preset", "smoke", "--out", str(out), "--classifiers-only",
        "--classifier-steps", "3", "--classifier-input-size", "48", "--classifier-widths", "4,8,8",
        "--seed", "1", "--threads", "1", "--device", "cpu"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cfg = ModelBundle.load(out).card["components"]["classifier"]["config"]["classifier"]
    assert (cfg["input_size"], cfg["widths"]) == (48, [4, 8, 8])
    bad = CliRunner().invoke(train_cf, [
        "--data", str(phantom_smoke), "--preset", "smoke", "--out", str(tmp_path / "bad"),
        "--classifiers-only", "--classifier-widths", "4,x"])
    assert bad.exit_code != 0 and "--classifier-widths" in bad.output


def _fluid_bundle(tmp_path, name: str, **fluid) -> tuple:
    """A toy HVAE with effusion noise and a fluid head, every weight random, as a bundle."""
    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.classifiers import build_classifiers
    from pcl_viewer.models.hvae import HVAE, HVAEConfig

    torch.manual_seed(0)
    cfg = HVAEConfig.for_preset("smoke")
    for key, value in {**TOY_HVAE, "fluid_dim": 2, "fluid_mode": "head", **fluid}.items():
        setattr(cfg, key, value)
    src, clf = HVAE(cfg), build_classifiers("smoke")
    for p in src.parameters():
        torch.nn.init.normal_(p, std=0.2)
    save_bundle(tmp_path / name, {"name": name, "version": "0", "kind": "counterfactual"},
                {"hvae": ("hvae", {"hvae": cfg.to_dict()}, src),
                 "classifier": ("attribute-classifier", {"classifier": clf.cfg.to_dict()}, clf)})
    return src.eval(), tmp_path / name


def _warm(data, tmp_path, bundle, **fluid):
    c = _cfg()
    c.hvae_overrides = {**TOY_HVAE, "fluid_dim": 2, "fluid_mode": "head", **fluid}
    c.init_bundle = str(bundle)
    c.steps, c.cls_steps = 0, 0
    return train_cf(data, c, tmp_path / f"run-{len(list(tmp_path.iterdir()))}", progress=False)


def test_a_multiscale_head_warm_started_from_a_local_bundle_decodes_what_it_did(data, tmp_path):
    src, bundle = _fluid_bundle(tmp_path, "local")
    run = _warm(data, tmp_path, bundle, fluid_head="multiscale")
    assert run.init_info["fresh"] > 0  # the image input and the coarse branch
    x = torch.rand(4, 1, 32, 32)
    pa = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.float32)
    flip = pa.clone()
    flip[:, 2] = 1 - flip[:, 2]
    a, b = src.abduct(x, pa), run.ema.eval().abduct(x, pa)
    assert torch.allclose(src.decode(a, flip), run.ema.decode(b, flip), atol=1e-5)


def test_a_warm_start_that_would_drop_layers_is_refused(data, tmp_path):
    from pcl_viewer.models.bundle import BundleError

    _, bundle = _fluid_bundle(tmp_path, "wide", fluid_head="multiscale")
    with pytest.raises(BundleError, match="no place for the bundle's tensors.*fluid_head"):
        _warm(data, tmp_path, bundle)  # the default local head has no image branch


@pytest.mark.parametrize("option", [{"fluid_coarse": 8}, {"fluid_remap": 4}])
def test_wider_effusion_paths_warm_start_from_a_bundle_and_export_with_them(data, tmp_path,
                                                                           option):
    """The coarse effusion stages and the tone re-mapping: a warm start from a bundle
    without them decodes what it did, and the exported bundle keeps them."""
    from pcl_viewer.models.bundle import ModelBundle
    from pcl_viewer.train.cf import export_bundle

    (name, value), = option.items()
    src, bundle = _fluid_bundle(tmp_path, "local")
    run = _warm(data, tmp_path, bundle, **option)
    assert getattr(run.ema, name) is not None and run.init_info["fresh"] > 0
    x = torch.rand(3, 1, 32, 32)
    pa = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.float32)
    flip = pa.clone()
    flip[:, 2] = 1 - flip[:, 2]
    a, b = src.abduct(x, pa), run.ema.eval().abduct(x, pa)
    assert torch.allclose(src.decode(a, flip), run.ema.decode(b, flip), atol=1e-5)
    export_bundle(run, data, tmp_path / "wider", command="test")
    loaded = ModelBundle.load(tmp_path / "wider").build("hvae")
    assert getattr(loaded.cfg, name) == value and getattr(loaded, name) is not None


def test_a_multiscale_head_without_a_fluid_head_is_refused(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.cf import train_cf as train_cf_cmd

    r = CliRunner().invoke(train_cf_cmd, ["--data", str(tmp_path), "--preset", "smoke",
                                          "--out", str(tmp_path / "o"),
                                          "--fluid-head", "multiscale"])
    assert r.exit_code != 0 and "needs --fluid-dim" in r.output
    r = CliRunner().invoke(train_cf_cmd, ["--data", str(tmp_path), "--preset", "smoke",
                                          "--out", str(tmp_path / "o"), "--fluid-coarse", "16"])
    assert r.exit_code != 0 and "need --fluid-dim" in r.output
    r = CliRunner().invoke(train_cf_cmd, ["--data", str(tmp_path), "--preset", "smoke",
                                          "--out", str(tmp_path / "o"), "--fluid-remap", "8"])
    assert r.exit_code != 0 and "needs --fluid-dim" in r.output


def test_reversibility_supervision_is_logged_and_off_by_default(data, reference, tmp_path):
    _, ref_dir = reference
    off = [json.loads(line) for line in (ref_dir / "history.jsonl").read_text().splitlines()]
    assert all("cycle" not in h for h in off)
    cfg = CFTrainConfig.for_preset("smoke", seed=3, steps=2, batch_size=8, warmup=1,
                                   kl_warmup=1, cls_steps=0, checkpoint_every=2,
                                   cf_cycle_weight=1.0, cf_cycle_batch=4,
                                   hvae_overrides=TOY_HVAE)
    train_cf(data, cfg, tmp_path / "cyc", progress=False)
    hist = [json.loads(line) for line in (tmp_path / "cyc" / "history.jsonl").read_text().splitlines()]
    cyc = [h["cycle"] for h in hist if h["stage"] == "hvae"]
    assert cyc and all(np.isfinite(c) and c >= 0 for c in cyc)
