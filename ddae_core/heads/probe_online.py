"""The official DDAE linear-probe protocol ("online"), for an honest comparison with the cached probe.

One ``nn.Linear`` on the raw pooled (for several taps: concatenated) feature of a frozen denoiser, as
the official ``linear.py``: no standardisation, no BatchNorm. Every epoch re-runs the network on every
training image with a fresh flip and random crop (padded with black, the official zero fill) and
fresh noise; Adam, a cosine schedule stepped per epoch (``CosineAnnealingLR(T_max=epochs)``: epoch
``e`` runs at ``lr * (1 + cos(pi e / epochs)) / 2``, the last at ~1.1% for 15 epochs). The official
run is 4 processes of batch 128 at lr 1e-3 each, with lr scaled by the process count: batch 512 and
lr 4e-3 in effect, the defaults here. ``batch_size`` and ``lr`` are those effective values whatever
the number of processes: each process reads its share of every batch (``distributed.Shard``), the
shares are gathered, and every process takes the same step on the whole batch, so N processes end
with the weights one process gets after the same samples. Validation and test images get no
augmentation and one noise draw (the cached extract stage's copy 0 for the same seed).

Everything goes through the one feature path, ``ddae_core.features.extract``: epoch ``e`` (0-based)
reads augmented copy ``e + 1`` (flip/crop keyed by ``noise.augment(..., copy=e + 1, seed)``, noise by
``copy_seed(seed, e + 1)``), so each epoch sees new augmentations and noise, reproducibly.

Forward passes are counted as network runs of one image at one level: ``epochs x train + val + test``
per level. ``online_grid`` trains one layer per readout on the same runs (the official ``--grid``: every
block at every level from one network run per batch and level).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddae_core.distributed import Shard
from ddae_core.features import extract, feature_dims
from ddae_core.heads.probe import LinearProbe
from ddae_core.readout import Readout
from ddae_core.sampling import balanced_subset
from ddae_core.training.schedules import lr_factor

logger = logging.getLogger(__name__)

BLACK = -1.0  # pixel value 0 in the network's [-1, 1] input: what the official crops pad with


class ImageSplit(Protocol):
    """What the protocol reads from a split: ``PreparedSplit`` fits, so does ``ImageSet``."""

    images: Any  # uint8 (N, H, W, C), array or memmap
    labels: np.ndarray  # int64 (N,)
    sample_ids: np.ndarray  # int64 (N,), unique; keys the noise and augmentation


@dataclass(frozen=True)
class ImageSet:
    """A plain in-memory split (tests, notebooks)."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    sample_ids: np.ndarray  # int64 (N,)


@dataclass(frozen=True)
class OnlineProbeResult:
    """Outcome of one online-protocol run; accuracies are fractions in [0, 1]."""

    val_acc: float  # after the last epoch (no epoch selection, as in the official fixed schedule)
    test_acc: float
    forward_passes: int  # network runs of one image at one level: (epochs x train + val + test) x levels
    wall_s: float  # whole protocol (a grid's: every readout), forward passes included
    epochs: int
    train_images: int
    val_images: int
    test_images: int
    batch_size: int  # effective (global) batch
    lr: float  # effective base lr
    processes: int  # how many processes shared the forward passes
    probe: LinearProbe  # on raw features: mean 0, std 1
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, train_acc, val_acc, lr


def _subset(split: ImageSplit, limit: int | None, seed: int, stream: int) -> ImageSet:
    """The whole split, or a seeded class-balanced subset of ``limit`` rows kept in their original order."""
    n = len(split.labels)
    rows = np.arange(n)
    if limit is not None and limit < n:
        rows = balanced_subset(np.asarray(split.labels), limit, np.random.default_rng([seed, stream]))
    images = split.images if len(rows) == n else np.asarray(split.images[rows])
    return ImageSet(images=images, labels=np.asarray(split.labels, np.int64)[rows],
                    sample_ids=np.asarray(split.sample_ids, np.int64)[rows])


@dataclass(frozen=True)
class _Reader:
    """Features of chosen rows of one split for every readout of a grid (one network run per level serves
    them all), this process's share of each batch, gathered whole."""

    denoiser: nn.Module
    readouts: tuple[Readout, ...]  # one seed and precision
    dims: dict[Readout, int]
    shard: Shard
    device: torch.device

    def __call__(self, split: ImageSet, rows: np.ndarray, copy: int) -> dict[Readout, torch.Tensor]:
        """Per readout, (len(rows), D) float32 CPU features of ``split``'s ``rows`` (in that order) as
        augmented copy ``copy``."""
        mine = rows[self.shard.bounds(len(rows))]
        local = {r: torch.zeros((0, self.dims[r])) for r in self.readouts}
        if len(mine):
            ascending = np.argsort(mine, kind="stable")  # a memmap reads sorted rows fastest
            images = np.empty((len(mine), *split.images.shape[1:]), np.uint8)
            images[ascending] = np.asarray(split.images[mine[ascending]])
            first = self.readouts[0]
            (_a, _b, batch), = extract(
                self.denoiser, images, split.sample_ids[mine],
                taps=list(dict.fromkeys(tap for r in self.readouts for tap in r.taps)),
                levels=list(dict.fromkeys(r.level for r in self.readouts)),
                pools=list(dict.fromkeys(r.pool for r in self.readouts)), seed=first.seed, batch_size=len(mine),
                copy=copy, progress=False, device=self.device, crop_fill=BLACK, precision=first.precision)
            local = {r: torch.from_numpy(r.concat(batch)) for r in self.readouts}
        return {r: self.shard.gather(local[r], len(rows)) for r in self.readouts}

    def whole(self, split: ImageSet, batch_size: int) -> dict[Readout, torch.Tensor]:
        """Per readout, copy-0 features (no augmentation, one noise draw) of a whole split, (N, D)."""
        n = len(split.labels)
        chunks = [self(split, np.arange(start, min(start + batch_size, n)), 0) for start in range(0, n, batch_size)]
        return {r: torch.cat([c[r] for c in chunks]) if chunks else torch.zeros((0, self.dims[r]))
                for r in self.readouts}


def _linear(dim: int, num_classes: int, seed: int) -> nn.Linear:
    """The probe layer, initialised as ``nn.Linear`` does (uniform +-1/sqrt(D)) from a seeded generator."""
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 4]).integers(2**62)))
    linear = nn.Linear(dim, num_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(dim)
        linear.weight.uniform_(-bound, bound, generator=gen)
        linear.bias.uniform_(-bound, bound, generator=gen)
    return linear


def _accuracy(linear: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return 0.0
    with torch.no_grad():
        return float((linear(x).argmax(1) == y).double().mean())


def _check(epochs: int, lr: float, batch_size: int, eval_batch_size: int, num_classes: int,
           splits: dict[str, ImageSet]) -> None:
    """Reject settings and labels the protocol cannot run on, naming the value."""
    if epochs < 1 or batch_size < 1 or eval_batch_size < 1:
        raise ValueError(f"epochs, batch_size and eval_batch_size must be >= 1, "
                         f"got {epochs}, {batch_size}, {eval_batch_size}")
    if lr <= 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if len(splits["train"].labels) == 0:
        raise ValueError("the train split is empty")
    for name, split in splits.items():
        labels = split.labels
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} labels must be in [0, {num_classes})")


def online_probe(
    denoiser: nn.Module,
    train: ImageSplit,
    val: ImageSplit,
    test: ImageSplit,
    *,
    readout: Readout,
    num_classes: int,
    **protocol: Any,
) -> OnlineProbeResult:
    """Train one linear layer on ``readout`` of a frozen ``denoiser``, re-running the network every batch:
    ``online_grid`` with that one readout (same keywords)."""
    return online_grid(denoiser, train, val, test, readouts=[readout], num_classes=num_classes, **protocol)[readout]


def online_grid(
    denoiser: nn.Module,
    train: ImageSplit,
    val: ImageSplit,
    test: ImageSplit,
    *,
    readouts: Sequence[Readout],
    num_classes: int,
    epochs: int = 15,
    lr: float = 4e-3,
    batch_size: int = 512,
    eval_batch_size: int = 256,
    max_train: int | None = None,
    max_eval: int | None = None,
    device: str | torch.device = "cpu",
    shard: Shard | None = None,
    progress: bool = True,
) -> dict[Readout, OnlineProbeResult]:
    """One linear layer per readout of a frozen ``denoiser``, all trained on the same batches, the network
    run once per batch and level for every readout (the official ``linear.py --grid``).

    ``batch_size`` and ``lr`` are the effective (global) values. ``shard`` (default: the running
    ``torch.distributed`` group, else one process) splits every batch's forward passes; all processes
    return the same result. The readouts' one ``seed`` keys the features' noise and augmentation (the
    extract stage's seed shares its val/test features), the epoch orders and each layer's initialisation;
    the result is deterministic given it. ``max_train`` / ``max_eval`` cap the train and each of the
    val/test splits to a seeded class-balanced subset (quick runs, tests). The denoiser must live on
    ``device``; the layers train on the CPU. Each result carries the whole run's forward passes (every
    level) and wall time: the grid's cost, shared by its readouts.
    """
    started = time.perf_counter()
    readouts = tuple(dict.fromkeys(readouts))
    if not readouts:
        raise ValueError("online_grid needs at least one readout")
    if len({(r.seed, r.precision) for r in readouts}) > 1:
        raise ValueError("online_grid: the readouts must share one seed and precision (one feature path run)")
    device, seed, shard = torch.device(device), readouts[0].seed, shard or Shard.current()
    splits = {"train": _subset(train, max_train, seed, 0), "val": _subset(val, max_eval, seed, 1),
              "test": _subset(test, max_eval, seed, 2)}
    _check(epochs, lr, batch_size, eval_batch_size, num_classes, splits)
    train_set, n_train = splits["train"], len(splits["train"].labels)
    height, width, channels = train_set.images.shape[1:]
    taps = list(dict.fromkeys(tap for r in readouts for tap in r.taps))
    dims = feature_dims(denoiser, taps, sorted({r.pool for r in readouts}), (channels, height, width))
    reader = _Reader(denoiser, readouts, {r: sum(dims[(tap, r.pool)] for tap in r.taps) for r in readouts},
                     shard, device)

    x_val, y_val = reader.whole(splits["val"], eval_batch_size), torch.from_numpy(splits["val"].labels)
    linears = {r: _linear(reader.dims[r], num_classes, seed) for r in readouts}
    optimizers = {r: torch.optim.Adam(linears[r].parameters(), lr=lr) for r in readouts}
    history: dict[Readout, list[dict[str, float]]] = {r: [] for r in readouts}
    batches = math.ceil(n_train / batch_size)
    bar = tqdm(total=epochs * batches, disable=not progress or shard.index != 0, desc="online probe",
               unit="batch", dynamic_ncols=True)
    try:
        for epoch in range(epochs):
            epoch_lr = lr * lr_factor(epoch, warmup_steps=0, total_steps=epochs)  # stepped per epoch
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = epoch_lr
            order = np.random.default_rng([seed, 3, epoch]).permutation(n_train)
            loss_sum, hits = dict.fromkeys(readouts, 0.0), dict.fromkeys(readouts, 0)
            for start in range(0, n_train, batch_size):
                rows = order[start:start + batch_size]
                features = reader(train_set, rows, copy=epoch + 1)  # (B, D) raw: epoch e reads augmented copy e + 1
                y = torch.from_numpy(train_set.labels[rows])
                for r in readouts:
                    with torch.enable_grad():
                        logits = linears[r](features[r])
                        loss = F.cross_entropy(logits, y)  # the mean over the whole (effective) batch
                        optimizers[r].zero_grad(set_to_none=True)
                        loss.backward()
                        optimizers[r].step()
                    loss_sum[r] += float(loss.detach()) * len(y)
                    hits[r] += int((logits.detach().argmax(1) == y).sum())
                bar.update(1)
            for r in readouts:
                row = {"epoch": epoch + 1, "loss": loss_sum[r] / n_train, "train_acc": hits[r] / n_train,
                       "val_acc": _accuracy(linears[r], x_val[r], y_val), "lr": epoch_lr}
                history[r].append(row)
                logger.info("online probe %s epoch %d lr=%.2e loss=%.4f train_acc=%.4f val_acc=%.4f",
                            r.label, epoch + 1, epoch_lr, row["loss"], row["train_acc"], row["val_acc"])
            if len(readouts) == 1:
                bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_acc']:.3f}")
    finally:
        bar.close()

    test_set = splits["test"]
    x_test, y_test = reader.whole(test_set, eval_batch_size), torch.from_numpy(test_set.labels)
    levels = len({r.level for r in readouts})
    passes = levels * (epochs * n_train + len(splits["val"].labels) + len(test_set.labels))
    wall = time.perf_counter() - started
    results = {}
    for r in readouts:
        linear = linears[r]
        probe = LinearProbe(weight=linear.weight.detach().numpy().copy(), bias=linear.bias.detach().numpy().copy(),
                            mean=np.zeros(reader.dims[r], np.float32), std=np.ones(reader.dims[r], np.float32))
        results[r] = OnlineProbeResult(
            val_acc=history[r][-1]["val_acc"], test_acc=_accuracy(linear, x_test[r], y_test), forward_passes=passes,
            wall_s=wall, epochs=epochs, train_images=n_train, val_images=len(splits["val"].labels),
            test_images=len(test_set.labels), batch_size=batch_size, lr=lr, processes=shard.count, probe=probe,
            history=history[r],
        )
    return results


__all__ = ["BLACK", "ImageSet", "ImageSplit", "OnlineProbeResult", "online_grid", "online_probe"]
