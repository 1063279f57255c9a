"""Throughput of our UNet against diffusers' UNet2DModel, matmul peak, and achieved training FLOP/s.

Both networks train the same way: noisy input -> net -> MSE to the noise -> backward -> clip 1.0 ->
Adam, same batch, same autocast precision, same threads; measurements alternate A/B round by round
so a neighbour's load hits both alike, and the medians are compared.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ddae_core.nn import build_unet, count_parameters
from ddae_core.nn.unet import UNetConfig
from ddae_core.precision import native_bf16

_AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def diffusers_twin(config: UNetConfig) -> nn.Module:
    """diffusers ``UNet2DModel`` with our UNet's widths, depth, attention levels, heads and norm groups.

    Attention resolutions map to ``Attn{Down,Up}Block2D`` at those levels; one head per attention
    layer (``attention_head_dim`` = width); ``norm_num_groups`` = the group count our ``group_norm``
    gives the base width (it must divide every width in diffusers). For ``ddpm-small`` the parameter
    counts are equal.
    """
    from diffusers import UNet2DModel

    widths = tuple(config.base_channels * m for m in config.channel_mults)
    levels = config.level_resolutions()
    down = tuple("AttnDownBlock2D" if r in config.attn_resolutions else "DownBlock2D" for r in levels)
    up = tuple("AttnUpBlock2D" if r in config.attn_resolutions else "UpBlock2D" for r in reversed(levels))
    attn_widths = [w for w, r in zip(widths, levels) if r in config.attn_resolutions] + [widths[-1]]
    groups = max(g for g in range(1, min(32, config.base_channels // 4) + 1)
                 if all(w % g == 0 for w in widths))
    return UNet2DModel(
        sample_size=config.resolution, in_channels=config.in_channels, out_channels=config.output_channels,
        block_out_channels=widths, layers_per_block=config.num_res_blocks, down_block_types=down,
        up_block_types=up, attention_head_dim=max(attn_widths) // config.num_heads, norm_num_groups=groups,
        dropout=config.dropout, add_attention=config.mid_attn,
    )


@dataclass
class _Trainer:
    """One network's training step on a fixed batch (data generation is outside the timed region)."""

    name: str
    model: nn.Module
    call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer

    def step(self, x: torch.Tensor, label: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None) -> None:
        device_type = x.device.type
        ctx = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            out = self.call(x, label)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(shape: tuple[int, int, int], batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch, *shape), generator=gen).to(device)  # (B, C, H, W)
    t = torch.randint(1, 1001, (batch,), generator=gen).to(device)  # DDPM steps
    target = torch.randn((batch, *shape), generator=gen).to(device)
    return x, t, target


def compare_training(
    network: str, shape: tuple[int, int, int], *, batch: int, precision: str, rounds: int, steps: int,
    warmup: int = 1, device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Interleaved training images/s of our ``network`` and its diffusers twin; plus FLOPs per step."""
    device = torch.device(device)
    dtype = _AUTOCAST[precision]
    torch.manual_seed(0)
    ours = build_unet(network, in_channels=shape[0], resolution=shape[1]).to(device).train()
    twin = diffusers_twin(ours.config).to(device).train()
    # our UNet takes the DDPM noise label 1000 t / T (t here already on that scale); diffusers takes t
    trainers = [
        _Trainer("ours", ours, lambda x, t: ours(x, t.float()), torch.optim.Adam(ours.parameters(), lr=1e-4)),
        _Trainer("diffusers", twin, lambda x, t: twin(x, t).sample, torch.optim.Adam(twin.parameters(), lr=1e-4)),
    ]
    x, t, target = _batch(shape, batch, device)
    for trainer in trainers:
        for _ in range(warmup):
            trainer.step(x, t, target, dtype)
    times: dict[str, list[float]] = {tr.name: [] for tr in trainers}
    for r in range(rounds):
        order = trainers if r % 2 == 0 else trainers[::-1]  # alternate who goes first
        for trainer in order:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                trainer.step(x, t, target, dtype)
            _sync(device)
            times[trainer.name].append(time.perf_counter() - start)
    rates = {name: [batch * steps / s for s in values] for name, values in times.items()}
    flops = {tr.name: train_step_flops(tr, x, t, target) for tr in trainers}
    med = {name: statistics.median(v) for name, v in rates.items()}
    return {
        "network": network, "input_shape": list(shape), "batch": batch, "precision": precision,
        "threads": torch.get_num_threads(), "device": str(device), "rounds": rounds, "steps_per_round": steps,
        "ours_parameters": count_parameters(ours), "diffusers_parameters": count_parameters(twin),
        "ours_img_s": med["ours"], "diffusers_img_s": med["diffusers"],
        "ours_img_s_rounds": rates["ours"], "diffusers_img_s_rounds": rates["diffusers"],
        "ratio": med["ours"] / med["diffusers"],
        "ours_flops_per_step": flops["ours"], "diffusers_flops_per_step": flops["diffusers"],
    }


def _cpu_attention_formulas() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels ``FlopCounterMode`` does not know (it counts 0)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(q, k, v, *_args, out_shape=None, **_kwargs) -> int:
            return sdpa_flop_count(q, k, v)

        def backward(grad_out, q, k, v, *_args, out_shape=None, **_kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, q, k, v)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


def train_step_flops(trainer: _Trainer, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> int:
    """FLOPs of one forward + backward (fp32, counted by ``FlopCounterMode``; no optimizer step).

    Matmuls and convolutions, attention included (the CPU attention kernels are added here)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_formulas())
    with counter:
        F.mse_loss(trainer.call(x, t).float(), target).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def matmul_peak(size: int, repeats: int, device: str | torch.device = "cpu") -> dict[str, float | None]:
    """Best-of-``repeats`` GFLOP/s of a square ``size`` matmul in fp32 and bf16 (2 n^3 FLOPs each).

    bf16 only where ``device`` computes it natively (None elsewhere): an emulated bf16 matmul is no peak,
    and on an AVX2 CPU one 2048 x 2048 product took about a minute."""
    device = torch.device(device)
    out: dict[str, float | None] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not native_bf16(device):
            out[f"{name}_gflop_s"] = None
            continue
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        torch.mm(a, b)  # warm-up (oneDNN/cuBLAS kernel selection)
        best = float("inf")
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        out[f"{name}_gflop_s"] = 2 * size**3 / best / 1e9
    out["size"] = size
    return out


def op_report(network: str, shape: tuple[int, int, int], *, batch: int, precision: str, steps: int = 3,
              top: int = 15) -> list[dict[str, Any]]:
    """Where one training step of our UNet spends its time: the profiler's top ``top`` operators by own
    CPU time over ``steps`` steps (after one warm-up), with their share of the total."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    net = build_unet(network, in_channels=shape[0], resolution=shape[1]).train()
    trainer = _Trainer("ours", net, lambda x, t: net(x, t.float()), torch.optim.Adam(net.parameters(), lr=1e-4))
    x, t, target = _batch(shape, batch, torch.device("cpu"))
    dtype = _AUTOCAST[precision]
    trainer.step(x, t, target, dtype)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.step(x, t, target, dtype)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "calls_per_step": e.count / steps, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "share": e.self_cpu_time_total / total} for e in events[:top]]


_ONEDNN_STEPS = """
import sys, torch
sys.path.insert(0, {bench!r})
import speed
torch.manual_seed(0)
net = speed.build_unet({network!r}, in_channels={channels}, resolution={size}).train()
trainer = speed._Trainer("ours", net, lambda x, t: net(x, t.float()), torch.optim.Adam(net.parameters(), lr=1e-4))
x, t, target = speed._batch(({channels}, {size}, {size}), {batch}, torch.device("cpu"))
for _ in range(2):
    trainer.step(x, t, target, speed._AUTOCAST[{precision!r}])
print("ddae-kernel-report-start", flush=True)
trainer.step(x, t, target, speed._AUTOCAST[{precision!r}])
"""


def onednn_report(network: str, shape: tuple[int, int, int], *, batch: int, precision: str) -> list[dict[str, Any]]:
    """Which oneDNN implementations one training step runs (``ONEDNN_VERBOSE=1`` in a child process):
    per (primitive, implementation) the calls and milliseconds of the step after two warm-ups, slowest first."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = _ONEDNN_STEPS.format(bench=str(Path(__file__).resolve().parent), network=network, channels=shape[0],
                                size=shape[1], batch=batch, precision=precision)
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for line in out.split("ddae-kernel-report-start", 1)[-1].splitlines():
        fields = line.split(",")
        if len(fields) < 8 or fields[0] != "onednn_verbose" or "exec" not in fields[:4]:
            continue
        at = fields.index("exec")
        kind, impl = fields[at + 2], fields[at + 3]
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        row = rows.setdefault((kind, impl), {"primitive": kind, "implementation": impl, "calls": 0, "ms": 0.0})
        row["calls"] += 1
        row["ms"] += ms
    return sorted(rows.values(), key=lambda r: -r["ms"])
