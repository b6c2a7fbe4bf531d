"""Interrupted work: kill -9 during ``pcl review``, ``pcl train-cf`` and ``pcl pretrain``.

Each test runs the command in a subprocess, sends SIGKILL once the first unit of
work is safely on disk (a journaled batch, a checkpoint), runs the same command
again, and checks that it resumed (did not start over) and that its final
results equal those of an uninterrupted run with the same seed: exactly for the
review, within float tolerance for training.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_viewer.review import JOURNAL, load_journal
from tests.test_review import write_scans

PCL = [sys.executable, "-m", "pcl_viewer.cli"]
ENV = {**os.environ, "PCL_VIEWER_THREADS": "1", "PYTHONHASHSEED": "0"}


def random_cf_bundle(path: Path, preset: str = "smoke") -> Path:
    """A counterfactual bundle (HVAE + attribute classifiers) with seeded random weights."""
    from pcl_viewer.models.bundle import save_bundle
    from pcl_viewer.models.classifiers import ClassifierConfig, build_classifiers
    from pcl_viewer.models.hvae import HVAEConfig, build_hvae

    torch.manual_seed(0)
    h, c = HVAEConfig.for_preset(preset), ClassifierConfig.for_preset(preset)
    save_bundle(path, {"name": f"cf-{preset}-random", "version": "0", "kind": "counterfactual"},
                {"hvae": ("hvae", {"hvae": h.to_dict()}, build_hvae(h)),
                 "classifier": ("attribute-classifier", {"classifier": c.to_dict()},
                                build_classifiers(c))})
    return path


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(PCL + args, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def kill_when(args: list[str], ready: Callable[[], bool], timeout: float = 300) -> bool:
    """Start ``pcl ARGS``; SIGKILL it as soon as ``ready()``. False if it finished first."""
    proc = subprocess.Popen(PCL + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=ENV)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if ready():
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return proc.returncode == -signal.SIGKILL
            time.sleep(0.01)
        err = proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert proc.returncode == 0, f"{args} failed before the kill:\n{err}"
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        if proc.stderr:
            proc.stderr.close()


def _command_or_xfail(module: str, attr: str) -> None:
    try:
        getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        pytest.xfail(f"{module}:{attr} is not in the tree yet ({exc})")


# --------------------------------------------------------------------- review


def _journal_batches(out: Path) -> int:
    path = out / JOURNAL
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_bytes().split(b"\n")[:-1] if line.startswith(b'{"batch"'))


def test_kill_9_during_review_resumes_and_equals_an_uninterrupted_run(tmp_path, seg_bundle_path):
    cf = random_cf_bundle(tmp_path / "cf")
    write_scans(tmp_path / "in", 60, size=(128, 112))
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # truncated: an error row
    common = [str(tmp_path / "in"), "--bundle", str(cf), "--seg-bundle", str(seg_bundle_path),
              "--batch-size", "4", "--workers", "1", "--device", "cpu"]
    run(["review", *common, "--out", str(tmp_path / "ref")])

    cut = tmp_path / "cut"
    killed = kill_when(["review", *common, "--out", str(cut)],
                       ready=lambda: _journal_batches(cut) >= 2)
    assert killed, "the review finished before the kill; give it more scans"
    assert not (cut / "report.csv").exists()  # never half written: only at the end
    kept = len(load_journal(cut)[1])
    assert 8 <= kept < 61

    again = run(["review", *common, "--out", str(cut)])
    assert f"({kept} already done;" in again.stdout
    for name in ("report.csv", "errors.csv"):
        assert (cut / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert len((cut / "report.csv").read_text().splitlines()) == 1 + 60 * 2
    assert "broken.png" in (cut / "errors.csv").read_text()


# ------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def phantom_smoke(tmp_path_factory) -> Path:
    """A tiny phantom dataset (64 px) with true counterfactuals, written by the CLI."""
    _command_or_xfail("pcl_viewer.commands.phantom", "phantom")
    root = tmp_path_factory.mktemp("phantom") / "data"
    run(["phantom", "generate", "--n", "48", "--size", "64", "--seed", "3", "--out", str(root),
         "--counterfactuals", "--workers", "1"])
    return root


def _weight_diff(a_dir: Path, b_dir: Path) -> float:
    """Largest absolute weight difference between two bundles (reported, not asserted)."""
    from safetensors.torch import load_file

    worst = 0.0
    for f in sorted(a_dir.glob("*.safetensors")):
        a, b = load_file(str(f)), load_file(str(b_dir / f.name))
        assert a.keys() == b.keys()
        worst = max([worst] + [float((a[k].float() - b[k].float()).abs().max())
                               for k in a if a[k].is_floating_point() and a[k].numel()])
    return worst


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3) -> float:
    """Relative difference ``max|a - b| / max|a|``, asserted below ``rtol``.

    Training is compared by what the networks compute, not weight by weight: a conv
    bias followed by BatchNorm has no effect and a near-zero gradient, so Adam moves it
    by float noise alone; two equal runs can differ there by 1e-2 and compute the same.
    """
    rel = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    assert rel < rtol, rel
    return rel


def _probe() -> torch.Tensor:
    return torch.rand(4, 1, 64, 64, generator=torch.Generator().manual_seed(123))


def test_kill_9_during_train_cf_resumes_from_the_last_checkpoint(tmp_path, phantom_smoke):
    _command_or_xfail("pcl_viewer.commands.cf", "train_cf")
    from pcl_viewer.models.counterfactual import CounterfactualModel

    common = ["train-cf", "--data", str(phantom_smoke), "--preset", "smoke", "--steps", "60",
              "--classifier-steps", "20", "--checkpoint-every", "10", "--seed", "5",
              "--threads", "1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run([*common, "--out", str(ref)], timeout=600)
    # The run folder is BUNDLE.run; kill once the first HVAE checkpoint is on disk.
    history = cut.with_name("cut.run") / "history.jsonl"
    killed = kill_when([*common, "--out", str(cut)], timeout=600,
                       ready=lambda: history.is_file() and b'"hvae"' in history.read_bytes())
    assert killed, "train-cf finished before its first checkpoint; use more steps"
    assert not (cut / "card.json").exists()
    killed_at = len(history.read_text().splitlines())
    run([*common, "--out", str(cut)], timeout=600)
    # Resumed, not restarted: the appended history has no step twice (a restart would).
    steps = [(e["stage"], e["step"]) for e in map(json.loads, history.read_text().splitlines())]
    assert len(steps) == len(set(steps)) and len(steps) > killed_at
    m_ref, m_cut = CounterfactualModel.from_bundle(ref), CounterfactualModel.from_bundle(cut)
    x, pa = _probe(), torch.zeros(4, 3)
    p_ref, p_cut = m_ref.infer_parents(x), m_cut.infer_parents(x)
    rel = max(_close(p_ref[k], p_cut[k]) for k in p_ref)
    do = {"scanner": "philips", "effusion": "present"}
    rel = max(rel, _close(m_ref.counterfactual(x, pa, do), m_cut.counterfactual(x, pa, do)))
    print(f"\ntrain-cf: killed after {killed_at} checkpoints; outputs rel. diff {rel:.1e}; "
          f"max weight diff {_weight_diff(ref, cut):.1e}")


def test_kill_9_during_pretrain_resumes_from_the_last_checkpoint(tmp_path, phantom_smoke):
    _command_or_xfail("pcl_viewer.commands.pretrain", "pretrain")
    from pcl_viewer.models.bundle import ModelBundle

    common = ["pretrain", "--method", "dvd-cl", "--views", "true", "--data", str(phantom_smoke),
              "--preset", "smoke", "--epochs", "3", "--seed", "5", "--no-progress"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run([*common, "--out", str(ref)], timeout=600)
    killed = kill_when([*common, "--out", str(cut)], timeout=600,
                       ready=lambda: (cut / "checkpoints" / "last" / "state.json").is_file())
    assert killed, "pretrain finished before its first checkpoint; use more epochs"
    again = run([*common, "--out", str(cut)], timeout=600)
    assert "resuming" in again.stdout + again.stderr
    losses = [[e["loss"] for e in map(json.loads, (d / "log.jsonl").read_text().splitlines())]
              for d in (ref, cut)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-3)
    nets = [ModelBundle.load(d / "bundle").build("unet") for d in (ref, cut)]
    with torch.no_grad():
        rel = _close(*(net.features(_probe()) for net in nets))
    print(f"\npretrain: resumed; features rel. diff {rel:.1e}; "
          f"max weight diff {_weight_diff(ref / 'bundle', cut / 'bundle'):.1e}")
