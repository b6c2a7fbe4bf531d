"""`pcl pretrain`: every method runs, resume equals an uninterrupted run, the bundle is usable."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from pcl_viewer.models.bundle import ModelBundle
from pcl_viewer.train.checkpoint import load_checkpoint
from pcl_viewer.train.pretrain import METHODS, PretrainConfig, PretrainData, pretrain

TINY = {"epochs": 1, "batch_size": 4, "pixels": 32, "max_steps_per_epoch": 1,
        "probe_train": 4, "probe_eval": 2, "probe_steps": 5}

QUIET = {"progress": False, "echo": lambda *_: None}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pool() -> PretrainData:
    return PretrainData.synthetic(12, 64, seed=0)


@pytest.fixture(scope="module", params=[(m, False) for m in METHODS] + [
    (m, True) for m in ("dvd-cl", "mvd-cl", "s-dvd-cl", "s-mvd-cl")],
    ids=lambda p: p[0] + ("-dagger" if p[1] else ""))
def method_run(request, pool, tmp_path_factory, one_torch_thread):
    """One tiny pre-training run of every method (and the dagger variants):
    ``(method, dagger, summary, run folder)``."""
    method, dagger = request.param
    run = tmp_path_factory.mktemp("run") / "run"
    cfg = PretrainConfig.for_preset("smoke", method=method, dagger=dagger, **TINY)
    return method, dagger, pretrain(cfg, pool, run, **QUIET), run


def test_every_method_logs_a_finite_loss_and_its_speed(method_run):
    run = method_run[3]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1
    assert math.isfinite(log[0]["loss"]) and log[0]["images_per_s"] > 0


def test_every_method_scores_a_probe_dice(method_run):
    summary, run = method_run[2:]
    assert 0.0 <= summary["probe_dice"] <= 1.0
    assert json.loads((run / "probe.json").read_text())["best_epoch"] == 1


def test_every_method_writes_a_pretrained_bundle_that_names_it(method_run):
    method, dagger, _, run = method_run
    card = ModelBundle.load(run / "bundle", kind="pretrained").card
    assert (card["method"], card["dagger"], card["training"]["seed"]) == (method, dagger, 0)


def test_every_methods_bundle_gives_full_resolution_features(method_run):
    net = ModelBundle.load(method_run[3] / "bundle", kind="pretrained").build("unet")
    assert net.features(torch.rand(1, 1, 64, 64)).shape == (1, 32, 64, 64)


def test_resume_after_interruption_equals_uninterrupted_run(pool, tmp_path):
    cfg = PretrainConfig.for_preset("smoke", method="dvd-cl", **{**TINY, "epochs": 2,
                                                                  "max_steps_per_epoch": 2})
    pretrain(cfg, pool, tmp_path / "full", **QUIET)
    pretrain(cfg, pool, tmp_path / "cut", stop_after_epoch=1, **QUIET)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")["epoch"] == 1
    assert not (tmp_path / "cut" / "bundle").exists()
    pretrain(cfg, pool, tmp_path / "cut", **QUIET)  # resumes at epoch 2
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last")
    cut = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last")
    assert [h["loss"] for h in full["history"]] == [h["loss"] for h in cut["history"]]
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    assert full["scheduler"]["last_epoch"] == cut["scheduler"]["last_epoch"] == 4


def test_resume_refuses_a_run_folder_of_another_configuration(pool, tmp_path):
    pretrain(PretrainConfig.for_preset("smoke", method="vader", **TINY), pool, tmp_path, **QUIET)
    other = PretrainConfig.for_preset("smoke", method="ssdcl", **TINY)
    with pytest.raises(ValueError, match="different configuration"):
        pretrain(other, pool, tmp_path, **QUIET)


def test_dagger_views_are_the_real_image(pool):
    from pcl_viewer.train.pretrain import stack_views

    idx = torch.tensor([0, 3])
    stacks = stack_views(pool, idx, METHODS["dvd-cl"], dagger=True)
    assert stacks.shape == (2, 4, 1, 64, 64)
    assert all(torch.equal(stacks[:, k], pool.images[idx]) for k in range(4))
    normal = stack_views(pool, idx, METHODS["dvd-cl"], dagger=False)
    assert torch.equal(normal[:, 1:], pool.counterfactuals[idx])
    simclr = stack_views(pool, idx, METHODS["simclr"], dagger=False)
    assert torch.equal(simclr[:, 1], pool.counterfactuals[idx, 1])  # the effusion CF


def test_the_augmented_views_control_stacks_real_copies(pool):
    """views="real": the counterfactual method's loss and V, real copies for the CF views."""
    from pcl_viewer.train.pretrain import stack_views

    idx = torch.tensor([1, 2])
    stacks = stack_views(pool, idx, METHODS["mvd-cl"], dagger=False, real_views=True)
    assert stacks.shape == (2, 4, 1, 64, 64)
    assert all(torch.equal(stacks[:, k], pool.images[idx]) for k in range(4))


def test_the_real_copies_are_augmented_like_counterfactual_views(pool):
    """Unlike dagger: the same random geometry as the counterfactual row's views, so the
    copies differ from each other."""
    from pcl_viewer.data.views import make_views
    from pcl_viewer.train.pretrain import stack_views

    idx = torch.tensor([1, 2])
    real = stack_views(pool, idx, METHODS["mvd-cl"], dagger=False, real_views=True)
    cf = stack_views(pool, idx, METHODS["mvd-cl"], dagger=False)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    v_real, th_real = make_views(real, augment=True, generator=g1, min_visible=32)
    v_cf, th_cf = make_views(cf, augment=True, generator=g2, min_visible=32)
    assert torch.equal(th_real, th_cf)
    assert not torch.equal(v_real[:, 1], v_real[:, 2])
    assert torch.allclose(v_real[:, 0], v_cf[:, 0])  # view 0 is the real image in both


def test_the_augmented_views_control_pretrains_without_counterfactuals(pool, tmp_path):
    cfg = PretrainConfig.for_preset("smoke", method="mvd-cl", views="real", **TINY)
    real_only = PretrainData(images=pool.images, silver=pool.silver, has_silver=pool.has_silver)
    summary = pretrain(cfg, real_only, tmp_path, **QUIET)
    card = json.loads((tmp_path / "bundle" / "card.json").read_text())
    assert (card["views"], summary["method"]) == ("real", "mvd-cl")


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from pcl_viewer.data.phantom.generate import generate

    root = tmp_path_factory.mktemp("phantom") / "d"
    generate(root, 12, size=64, counterfactuals=True)
    shutil.copy(root / "gold_masks.csv", root / "silver_masks.csv")  # stand-in silver labels
    return root


@pytest.mark.parametrize("extra", [[], ["--dagger"]])
def test_pretrain_command_writes_run_folder(phantom_dir, tmp_path, extra):
    from click.testing import CliRunner

    from pcl_viewer.cli import main

    out = tmp_path / "run"
    args = ["pretrain", "--method", "s-mvd-cl", "--views", "true", "--data", str(phantom_dir),
            "--preset", "smoke", "--out", str(out), "--epochs", "1", "--batch-size", "4",
            "--pixels", "32", "--max-steps", "1", "--seed", "3", "--no-progress", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "images/s" in res.output and "probe Dice" in res.output
    for name in ("config.json", "log.jsonl", "probe.json", "checkpoints/last", "checkpoints/best"):
        assert (out / name).exists(), name
    card = ModelBundle.load(out / "bundle", kind="pretrained").card
    assert card["training"]["seed"] == 3 and "pcl pretrain" in card["training"]["command"]
    assert card["components"]["unet"]["config"]["heads"] == ["proj"]


def test_schedule_warms_up_from_lr_over_100_and_decays_to_1e_6():
    from pcl_viewer.train.schedule import adamw, warmup_cosine

    opt = adamw([torch.nn.Parameter(torch.zeros(1))], lr=3e-3)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=50)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(3e-5)
    assert lrs[10] == pytest.approx(3e-3)
    assert lrs[50] == pytest.approx(1e-6)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:50], lrs[11:51], strict=True))


def test_linear_probe_scores_linearly_separable_features_near_one(pool):
    from torch import nn

    from pcl_viewer.train.probe import linear_probe, probe_split

    class Oracle(nn.Module):
        """Features from which the lung classes are a linear read-out."""

        def features(self, x):
            b, _, h, w = x.shape
            xx = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(b, 1, h, w)
            dark = (x < 0.5).float()
            return torch.cat([x, xx, dark * (xx < 0).float(), dark * (xx > 0).float()], 1)

    train, held_out = probe_split(torch.ones(len(pool), dtype=torch.bool), 8, 4)
    assert not set(train.tolist()) & set(held_out.tolist())
    res, conv = linear_probe(Oracle(), pool.images, pool.silver, train, held_out, steps=150)
    assert res.dice > 0.95 and res.n_eval == 4
    assert conv.weight.shape == (3, 4, 1, 1)
