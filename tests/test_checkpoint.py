"""Atomic, pickle-free training checkpoints."""

from __future__ import annotations

import torch

from pcl_viewer.train.checkpoint import load_checkpoint, save_checkpoint


def test_model_and_optimizer_state_round_trip(tmp_path):
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"model": net.state_dict(), "optim": opt.state_dict(), "epoch": 3,
             "rng": torch.get_rng_state(), "history": [0.5, (1, 2)]}
    save_checkpoint(tmp_path / "ckpt", state)
    back = load_checkpoint(tmp_path / "ckpt")
    assert back["epoch"] == 3 and back["history"] == [0.5, (1, 2)]
    assert torch.equal(back["rng"], state["rng"])
    net2 = torch.nn.Linear(4, 3)
    net2.load_state_dict(back["model"])
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optim"])
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    key = next(iter(opt.state))
    key2 = next(iter(opt2.state))
    assert torch.equal(opt.state[key]["exp_avg"], opt2.state[key2]["exp_avg"])


def test_missing_checkpoint_is_none_and_old_copy_is_recovered(tmp_path):
    assert load_checkpoint(tmp_path / "none") is None
    save_checkpoint(tmp_path / "ckpt", {"epoch": 1})
    # Simulate a kill between the two renames: only the .old copy remains.
    (tmp_path / "ckpt").rename(tmp_path / ".ckpt.old")
    assert load_checkpoint(tmp_path / "ckpt")["epoch"] == 1


def test_overwrite_leaves_no_temporary_folders(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"epoch": 1})
    save_checkpoint(tmp_path / "ckpt", {"epoch": 2})
    assert load_checkpoint(tmp_path / "ckpt")["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
