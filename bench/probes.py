"""Probe cost (cached vs online) and the accuracy table (checkpoints, raw pixels, random init).

Every row goes through the same readout code (``ddae_core.features.extract`` -> ``Readout.concat``)
and the same probe code (``ddae_core.heads.probe.select_probe``: L2 chosen on validation, test once).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from ddae_core.checkpoint import load_network, read_network_config
from ddae_core.config import DataConfig, DiffusionConfig, PipelineConfig, TrainConfig
from ddae_core.data import load_prepared
from ddae_core.data.shape import declared_shape
from ddae_core.diffusion import build_denoiser, build_loss
from ddae_core.features import extract
from ddae_core.heads.probe import select_probe
from ddae_core.heads.probe_online import ImageSet, online_probe
from ddae_core.nn import build_unet
from ddae_core.nn.unet import UNet, UNetConfig
from ddae_core.readout import Readout, Selection

log = logging.getLogger("bench")


@dataclass
class Setup:
    """What the probe measurements run on: a network, its splits, the chosen readout, the probe grid."""

    kind: str  # "default-run" or "quick-tiny"
    network_dir: Path  # network.safetensors + network.json (the final EMA network)
    splits: dict[str, Any]  # train/val/test with .images uint8 (N, H, W, C), .labels, .sample_ids
    num_classes: int
    taps: list[str]
    level: float
    pool: int
    seed: int  # the extract stage's seed (noise and augmentation keys)
    train_copies: int  # 1 + extract.augment_copies
    l2_grid: tuple[float, ...]
    max_iter: int
    online_epochs: int
    online_lr: float
    online_batch_size: int
    checkpoints: list[tuple[int, Path]]  # (step, ema.safetensors), ascending
    network_name: str  # for the random-init row
    random_seed: int
    extract_batch_size: int = 256
    l2_extend: int = 0  # the probe stage's L2 path beyond l2_grid (probe.l2_extend, probe.l2_bounds)
    l2_bounds: tuple[float, ...] = (0.0, float("inf"))
    notes: list[str] = field(default_factory=list)
    default_metrics: dict[str, Any] = field(default_factory=dict)  # metrics/probe.json + pretrain.json

    def split_sizes(self) -> dict[str, int]:
        return {name: len(split.labels) for name, split in self.splits.items()}


def find_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Every ``step-XXXXXXXX/ema.safetensors`` under ``root`` (e.g. outputs/checkpoints), ascending by step."""
    found = []
    for path in root.glob("**/step-*/ema.safetensors"):
        try:
            found.append((int(path.parent.name.split("-")[1]), path))
        except (IndexError, ValueError):
            continue
    return sorted(found)


def default_setup(root: Path, config: PipelineConfig) -> Setup | None:
    """The default run's outputs, if the pipeline has been run in ``root``; else None."""
    network_dir = root / "outputs" / "pretrain" / "network"
    needed = [network_dir / "network.json", root / "data" / "prepared" / "manifest.json",
              root / "outputs" / "probe" / "selection.json"]
    if not all(p.is_file() for p in needed):
        return None
    readout = Selection.read(needed[2].parent).readout
    manifest, splits = load_prepared(root / "data" / "prepared")
    index_path = root / "outputs" / "features" / "index.json"
    copies = json.loads(index_path.read_text())["train_copies"] if index_path.is_file() else 1 + config.extract.augment_copies
    metrics = {}
    for name in ("probe", "pretrain"):
        path = root / "metrics" / f"{name}.json"
        if path.is_file():
            metrics[name] = json.loads(path.read_text())
    return Setup(
        kind="default-run", network_dir=network_dir, splits=splits, num_classes=len(manifest["class_names"]),
        taps=list(readout.taps), level=readout.level, pool=readout.pool,
        seed=readout.seed, train_copies=int(copies), l2_grid=config.probe.l2_grid,
        max_iter=config.probe.max_iter, online_epochs=config.probe.online_epochs, online_lr=config.probe.online_lr,
        online_batch_size=config.probe.online_batch_size, checkpoints=find_checkpoints(root / "outputs" / "checkpoints"),
        network_name=config.pretrain.network.name, random_seed=config.pretrain.train.seed,
        extract_batch_size=config.extract.batch_size, default_metrics=metrics,
        l2_extend=config.probe.l2_extend, l2_bounds=config.probe.l2_bounds,
    )


def _synthetic_splits(shape: tuple[int, int, int], sizes: dict[str, int], classes: int = 4) -> dict[str, ImageSet]:
    """Toy images whose class is their mean brightness (when no Fashion-MNIST is installed)."""
    out, first = {}, 0
    for i, (name, n) in enumerate(sizes.items()):
        rng = np.random.default_rng(i)
        labels = np.arange(n, dtype=np.int64) % classes
        base = (40 + 175 * labels / (classes - 1))[:, None, None, None]
        images = np.clip(base + rng.normal(0, 40, size=(n, shape[1], shape[2], shape[0])), 0, 255).astype(np.uint8)
        out[name] = ImageSet(images, labels, np.arange(first, first + n, dtype=np.int64))
        first += n
    return out


def quick_setup(workdir: Path, config: PipelineConfig, *, train_images: int = 600, test_images: int = 300,
                steps: int = 40) -> Setup:
    """A tiny setup in ``workdir``: a Fashion-MNIST subset (or toy images), ``ddpm-tiny`` trained briefly.

    Checkpoints every ``steps // 2`` steps give the accuracy table two rows; the readout is chosen
    on validation among a few taps, as the probe stage does on the default run.
    """
    from ddae_core.checkpoint import save_network
    from ddae_core.training.loop import train

    notes = []
    channels, size = declared_shape(config.data) or (3, config.data.max_image_size)
    data_cfg = DataConfig(max_train=train_images, max_test=test_images, val_fraction=0.2,
                          image_size=size, channels=channels)
    try:
        from ddae_core.data import prepare_dataset

        prepare_dataset(data_cfg, workdir / "prepared", progress=False)
        manifest, splits = load_prepared(workdir / "prepared")
        num_classes = len(manifest["class_names"])
        notes.append(f"Fashion-MNIST subset: {manifest['splits']}")
    except Exception as err:  # no dataset installed: toy brightness classes
        shape = (channels, size, size)
        sizes = {"train": int(train_images * 0.8), "val": int(train_images * 0.2), "test": test_images}
        splits, num_classes = _synthetic_splits(shape, sizes), 4
        notes.append(f"no dataset ({type(err).__name__}: {err}); toy brightness classes {sizes}")
    torch.manual_seed(0)
    unet = build_unet("ddpm-tiny", in_channels=channels, resolution=size)
    diffusion = DiffusionConfig(framework="ddpm")
    denoiser = build_denoiser(diffusion, unet)
    result = train(denoiser, build_loss(diffusion), np.asarray(splits["train"].images),
                   TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=0, ema_decay=0.9, mixed_precision="no",
                               checkpoint_every=max(steps // 2, 1), keep_last=4, log_every=max(steps // 2, 1)),
                   out_dir=workdir / "run", progress=False)
    save_network(workdir / "network", result.ema_denoiser, {"diffusion": diffusion})
    taps = ["mid.res1"] + [t for t in unet.tap_names() if t.startswith("dec.") and ".res" in t][:2]
    setup = Setup(
        kind="quick-tiny", network_dir=workdir / "network", splits=splits, num_classes=num_classes,
        taps=taps, level=11.0, pool=1, seed=0, train_copies=1, l2_grid=config.probe.l2_grid,
        max_iter=min(config.probe.max_iter, 100), online_epochs=config.probe.online_epochs, online_lr=config.probe.online_lr,
        online_batch_size=config.probe.online_batch_size, checkpoints=find_checkpoints(workdir / "run"),
        network_name="ddpm-tiny", random_seed=0, notes=notes,
        l2_extend=config.probe.l2_extend, l2_bounds=config.probe.l2_bounds,
    )
    # choose the readout on validation among single taps and their concatenation
    candidates = {}
    net = load_network(setup.network_dir)
    feats = {s: _features(net, setup, s, taps=taps) for s in ("train", "val")}
    readouts = {r.label: r for r in [Readout((t,), setup.level, setup.pool, setup.seed) for t in taps]
                + [Readout(tuple(taps), setup.level, setup.pool, setup.seed)]}
    blocks = {s: {(t, setup.level, setup.pool): feats[s][t] for t in taps} for s in ("train", "val")}
    for label, readout in readouts.items():
        candidates[label] = tuple(readout.concat(blocks[s]) for s in ("train", "val"))
    best, *_ = select_probe(candidates, splits["train"].labels, splits["val"].labels, num_classes=num_classes,
                            l2_grid=setup.l2_grid, max_iter=setup.max_iter, l2_extend=setup.l2_extend,
                            l2_bounds=setup.l2_bounds, progress=False)
    setup.taps = list(readouts[best].taps)
    setup.notes.append(f"quick readout chosen on validation: {readouts[best].tap_name} at t={setup.level:g}, "
                       f"pool {setup.pool}")
    return setup


def _features(net: nn.Module, setup: Setup, split: str, *, taps: list[str] | None = None,
              copies: int = 1) -> dict[str, np.ndarray]:
    """Per-tap readout features of one split (copies 0..copies-1 stacked), through ``features.extract``."""
    data = setup.splits[split]
    taps = setup.taps if taps is None else taps
    per_tap: dict[str, list[np.ndarray]] = {t: [] for t in taps}
    for copy in range(copies):
        for _a, _b, batch in extract(net, data.images, data.sample_ids, taps=taps, levels=[setup.level],
                                     pools=[setup.pool], seed=setup.seed, batch_size=setup.extract_batch_size,
                                     copy=copy, progress=False):
            for t in taps:
                per_tap[t].append(Readout((t,), setup.level, setup.pool, setup.seed).concat(batch))
    return {t: np.concatenate(v) for t, v in per_tap.items()}


def readout_probe(net: nn.Module, setup: Setup) -> dict[str, Any]:
    """The chosen readout of ``net`` through the cached-feature probe: L2 on validation, test once."""
    started = time.perf_counter()
    xs = {}
    for split in ("train", "val", "test"):
        copies = setup.train_copies if split == "train" else 1
        per_tap = _features(net, setup, split, copies=copies)
        xs[split] = np.concatenate([per_tap[t] for t in setup.taps], axis=1)
    extract_s = time.perf_counter() - started
    y = {s: np.asarray(setup.splits[s].labels) for s in xs}
    y_train = np.tile(y["train"], setup.train_copies)
    _key, l2, probe, table = select_probe({"readout": (xs["train"], xs["val"])}, y_train, y["val"],
                                          num_classes=setup.num_classes, l2_grid=setup.l2_grid,
                                          max_iter=setup.max_iter,
                                          l2_extend=setup.l2_extend, l2_bounds=setup.l2_bounds, progress=False)
    sizes = setup.split_sizes()
    return {
        "val_acc": next(r["val_acc"] for r in table if r["l2"] == l2),
        "test_acc": float(probe.accuracy(xs["test"], y["test"])),
        "l2": l2,
        "forward_passes": sizes["train"] * setup.train_copies + sizes["val"] + sizes["test"],
        "extract_wall_s": extract_s,
        "wall_s": time.perf_counter() - started,
    }


def pixels_probe(setup: Setup) -> dict[str, Any]:
    """Raw pixels in [0, 1], flattened, through the same probe code."""
    xs = {s: np.asarray(setup.splits[s].images, dtype=np.float32).reshape(len(setup.splits[s].labels), -1) / 255.0
          for s in ("train", "val", "test")}
    _key, l2, probe, table = select_probe({"pixels": (xs["train"], xs["val"])}, setup.splits["train"].labels,
                                          setup.splits["val"].labels, num_classes=setup.num_classes,
                                          l2_grid=setup.l2_grid, max_iter=setup.max_iter,
                                          l2_extend=setup.l2_extend, l2_bounds=setup.l2_bounds, progress=False)
    return {"val_acc": next(r["val_acc"] for r in table if r["l2"] == l2),
            "test_acc": float(probe.accuracy(xs["test"], setup.splits["test"].labels)), "l2": l2}


def random_network(setup: Setup) -> nn.Module:
    """The same architecture with every convolution random (``zero_init_output=False``), seeded."""
    meta = read_network_config(setup.network_dir)
    unet_config = UNetConfig.from_dict({**meta["unet"], "zero_init_output": False})
    torch.manual_seed(setup.random_seed)
    diffusion = DiffusionConfig(**meta["diffusion"])
    return build_denoiser(diffusion, UNet(unet_config)).eval()


def checkpoint_network(setup: Setup, ema_path: Path) -> nn.Module:
    """The final network's architecture with a training checkpoint's EMA weights."""
    net = load_network(setup.network_dir)
    net.load_state_dict(load_file(str(ema_path)), strict=True)
    return net.eval()


def probe_cost(setup: Setup, progress: bool = True) -> dict[str, Any]:
    """Cached-feature probe vs the online protocol on the same readout: forward passes, wall, accuracy."""
    net = load_network(setup.network_dir)
    cached = readout_probe(net, setup)
    online = online_probe(net, setup.splits["train"], setup.splits["val"], setup.splits["test"],
                          readout=Readout(tuple(setup.taps), setup.level, setup.pool, setup.seed),
                          num_classes=setup.num_classes, epochs=setup.online_epochs, lr=setup.online_lr,
                          batch_size=setup.online_batch_size, eval_batch_size=setup.extract_batch_size, progress=progress)
    return {
        "readout": {"taps": setup.taps, "level": setup.level, "pool": setup.pool},
        "cached": cached,
        "online": {"val_acc": online.val_acc, "test_acc": online.test_acc, "forward_passes": online.forward_passes,
                   "wall_s": online.wall_s, "epochs": online.epochs, "lr": setup.online_lr,
                   "batch_size": setup.online_batch_size},
        "forward_pass_ratio": online.forward_passes / cached["forward_passes"],
        "wall_ratio": online.wall_s / cached["wall_s"],
        "acc_delta_pt": 100.0 * (online.test_acc - cached["test_acc"]),
    }


def accuracy_table(setup: Setup) -> list[dict[str, Any]]:
    """Rows: each checkpoint's EMA (or the final network), random init, raw pixels; same readout and probe."""
    rows = []
    targets = [(f"DDAE step {step}", step, lambda p=path: checkpoint_network(setup, p)) for step, path in setup.checkpoints]
    if not targets:
        targets = [("DDAE final network", None, lambda: load_network(setup.network_dir))]
    for name, step, make in targets:
        rows.append({"row": name, "step": step, **readout_probe(make(), setup)})
        log.info("%s", rows[-1])
    rows.append({"row": "random init (all convs random)", "step": 0, **readout_probe(random_network(setup), setup)})
    rows.append({"row": "raw pixels", "step": None, **pixels_probe(setup)})
    return rows


def tiny_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="ddae-bench-")


def subset_setup(setup: Setup, sizes: dict[str, int], seed: int = 0) -> Setup:
    """The same setup on class-balanced, seeded subsets of each split (every row then sees the same images).

    A size of 0 keeps the whole split. Used to keep the full benchmark within minutes on two cores;
    the sizes are recorded in the setup's notes and the JSON.
    """
    import dataclasses

    from ddae_core.sampling import balanced_subset

    splits = {}
    for name, split in setup.splits.items():
        size = sizes.get(name, 0)
        labels = np.asarray(split.labels)
        idx = balanced_subset(labels, size, np.random.default_rng(seed)) if size else np.arange(len(labels))
        splits[name] = ImageSet(np.asarray(split.images[idx]), labels[idx], np.asarray(split.sample_ids)[idx])
    notes = [*setup.notes, f"class-balanced subsets: { {k: len(v.labels) for k, v in splits.items()} }"]
    return dataclasses.replace(setup, splits=splits, notes=notes)
