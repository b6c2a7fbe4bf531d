"""Distributed pre-training: gathered keys reproduce the single-process loss and gradient,
and `pretrain` runs under torchrun with 2 CPU (gloo) processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pcl_viewer.contrastive.losses import DVDLoss, MVDLoss, SimCLRLoss, SupervisedMVDLoss

B, V, N, D = 4, 3, 6, 5


def _inputs():
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(B, V, N, D, generator=g, dtype=torch.float64), dim=-1).float()
    pos = torch.randint(0, 10, (B, N, 2), generator=g).float() / 10
    labels = torch.randint(1, 3, (B, N), generator=g)  # no background: equal anchor counts per rank
    g1, g2 = torch.randn(B, 7, generator=g), torch.randn(B, 7, generator=g)
    return z, pos, labels, g1, g2


def _losses():
    return {"dvd": DVDLoss(), "mvd": MVDLoss(), "s-mvd": SupervisedMVDLoss()}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    z, pos, labels, g1, g2 = _inputs()
    part = slice(rank * B // world, (rank + 1) * B // world)
    result = {}
    for name, loss in _losses().items():
        zr = z[part].clone().requires_grad_()
        value = loss(zr, pos[part], labels[part])
        value.backward()
        result[name] = (float(value), zr.grad.tolist())
    a, b = g1[part].clone().requires_grad_(), g2[part].clone().requires_grad_()
    value = SimCLRLoss()(a, b)
    value.backward()
    result["simclr"] = (float(value), a.grad.tolist())
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_two_ranks_reproduce_single_process_loss_and_gradient(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, f"file://{tmp_path}/init", str(tmp_path)), nprocs=world)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(world)]
    z, pos, labels, g1, g2 = _inputs()
    for name, loss in _losses().items():
        zz = z.clone().requires_grad_()
        full = loss(zz, pos, labels)
        full.backward()
        # DDP averages the ranks' gradients; each rank's loss is the mean over its anchors
        mean_loss = sum(r[name][0] for r in ranks) / world
        assert mean_loss == pytest.approx(float(full.detach()), abs=1e-5), name
        grads = torch.cat([torch.tensor(r[name][1]) for r in ranks]) / world
        assert torch.allclose(grads, zz.grad, atol=1e-5), name
    a = g1.clone().requires_grad_()
    full = SimCLRLoss()(a, g2)
    full.backward()
    assert all(r["simclr"][0] == pytest.approx(float(full.detach()), abs=1e-5) for r in ranks)
    grads = torch.cat([torch.tensor(r["simclr"][1]) for r in ranks]) / world
    assert torch.allclose(grads, a.grad, atol=1e-5)


SCRIPT = """
import torch
from pcl_viewer.train.pretrain import PretrainConfig, PretrainData, pretrain
torch.set_num_threads(1)
cfg = PretrainConfig.for_preset("smoke", method="mvd-cl", epochs=1, batch_size=4, pixels=32,
                                max_steps_per_epoch=2, probe_train=4, probe_eval=2, probe_steps=5)
pretrain(cfg, PretrainData.synthetic(12, 64), {out!r}, progress=False)
"""


def test_pretrain_runs_under_torchrun_with_two_cpu_processes(tmp_path):
    script = tmp_path / "run.py"
    out = tmp_path / "run"
    script.write_text(textwrap.dedent(SCRIPT.format(out=str(out))))
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["steps"] == 2 and log[0]["loss"] > 0
    assert (out / "bundle" / "card.json").is_file()
