"""Which device a process computes on: the one place that decides (every stage and the served model ask it).

A GPU when torch sees one (``CUDA_VISIBLE_DEVICES`` empty hides them all), else the CPU. Under
``accelerate launch`` each process takes the GPU of its ``LOCAL_RANK``, as Accelerate does.
"""

from __future__ import annotations

import logging
import os

import torch


def pick_device() -> torch.device:
    """``cuda:<LOCAL_RANK or 0>`` when a CUDA device is visible, else ``cpu``."""
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        index = int(os.environ.get("LOCAL_RANK", "0") or 0)
        return torch.device("cuda", index if index < torch.cuda.device_count() else 0)
    return torch.device("cpu")


def describe_device(device: str | torch.device) -> str:
    """``cuda:0 (NVIDIA H200)`` for a GPU, ``cpu`` for the CPU: what a stage logs once."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else 0
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def stage_device(stage: str, logger: logging.Logger | None = None) -> torch.device:
    """``pick_device()``, logged once as ``<stage>: device cuda:0 (NVIDIA ...)`` (or ``device cpu``)."""
    device = pick_device()
    (logger or logging.getLogger("ddae")).info("%s: device %s", stage, describe_device(device))
    return device
