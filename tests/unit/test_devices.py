"""The one device picker: the GPU torch sees (the process's LOCAL_RANK under Accelerate), else the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from ddae_core import devices

REPO = Path(__file__).resolve().parents[2]


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"NVIDIA Fake {index}")


def test_a_visible_gpu_is_picked_and_named(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fake_gpus(monkeypatch, 2)
    assert devices.pick_device() == torch.device("cuda", 0)
    assert devices.describe_device(devices.pick_device()) == "cuda:0 (NVIDIA Fake 0)"
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second process of `accelerate launch` takes the second GPU
    assert devices.pick_device() == torch.device("cuda", 1)
    assert devices.describe_device("cuda:1") == "cuda:1 (NVIDIA Fake 1)"


def test_no_gpu_is_the_cpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert devices.pick_device() == torch.device("cpu")
    assert devices.describe_device(devices.pick_device()) == "cpu"


def test_the_stage_line_names_the_device(monkeypatch, caplog):
    import logging

    fake_gpus(monkeypatch, 1)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    caplog.set_level(logging.INFO, logger="ddae")
    assert devices.stage_device("probe") == torch.device("cuda", 0)
    assert [r.getMessage() for r in caplog.records] == ["probe: device cuda:0 (NVIDIA Fake 0)"]


def test_an_empty_cuda_visible_devices_is_the_cpu():
    """In a fresh process (CUDA reads the variable once): whatever this machine has, none is visible."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", "from ddae_core.devices import pick_device; print(pick_device())"],
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "cpu"
