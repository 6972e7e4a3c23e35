"""Which GPUs and how many threads `c5snn workers` gives its children, as a scheduler binds them."""

from __future__ import annotations

import os

import pytest
import torch

from c5snn.errors import DeviceError
from c5snn.launcher import default_threads, parse_gpus


def test_gpu_ids_count_from_what_this_process_sees(monkeypatch):
    """Under Slurm's binding (or Kubernetes' device plugin) CUDA_VISIBLE_DEVICES lists the job's
    GPUs: `--gpus 1` is the job's second GPU, passed on by its name, not physical GPU 1."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert parse_gpus("1") == ["5"]
    assert parse_gpus("all") == ["3", "5"]
    assert parse_gpus("0,0,1") == ["3", "3", "5"]  # several workers per GPU
    with pytest.raises(DeviceError, match="GPU 2 does not exist; this process sees 2"):
        parse_gpus("2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert parse_gpus("all") == ["0", "1"]
    assert parse_gpus("") is None


def test_all_gpus_without_any_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="sees no CUDA device"):
        parse_gpus("all")


def test_cpu_workers_share_the_cores_allotted_not_the_node(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {4, 5, 6, 7})  # a 4-core allocation
    assert default_threads(2, None) == 2
    assert default_threads(8, None) == 1
    assert default_threads(2, ["0"]) == 1  # GPU workers: one thread each
