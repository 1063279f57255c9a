"""One short check of a CUDA machine: ddpm-35m training speed and FLOP/s, the Accelerate loop, features.

Trains the paper's 35.7M UNet (3x32x32, DDPM loss, Adam, clip 1.0) with bf16 autocast and
channels_last for a fixed number of steps; reports images/s and achieved TFLOP/s (FLOPs counted by
``torch.utils.flop_counter``) against the card's nominal dense bf16 peak and a measured matmul peak;
runs ``ddae_core.training.loop.train`` (the pipeline's loop) for a few steps; extracts ``out_6`` features
at t=11. Prints one JSON summary. ``--device cpu --steps 2`` is a dry run of the same code.
Run through ``bench/gpu_check.sh`` (which bounds it to 5 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddae_core.config import DiffusionConfig, TrainConfig
from ddae_core.data import to_model_input
from ddae_core.diffusion import build_denoiser, build_loss
from ddae_core.features import extract_batch
from ddae_core.nn import build_unet, count_parameters, paper_aliases
from ddae_core.training.loop import train

# Nominal dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
# First match wins, so more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
)


def nominal_peak(name: str) -> float | None:
    """The card's dense bf16 peak in TFLOP/s, or None for a card not in the table."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, size: int, repeats: int) -> float:
    """Measured bf16 (CUDA) or fp32 (CPU) matmul throughput: the card's practical ceiling."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def train_speed(device: torch.device, batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """Images/s and achieved TFLOP/s of ddpm-35m training steps (bf16 autocast on CUDA, channels_last)."""
    torch.manual_seed(0)
    diffusion = DiffusionConfig(framework="ddpm")
    unet = build_unet("ddpm-35m", in_channels=3, resolution=32)
    net = build_denoiser(diffusion, unet).to(device).to(memory_format=torch.channels_last)
    loss_fn = build_loss(diffusion)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = (torch.rand(batch, 3, 32, 32, device=device) * 2 - 1).contiguous(memory_format=torch.channels_last)
    generator = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def step() -> None:
        with autocast:
            loss = loss_fn(net, x0, generator).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops_per_step = counter.get_total_flops()
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    elapsed = time.perf_counter() - start
    return {
        "network": "ddpm-35m",
        "parameters": count_parameters(unet),
        "batch": batch,
        "steps": steps,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "images_per_s": steps * batch / elapsed,
        "gflop_per_image": flops_per_step / batch / 1e9,
        "achieved_tflops": flops_per_step * steps / elapsed / 1e12,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def pipeline_loop(device: torch.device, batch: int, steps: int) -> dict[str, Any]:
    """``ddae_core.training.loop.train`` (Accelerate, bf16 on CUDA) on random images: the pipeline's own path."""
    images = np.random.default_rng(0).integers(0, 256, (max(batch * 2, 8), 32, 32, 3), dtype=np.uint8)
    denoiser = build_denoiser(DiffusionConfig(), build_unet("ddpm-35m", in_channels=3, resolution=32))
    config = TrainConfig(steps=steps, batch_size=batch, lr=4e-4, warmup_steps=1, ema_decay=0.9999,
                         mixed_precision="bf16" if device.type == "cuda" else "no",
                         checkpoint_every=steps, log_every=steps)  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        result = train(denoiser, build_loss(DiffusionConfig()), images, config, out_dir=out, progress=False)
    last = result.history[-1]
    return {"steps": result.step, "loss": last["loss"], "images_per_s": last["images_per_s"], "wall_s": result.wall_s}


def features(device: torch.device, count: int, batch: int) -> dict[str, Any]:
    """Pooled ``out_6`` features at t=11 (the paper's DDPM readout) for ``count`` random images."""
    unet = build_unet("ddpm-35m", in_channels=3, resolution=32)
    net = build_denoiser(DiffusionConfig(), unet).to(device).eval()
    tap = paper_aliases(unet.config)["out_6"]
    images = np.random.default_rng(1).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    x = to_model_input(images)  # (N, 3, 32, 32) in [-1, 1]
    sync(device)
    start = time.perf_counter()
    dims = None
    for lo in range(0, count, batch):
        out = extract_batch(net, x[lo : lo + batch].to(device), np.arange(lo, min(lo + batch, count)),
                            taps=[tap], levels=[11.0], pools=[1], seed=0)  # fmt: skip
        dims = next(iter(out.values())).shape[1]
    sync(device)
    return {"tap": f"out_6 = {tap}", "images": count, "dims": dims,
            "images_per_s": count / (time.perf_counter() - start)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, allocator)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (the paper: 128 per GPU)")
    parser.add_argument("--loop-steps", type=int, default=20, help="steps of the pipeline's own training loop")
    parser.add_argument("--extract-images", type=int, default=4096)
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda}); "
              "on a CPU machine run: bash bench/gpu_check.sh --device cpu --steps 2", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary: dict[str, Any] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    quick = device.type == "cpu"
    summary["train"] = train_speed(device, args.batch, args.steps, 1 if quick else args.warmup)
    peak = nominal_peak(name) if device.type == "cuda" else None
    measured = matmul_peak_tflops(device, 1024 if quick else 8192, 2 if quick else 50)
    achieved = summary["train"]["achieved_tflops"]
    summary["peak"] = {
        "nominal_bf16_tflops": peak,
        "measured_matmul_tflops": measured,
        "achieved_over_nominal": achieved / peak if peak else None,
        "achieved_over_measured": achieved / measured,
    }
    summary["pipeline_loop"] = pipeline_loop(device, args.batch, 2 if quick else args.loop_steps)
    summary["features"] = features(device, min(args.extract_images, 64) if quick else args.extract_images,
                                   32 if quick else 512)  # fmt: skip
    summary["wall_s"] = time.perf_counter() - started

    t, p = summary["train"], summary["peak"]
    print(f"{name}: ddpm-35m {t['parameters']:,} params, batch {t['batch']}, {t['precision']}, channels_last")
    print(f"  training   {t['images_per_s']:.0f} images/s, {t['achieved_tflops']:.1f} TFLOP/s achieved "
          f"({t['gflop_per_image']:.1f} GFLOP per image per step)")
    if p["nominal_bf16_tflops"]:
        print(f"  peak       {100 * p['achieved_over_nominal']:.1f}% of the nominal {p['nominal_bf16_tflops']:.0f} "
              f"TFLOP/s dense bf16; matmul measured {p['measured_matmul_tflops']:.0f} TFLOP/s")
    else:
        print(f"  peak       matmul measured {p['measured_matmul_tflops']:.2f} TFLOP/s "
              f"({100 * p['achieved_over_measured']:.1f}% of it achieved)")
    print(f"  loop       ddae_core.training.loop.train: {summary['pipeline_loop']['images_per_s']:.0f} images/s")
    print(f"  features   {summary['features']['images_per_s']:.0f} images/s ({summary['features']['tap']}, t=11)")
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
