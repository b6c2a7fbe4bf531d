"""pcl_viewer.device: one resolver for devices, one place for thread counts."""

from __future__ import annotations

import pytest
import torch

from pcl_viewer import device as dv

HAS_CUDA = torch.cuda.is_available()


def test_auto_is_the_best_available_device():
    assert dv.resolve_device("auto") == torch.device(dv.available_devices()[0])
    assert dv.resolve_device(None) == dv.resolve_device("auto")
    assert dv.resolve_device("CPU") == torch.device("cpu")
    assert dv.resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        dv.resolve_device("tpu")


def test_cuda_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match="not available"):
        dv.resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(HAS_CUDA, reason="needs a machine without CUDA")
def test_unavailable_cuda_names_what_is_available():
    with pytest.raises(ValueError, match=r"'cuda' is not available here \(available: .*cpu"):
        dv.resolve_device("cuda")


def test_default_device_changes_auto_inside_the_block_only():
    with dv.default_device("cpu") as dev:
        assert dev == torch.device("cpu")
        assert dv.resolve_device("auto") == torch.device("cpu")
    assert dv._AUTO_DEVICE is None


def test_thread_count_reserves_cores_for_the_gui(monkeypatch):
    monkeypatch.delenv("PCL_VIEWER_THREADS", raising=False)
    cores = dv.usable_cores()
    assert dv.thread_count() == cores
    assert dv.thread_count(gui_reserve=1) == max(1, cores - 1)
    assert dv.thread_count(3, gui_reserve=1) == 3
    monkeypatch.setenv("PCL_VIEWER_THREADS", "1")
    assert dv.thread_count() == 1
    assert dv.thread_count(gui_reserve=1) == 1


def test_limited_threads_restores_the_count():
    before = torch.get_num_threads()
    with dv.limited_threads(before + 1) as n:
        assert n == torch.get_num_threads() == before + 1
    assert torch.get_num_threads() == before


def test_prepare_for_inference_evaluates_on_the_device_in_channels_last_on_cpu():
    net = torch.nn.Conv2d(1, 4, 3).train()
    out = dv.prepare_for_inference(net, "cpu")
    assert out is net and not out.training
    assert out.weight.is_contiguous(memory_format=torch.channels_last)
    plain = dv.prepare_for_inference(torch.nn.Conv2d(1, 4, 3), "cpu", channels_last=False)
    assert plain.weight.is_contiguous()
