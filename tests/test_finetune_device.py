"""Fine-tuning on a device: the project's resolver, and CPU numerics unchanged by the device
path (resolution itself: tests/test_device.py)."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pcl_viewer import device
from pcl_viewer.device import available_devices, default_device
from pcl_viewer.models.unet import UNetConfig
from pcl_viewer.train import finetune as ft
from pcl_viewer.train.finetune import FinetuneConfig, finetune, predict

HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(n: int = 10, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 1, S, S)`` float32 images with two bright rectangles and their 0/1/2 labels."""
    rng = np.random.default_rng(seed)
    imgs = rng.random((n, 1, size, size)).astype(np.float32) * 0.3
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 6:26, 4:14], masks[:, 6:26, 18:28] = 1, 2
    imgs[:, 0][masks > 0] += 0.5
    return imgs, masks


# Every augmentation on (gamma, noise, blur), so every random draw is exercised.
CFG = FinetuneConfig(epochs=1, min_steps=3, batch_size=4, gamma=0.35, noise=0.03, loss="dicece")


def _states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


ONLY_CPU = not HAS_CUDA and "mps" not in available_devices()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_unavailable_cuda_fails_before_training_with_the_installation_hint():
    imgs, masks = _toy(4)
    with pytest.raises(ValueError, match="GPU installation"):
        finetune(imgs, masks, UNetConfig.for_preset("smoke"), CFG, device="cuda")


def test_the_device_resolvers_are_the_projects_own():
    assert (ft.resolve_device, ft.default_device) == (device.resolve_device, device.default_device)


def test_cpu_device_gives_bit_identical_weights_to_the_default_path():
    """The half-done CPU benchmark grid must stay comparable: device="cpu", the default
    and a ``default_device("cpu")`` block all give the very same weights, loss and
    predictions."""
    imgs, masks = _toy()
    unet = UNetConfig.for_preset("smoke")
    ref, ref_log = finetune(imgs, masks, unet, CFG, device="cpu")
    with default_device("cpu"):
        blocked, log = finetune(imgs, masks, unet, CFG)
    assert _states_equal(ref, blocked)
    assert (log["final_loss"], log["device"]) == (ref_log["final_loss"], "cpu")
    assert np.array_equal(predict(ref, imgs, device="cpu"), predict(blocked, imgs, device="cpu"))


@pytest.mark.skipif(not ONLY_CPU, reason="needs a machine with only a CPU")
def test_the_default_device_is_the_cpu_on_a_cpu_only_machine():
    imgs, masks = _toy(4)
    _, log = finetune(imgs, masks, UNetConfig.for_preset("smoke"), CFG)
    assert log["device"] == "cpu"


def test_augmentation_is_unchanged_by_the_device_plumbing():
    """The same generator state gives the same augmented batch, drawing the same numbers."""
    imgs, masks = _toy(4)
    x, y = torch.from_numpy(imgs), torch.from_numpy(masks.astype(np.int64))
    outs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        outs.append((*ft.augment_batch(x, y, CFG, g), torch.rand(1, generator=g)))
    assert all(torch.equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))
    assert outs[0][0].device.type == "cpu" and outs[0][1].dtype == torch.long


def test_accelerator_branch_runs_under_bf16_autocast_and_returns_cpu_float32(monkeypatch):
    """Without a GPU here, run the non-CPU branch on the CPU with bfloat16 autocast: the
    loss must be float32, the model must come back float32 on the CPU, predictions uint8."""
    seen = []

    def fake_autocast(dev):
        seen.append(dev)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    monkeypatch.setattr(ft, "_plain", lambda dev: False)
    monkeypatch.setattr(ft, "_autocast", fake_autocast)
    imgs, masks = _toy(6)
    model, log = finetune(imgs, masks, UNetConfig.for_preset("smoke"),
                          FinetuneConfig(epochs=1, min_steps=2, batch_size=3), device="cpu")
    assert seen and np.isfinite(log["final_loss"])
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    labels = predict(model, imgs, batch_size=4, device="cpu")
    assert labels.shape == (6, 32, 32) and labels.dtype == np.uint8
    plain = predict(model, imgs, device="cpu", amp=False)
    assert plain.shape == labels.shape


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_finetune_returns_a_cpu_model_and_predict_restores_its_device(tmp_path):
    from pcl_viewer.models.bundle import ModelBundle
    from pcl_viewer.train.finetune import save_segmentation_bundle

    imgs, masks = _toy()
    model, log = finetune(imgs, masks, UNetConfig.for_preset("smoke"), CFG, device="cuda")
    assert log["device"].startswith("cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    labels = predict(model, imgs, device="cuda")
    assert labels.dtype == np.uint8 and all(p.device.type == "cpu" for p in model.parameters())
    model.to("cuda")
    save_segmentation_bundle(tmp_path / "b", model, {"name": "t"})
    state = ModelBundle.load(tmp_path / "b").state_dict("unet")
    assert all(v.device.type == "cpu" for v in state.values())


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_bench_refuses_an_unavailable_device_before_any_work(tmp_path):
    from click.testing import CliRunner

    from pcl_viewer.commands.bench import bench

    r = CliRunner().invoke(bench, ["--preset", "smoke", "--out", str(tmp_path / "r"),
                                   "--cache", str(tmp_path / "c"), "--device", "cuda"])
    assert (r.exit_code, "not available" in r.output) == (2, True)
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_evaluate_refuses_an_unavailable_device():
    from click.testing import CliRunner

    from pcl_viewer.commands.evaluate import evaluate

    r = CliRunner().invoke(evaluate, ["--device", "cuda"])
    assert (r.exit_code, "not available" in r.output) == (2, True)


class _Killed(Exception):
    pass


def _killed_run(imgs, masks, unet, cfg, ckpt, kill_at: int):
    """Run ``cfg`` with checkpoints every 2 steps into ``ckpt`` and "kill" it after step
    ``kill_at``; returns the checkpoint folder."""
    def kill(step: int, total: int) -> None:
        if step == kill_at:
            raise _Killed

    with pytest.raises(_Killed):
        finetune(imgs, masks, unet, cfg, device="cpu", checkpoint=ckpt, checkpoint_every=2,
                 progress=kill)
    return ckpt


def test_a_killed_run_resumes_from_its_checkpoint_to_the_uninterrupted_weights(tmp_path):
    """Kill after step 3 of 6 (checkpoint every 2 steps: the last one is at step 2), start
    again with the same folder: the weights equal an uninterrupted run's, bit for bit,
    including the MONAI augmentation's random draws."""
    imgs, masks = _toy(12)
    unet = UNetConfig.for_preset("smoke")
    cfg = FinetuneConfig(epochs=1, min_steps=6, batch_size=4, noise=0.03, loss="dicece",
                         augmentation="monai")
    ref, ref_log = finetune(imgs, masks, unet, cfg, device="cpu")

    ckpt = _killed_run(imgs, masks, unet, cfg, tmp_path / "ckpt", kill_at=3)
    seen: list[int] = []
    resumed, log = finetune(imgs, masks, unet, cfg, device="cpu", checkpoint=ckpt,
                            checkpoint_every=2, progress=lambda s, t: seen.append(s))
    assert seen == [3, 4, 5, 6] and log["resumed_at_step"] == 2
    assert _states_equal(ref, resumed)
    assert log["final_loss"] == ref_log["final_loss"]
    assert log["seconds"] > 0  # the time before the kill counts too
    # another configuration, or other images of the same shape, must not continue from it
    with pytest.raises(ValueError, match="another configuration"):
        finetune(imgs, masks, unet, FinetuneConfig(epochs=1, min_steps=8, batch_size=4),
                 device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="another configuration"):
        finetune(imgs[::-1].copy(), masks, unet, cfg, device="cpu", checkpoint=ckpt)
    with pytest.raises(ValueError, match="checkpoint_every"):
        finetune(imgs, masks, unet, cfg, device="cpu", checkpoint=ckpt, checkpoint_every=0)


def test_a_checkpoint_folder_keeps_what_else_it_holds(tmp_path):
    """The state goes to a subfolder: pointing --checkpoint at a folder with other files
    in it never replaces or deletes them."""
    imgs, masks = _toy(8)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    finetune(imgs, masks, UNetConfig.for_preset("smoke"),
             FinetuneConfig(epochs=1, min_steps=2, batch_size=4), device="cpu",
             checkpoint=folder, checkpoint_every=1)
    assert (folder / "notes.txt").read_text() == "keep me"
    assert (folder / "last" / "state.json").is_file()


def test_tail_averaging_returns_the_mean_of_the_tails_weights_and_resumes_exactly(
        tmp_path, monkeypatch):
    """average_from 0.5 of 6 steps, every 2 steps: the returned weights are the mean of the
    weights after steps 4 and 6, the batch-norm statistics are recomputed for them, and a
    killed run resumes to the same average."""
    imgs, masks = _toy(12)
    unet = UNetConfig.for_preset("smoke")
    cfg = FinetuneConfig(epochs=1, min_steps=6, batch_size=4, loss="dicece",
                         average_from=0.5, average_every=2)
    snaps: list[dict] = []
    orig = torch.optim.swa_utils.AveragedModel.update_parameters

    def spy(self, model):
        snaps.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return orig(self, model)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.swa_utils.AveragedModel, "update_parameters", spy)
        avg, log = finetune(imgs, masks, unet, cfg, device="cpu")
    assert log["averaged_models"] == len(snaps) == 2
    for name, p in avg.named_parameters():
        assert torch.allclose(p, (snaps[0][name] + snaps[1][name]) / 2, atol=1e-6)
    assert any(not torch.equal(snaps[0][k], snaps[1][k]) for k in snaps[0])
    last, _ = finetune(imgs, masks, unet, replace(cfg, average_from=0.0), device="cpu")
    bn_avg, bn_last = ([mod for mod in net.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
                       for net in (avg, last))
    assert bn_avg and all(not torch.equal(a.running_mean, b.running_mean)
                          for a, b in zip(bn_avg, bn_last))  # recomputed, not the last run's

    ckpt = _killed_run(imgs, masks, unet, cfg, tmp_path / "ckpt", kill_at=5)
    resumed, _ = finetune(imgs, masks, unet, cfg, device="cpu", checkpoint=ckpt,
                          checkpoint_every=2)
    assert _states_equal(avg, resumed)
    with pytest.raises(ValueError, match="average_from"):
        finetune(imgs, masks, unet, FinetuneConfig(average_from=1.0), device="cpu")
