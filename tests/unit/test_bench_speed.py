"""bench/speed.py's matmul peak: measured only in the precisions a device computes natively.

An emulated bf16 product is no peak (one 2048 x 2048 product took about a minute on an AVX2 CPU), so on
such a CPU the benchmark records none and divides by the fp32 peak instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("speed", REPO / "bench" / "speed.py")
speed = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = speed  # its dataclass looks its module up there
spec.loader.exec_module(speed)


def test_the_bf16_peak_is_not_measured_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device: False)
    peak = speed.matmul_peak(64, 1)
    assert peak["bf16_gflop_s"] is None
    assert peak["fp32_gflop_s"] > 0
    assert peak["size"] == 64


def test_the_bf16_peak_is_measured_where_bf16_is_native(monkeypatch):
    monkeypatch.setattr(speed, "native_bf16", lambda device: True)
    peak = speed.matmul_peak(64, 1)
    assert peak["bf16_gflop_s"] > 0
    assert peak["fp32_gflop_s"] > 0
