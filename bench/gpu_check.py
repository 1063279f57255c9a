"""One short check of a CUDA machine: training speed and MFU, the loops, features, a pipeline slice.

Trains the paper's UNets (``ddpm-35m``, ``ddpmpp-56m``; 3x32x32, DDPM loss, Adam, clip 1.0) with bf16
autocast and channels_last for a fixed number of steps; reports images/s, achieved TFLOP/s (FLOPs
counted by ``torch.utils.flop_counter``) and MFU, achieved over the card's nominal dense bf16 peak
(``BF16_PEAK_TFLOPS`` by device name; ``DDAE_PEAK_TFLOPS`` overrides it), beside a measured matmul
peak; runs ``ddae_core.training.loop.train`` (the pipeline's loop) for a few steps; extracts ``out_6``
features at t=11; times the online probe (``ddae_core.heads.probe_online.online_probe``, one epoch on
a few hundred images); and runs a slice of the ``cifar10-ddpm`` profile end to end (``ddae profile``,
then ``ddae run --set ...`` in a copy of the project, steps sized to the measured speed). Prints one
JSON summary (``--out``) and a markdown table (``--markdown``). ``--dry-run`` runs every part at toy
scale on the CPU. Run through ``bench/gpu_check.sh`` (which bounds it to 10 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddae_core.config import DiffusionConfig, TrainConfig
from ddae_core.data import to_model_input
from ddae_core.diffusion import build_denoiser, build_loss
from ddae_core.features import extract_batch
from ddae_core.heads.probe_online import ImageSet, online_probe
from ddae_core.nn import build_unet, count_parameters, paper_aliases
from ddae_core.readout import Readout
from ddae_core.training.loop import train

REPO = Path(__file__).resolve().parents[1]
PEAK_ENV = "DDAE_PEAK_TFLOPS"  # overrides the table: the dense bf16 peak of this card (or a CPU's), TFLOP/s
NETWORKS = ("ddpm-35m", "ddpmpp-56m")

# Nominal dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
# First match wins, so more specific names come first.
BF16_PEAK_TFLOPS = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.1), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("RTX 4090", 165.2), ("RTX 3090", 71.0), ("A6000", 154.8),
)


def nominal_peak(name: str, env: dict[str, str] | None = None) -> float | None:
    """The card's dense bf16 peak in TFLOP/s: ``DDAE_PEAK_TFLOPS`` if set, else the table (None: not in it)."""
    override = (os.environ if env is None else env).get(PEAK_ENV)
    if override:
        return float(override)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def mfu(achieved_tflops: float, peak_tflops: float | None) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak (None without a peak)."""
    return achieved_tflops / peak_tflops if peak_tflops else None


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


def train_speed(device: torch.device, batch: int, steps: int, warmup: int, network: str = "ddpm-35m") -> dict[str, Any]:
    """Images/s and achieved TFLOP/s of ``network`` training steps (bf16 autocast on CUDA, channels_last)."""
    torch.manual_seed(0)
    diffusion = DiffusionConfig(framework="ddpm")
    unet = build_unet(network, in_channels=3, resolution=32)
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
        "network": network,
        "parameters": count_parameters(unet),
        "batch": batch,
        "steps": steps,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "images_per_s": steps * batch / elapsed,
        "gflop_per_image": flops_per_step / batch / 1e9,
        "achieved_tflops": flops_per_step * steps / elapsed / 1e12,
        "max_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def online_probe_speed(device: torch.device, images: int, batch: int) -> dict[str, Any]:
    """Images/s of the paper's online probe (one epoch on ``images`` train images, network re-run every batch)."""
    unet = build_unet("ddpm-35m", in_channels=3, resolution=32)
    net = build_denoiser(DiffusionConfig(), unet).to(device).eval()
    readout = Readout((paper_aliases(unet.config)["out_6"],), 11.0, 1, 0)
    rng = np.random.default_rng(2)

    def split(n: int, start: int) -> ImageSet:
        return ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 10,
                        np.arange(start, start + n))

    evaluated = max(images // 4, 10)
    result = online_probe(net, split(images, 0), split(evaluated, images), split(evaluated, images + evaluated),
                          readout=readout, num_classes=10, epochs=1, batch_size=batch, eval_batch_size=batch * 2,
                          device=device, progress=False)
    return {"readout": readout.label, "epochs": 1, "train_images": result.train_images,
            "forward_passes": result.forward_passes, "wall_s": result.wall_s,
            "images_per_s": result.forward_passes / result.wall_s}


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


PROJECT_ITEMS = ("ddae_core", "tasks", "flows", "dvc.yaml", "params.yaml", ".dvc", ".dvcignore", "prefect.yaml",
                 ".gitignore", "profiles")  # what a pipeline checkout needs
DEVICE_LINE = re.compile(r"\b(\w+): device (\S+(?: \([^)]*\))?)")  # "probe: device cuda:0 (NVIDIA H200)"


def synthetic_cifar(folder: Path, train_per_class: int, test_per_class: int) -> Path:
    """A CIFAR-shaped image folder (10 classes of 32x32 RGB PNGs, a class-dependent colour plus noise)."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label in range(10):
            target = folder / split / f"class{label}"
            target.mkdir(parents=True)
            base = np.array([25 * label, 255 - 25 * label, 128], dtype=np.float64)
            for i in range(count):
                pixels = np.clip(base + rng.normal(0, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(target / f"{i}.png")
    return folder


def slice_overrides(dry_run: bool, steps: int, source: dict[str, str]) -> dict[str, str]:
    """``--set`` values on top of the cifar10-ddpm profile: its network, readout and protocol, fewer steps."""
    common = {**source, "pretrain.train.steps": str(steps), "pretrain.train.warmup_steps": str(max(1, steps // 10)),
              "pretrain.train.checkpoint_every": str(max(1, steps // 2)), "pretrain.train.log_every": "10",
              "pretrain.samples.count": "16", "probe.online_epochs": "1"}
    if not dry_run:
        return {**common, "pretrain.samples.steps": "20"}
    # mixed_precision quoted: YAML reads a bare no as false
    return {**common, "pretrain.network.name": "ddpm-tiny", "pretrain.train.batch_size": "16",
            "pretrain.train.mixed_precision": "'no'", "pretrain.samples.count": "4", "pretrain.samples.steps": "2",
            "extract.taps": "[mid]", "extract.batch_size": "64", "probe.max_iter": "20",
            "probe.online_batch_size": "32", "diagnostics.knn_queries": "0"}


def slice_env(root: Path) -> dict[str, str]:
    """The copy's own state (tracking store, Prefect home), its code first, offline, this venv's tools on PATH."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PREFECT_API_URL", "PREFECT_PROFILE", "DDAE_PIPELINE_RUN_ID", "DDAE_REPO",
                          "MLFLOW_TRACKING_URI")}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", "PYTHONPATH": str(root),
                "PREFECT_HOME": str(root.parent / "prefect-home"), "DO_NOT_TRACK": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DVC_NO_ANALYTICS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1",
                "GIT_AUTHOR_NAME": "gpu-check", "GIT_AUTHOR_EMAIL": "gpu-check@example.invalid",
                "GIT_COMMITTER_NAME": "gpu-check", "GIT_COMMITTER_EMAIL": "gpu-check@example.invalid"})
    return env


def pipeline_slice(*, dry_run: bool, steps: int, timeout_s: float, cifar10: str | None) -> dict[str, Any]:
    """The cifar10-ddpm profile end to end in a copy of this project: ``ddae profile``, ``ddae run --set``.

    CIFAR-10 from ``cifar10`` (a local copy: the machine may be offline), else a synthetic CIFAR-shaped
    image folder. Returns wall time, exit code, each stage's logged device and the main metrics.
    """
    with tempfile.TemporaryDirectory(prefix="ddae-gpu-check-") as tmp:
        root = Path(tmp) / "project"
        root.mkdir()
        for item in PROJECT_ITEMS:
            source = REPO / item
            if source.is_dir():
                shutil.copytree(source, root / item, ignore=shutil.ignore_patterns("__pycache__", "tmp", "cache"))
            elif source.is_file():
                shutil.copy2(source, root / item)
        env = slice_env(root)
        for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "gpu check"]):
            subprocess.run(["git", *command], cwd=root, env=env, check=True, capture_output=True)
        if cifar10:
            data = {"data.source": cifar10}
        else:
            folder = synthetic_cifar(Path(tmp) / "images", 20 if dry_run else 500, 5 if dry_run else 100)
            data = {"data.dataset": "imagefolder", "data.source": str(folder)}
        cli = [sys.executable, "-m", "flows.cli"]
        subprocess.run([*cli, "profile", "cifar10-ddpm"], cwd=root, env=env, check=True, capture_output=True)
        overrides = slice_overrides(dry_run, steps, data)
        sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
        start = time.perf_counter()
        try:
            run = subprocess.run([*cli, "run", *sets], cwd=root, env=env, capture_output=True, text=True,
                                 timeout=timeout_s)
            code, output = run.returncode, run.stdout + run.stderr
        except subprocess.TimeoutExpired as err:
            code, output = "timeout", (err.stdout or b"").decode() + (err.stderr or b"").decode()
        wall = time.perf_counter() - start
        metrics = {name: json.loads((root / "metrics" / f"{name}.json").read_text())
                   for name in ("pretrain", "probe", "evaluate") if (root / "metrics" / f"{name}.json").is_file()}
    pretrain, probe = metrics.get("pretrain", {}), metrics.get("probe", {})
    return {"profile": "cifar10-ddpm", "data": "cifar10" if cifar10 else "synthetic CIFAR-shaped image folder",
            "overrides": overrides, "exit_code": code, "wall_s": wall,
            "devices": dict(DEVICE_LINE.findall(output)),  # stage -> the device it logged
            "pretrain_steps": pretrain.get("steps"), "pretrain_images_per_s": pretrain.get("images_per_s"),
            "probe_test_acc": probe.get("test_acc"), "online_test_acc": probe.get("online_test_acc"),
            "online_wall_s": probe.get("online_wall_s"),
            "log_tail": output[-3000:] if code != 0 else ""}


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the markdown table docs/benchmarks.md takes."""
    lines = [f"GPU check on {summary['device']} (torch {summary['torch']}, CUDA {summary['cuda']}), "
             f"{summary['wall_s']:.0f} s{' (dry run: toy scale on the CPU)' if summary['dry_run'] else ''}.", "",
             "| training (channels_last) | parameters | precision | batch | images/s | GFLOP/image | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|"]
    for t in summary["train"]:
        share = f"{100 * t['mfu']:.1f}%" if t["mfu"] is not None else "n/a"
        lines.append(f"| {t['network']} | {t['parameters']:,} | {t['precision']} | {t['batch']} | "
                     f"{t['images_per_s']:.1f} | "
                     f"{t['gflop_per_image']:.1f} | {t['achieved_tflops']:.1f} | {share} |")
    peak = summary["peak"]
    o, f, p = summary["online_probe"], summary["features"], summary["pipeline"]
    lines += ["", f"Peak: nominal {peak['nominal_bf16_tflops']} TFLOP/s dense bf16, matmul measured "
                  f"{peak['measured_matmul_tflops']:.1f} TFLOP/s. Pipeline loop: "
                  f"{summary['pipeline_loop']['images_per_s']:.0f} images/s. Features ({f['tap']}, t=11): "
                  f"{f['images_per_s']:.0f} images/s. Online probe (1 epoch, {o['train_images']} train images): "
                  f"{o['images_per_s']:.0f} images/s.", "",
              f"Pipeline slice ({p['profile']}, {p['data']}, {p['pretrain_steps']} steps): exit {p['exit_code']}, "
              f"{p['wall_s']:.0f} s; pretrain {p['pretrain_images_per_s'] or 0:.0f} images/s; probe test accuracy "
              f"{p['probe_test_acc']}; online {p['online_test_acc']}; devices {p['devices']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy scale on the CPU (~3 min)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per network")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (cuDNN autotune, allocator)")
    parser.add_argument("--batch", type=int, default=128, help="images per step (the paper: 128 per GPU)")
    parser.add_argument("--loop-steps", type=int, default=20, help="steps of the pipeline's own training loop")
    parser.add_argument("--extract-images", type=int, default=4096)
    parser.add_argument("--online-images", type=int, default=512, help="train images of the online probe's epoch")
    parser.add_argument("--slice-train-s", type=float, default=150.0,
                        help="pretraining seconds the pipeline slice aims at (its steps follow from the speed)")
    parser.add_argument("--slice-timeout-s", type=float, default=330.0, help="the pipeline slice's limit")
    parser.add_argument("--cifar10", default=os.environ.get("DDAE_CIFAR10"),
                        help="a local CIFAR-10 copy for the slice (default $DDAE_CIFAR10; else synthetic images)")
    parser.add_argument("--out", default=None, help="write the JSON summary here")
    parser.add_argument("--markdown", default=None, help="write the markdown table here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.dry_run:
        args.device, args.steps, args.warmup, args.batch = "cpu", 1, 1, 2
        args.loop_steps, args.extract_images, args.online_images = 2, 32, 64

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda}); "
              "on a CPU machine run: bash bench/gpu_check.sh --dry-run", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    started = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    summary: dict[str, Any] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                               "dry_run": args.dry_run}
    quick = device.type == "cpu"
    peak = nominal_peak(name) if device.type == "cuda" or os.environ.get(PEAK_ENV) else None
    measured = matmul_peak_tflops(device, 1024 if quick else 8192, 2 if quick else 50)
    summary["train"] = []
    for network in NETWORKS:
        t = train_speed(device, args.batch, args.steps, args.warmup, network)
        t["mfu"] = mfu(t["achieved_tflops"], peak)
        t["achieved_over_measured"] = t["achieved_tflops"] / measured
        summary["train"].append(t)
    summary["peak"] = {"nominal_bf16_tflops": peak, "measured_matmul_tflops": measured,
                       "source": f"${PEAK_ENV}" if os.environ.get(PEAK_ENV) else "table by device name"}
    summary["pipeline_loop"] = pipeline_loop(device, args.batch, args.loop_steps)
    summary["features"] = features(device, args.extract_images, 32 if quick else 512)
    summary["online_probe"] = online_probe_speed(device, args.online_images, 32 if quick else 128)
    # the slice's steps: what the measured loop speed does in slice_train_s at the profile's batch of 512
    loop_speed = summary["pipeline_loop"]["images_per_s"]
    steps = 2 if args.dry_run else max(20, int(args.slice_train_s * loop_speed / 512))
    summary["pipeline"] = pipeline_slice(dry_run=args.dry_run, steps=steps, timeout_s=args.slice_timeout_s,
                                         cifar10=args.cifar10)
    summary["wall_s"] = time.perf_counter() - started

    print(json.dumps(summary, indent=2))
    table = markdown(summary)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0 if summary["pipeline"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
