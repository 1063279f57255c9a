"""The paper's own linear-probe protocol ("online"), for an honest comparison with the cached probe.

One ``nn.Linear`` on the pooled (for several taps: concatenated) feature of a frozen denoiser. Every
epoch re-runs the network on every training image with a fresh flip/crop and fresh noise; Adam
(lr 1e-3), cosine schedule, 15 epochs, batch 128 by default. Validation and test images get no
augmentation and one noise draw (exactly the cached extract stage's copy 0 for the same seed).

Everything goes through the one feature path, ``ddae_core.features.extract`` (which calls
``extract_batch`` -> ``capture`` -> ``pool``): epoch ``e`` (0-based) reads augmented copy ``e + 1``,
i.e. flip/crop from ``ddae_core.noise.augment(..., copy=e + 1, seed)`` and noise seeded by
``copy_seed(seed, e + 1)``, so each epoch sees new augmentations and new noise, reproducibly.

Standardisation: features are standardised per dimension with *running* statistics during the
first epoch (cumulative mean and variance of every training feature seen so far, updated with each
batch before that batch's step) and *frozen* at the end of the first epoch: epochs 2..E, validation
and test use the first epoch's full statistics. So the probe sees unit-scale inputs like the cached
probe (``probe.Standardizer``), no extra forward pass is spent on statistics, and the returned
``LinearProbe`` carries that mean and std. Near-constant dimensions (std < 1e-6) keep std 1.

Forward passes are counted as network runs of one image at one level: ``epochs x train + val +
test`` (one level per readout).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddae_core.features import extract
from ddae_core.heads.probe import LinearProbe, Standardizer, unit_std
from ddae_core.readout import Readout
from ddae_core.sampling import balanced_subset
from ddae_core.training.schedules import lr_factor

logger = logging.getLogger(__name__)


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

    val_acc: float  # after the last epoch (no epoch selection, as in the paper's fixed schedule)
    test_acc: float
    forward_passes: int  # network runs of one image at one level: epochs x train + val + test
    wall_s: float  # whole protocol, forward passes included
    epochs: int
    train_images: int
    val_images: int
    test_images: int
    probe: LinearProbe  # weight/bias in standardised units, with the frozen first-epoch mean/std
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: loss, train_acc, val_acc, lr


class _RunningMoments:
    """Cumulative per-dimension mean and (population) variance, float64, merged batch by batch."""

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.m2 = torch.zeros(dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        """Merge a batch ``x`` (B, D) (Chan et al. parallel update)."""
        batch = x.double()
        n_b = batch.shape[0]
        mean_b = batch.mean(0)
        m2_b = (batch - mean_b).square().sum(0)
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * (n_b / total)
        self.m2 += m2_b + delta.square() * (self.count * n_b / total)
        self.count = total

    def standardizer(self) -> Standardizer:
        """The statistics so far as float32 (D,) mean and std (``probe.unit_std``: 1 where near-constant)."""
        std = unit_std((self.m2 / max(self.count, 1)).sqrt())
        return Standardizer(mean=self.mean.float().numpy(), std=std.float().numpy())


class _Permuted:
    """A lazy row-permuted view of an image array: ``view[a:b]`` reads only those rows."""

    def __init__(self, images: Any, order: np.ndarray) -> None:
        self.images, self.order = images, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.images[np.sort(self.order[rows])])[np.argsort(np.argsort(self.order[rows]))]


def _subset(split: ImageSplit, limit: int | None, seed: int, stream: int) -> ImageSet:
    """The whole split, or a seeded class-balanced subset of ``limit`` rows kept in their original order."""
    n = len(split.labels)
    rows = np.arange(n)
    if limit is not None and limit < n:
        rows = balanced_subset(np.asarray(split.labels), limit, np.random.default_rng([seed, stream]))
    images = split.images if len(rows) == n else np.asarray(split.images[rows])
    return ImageSet(images=images, labels=np.asarray(split.labels, np.int64)[rows],
                    sample_ids=np.asarray(split.sample_ids, np.int64)[rows])


def _eval_features(denoiser: nn.Module, split: ImageSet, readout: Readout, *, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """Copy-0 features (no augmentation, one noise draw) of a whole split, (N, D)."""
    chunks = [readout.concat(batch) for _a, _b, batch in _extract(denoiser, split.images, split.sample_ids, readout,
                                                                  copy=0, batch_size=batch_size, device=device)]
    return torch.from_numpy(np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32))


def _extract(denoiser: nn.Module, images: Any, sample_ids: np.ndarray, readout: Readout, *, copy: int,
             batch_size: int, device: torch.device):
    """The one feature path (``features.extract``) for this readout's taps at its level and pool."""
    return extract(denoiser, images, sample_ids, taps=list(readout.taps), levels=[readout.level],
                   pools=[readout.pool], seed=readout.seed, batch_size=batch_size, copy=copy, progress=False,
                   device=device)


class _Head:
    """The linear layer, its Adam state and the standardisation it trains under (set during epoch 1)."""

    def __init__(self, dim: int, num_classes: int, lr: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 4]).integers(2**62)))
        self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            bound = 1.0 / math.sqrt(dim)
            self.linear.weight.uniform_(-bound, bound, generator=gen)
            self.linear.bias.uniform_(-bound, bound, generator=gen)
        self.optimizer = torch.optim.Adam(self.linear.parameters(), lr=lr)
        self.moments = _RunningMoments(dim)
        self.mean = self.std = torch.empty(0)

    def observe(self, x: torch.Tensor) -> None:
        """Epoch 1: merge ``x`` (B, D) into the running statistics and train under them from now on."""
        self.moments.update(x)
        scaler = self.moments.standardizer()
        self.mean, self.std = torch.from_numpy(scaler.mean), torch.from_numpy(scaler.std)

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, int]:
        """One Adam step on the batch at ``lr``; returns the batch's summed loss and its hits."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with torch.enable_grad():
            logits = self.linear((x - self.mean) / self.std)
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return float(loss.detach()) * len(y), int((logits.detach().argmax(1) == y).sum())

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if len(y) == 0:
            return 0.0
        with torch.no_grad():
            return float((self.linear((x - self.mean) / self.std).argmax(1) == y).double().mean())

    def probe(self) -> LinearProbe:
        """The trained layer as a ``LinearProbe`` (weights in standardised units, with the frozen mean/std)."""
        return LinearProbe(weight=self.linear.weight.detach().numpy().copy(),
                           bias=self.linear.bias.detach().numpy().copy(),
                           mean=self.mean.numpy().copy(), std=self.std.numpy().copy())


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
    epochs: int = 15,
    lr: float = 1e-3,
    batch_size: int = 128,
    eval_batch_size: int = 256,
    max_train: int | None = None,
    max_eval: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> OnlineProbeResult:
    """Train one linear layer on ``readout`` of a frozen ``denoiser``, re-running the network every batch.

    ``readout.seed`` keys the features' noise and augmentation (the extract stage's seed shares its
    val/test features), the epoch orders and the layer's initialisation; the result is deterministic
    given it (and the thread count). ``max_train`` / ``max_eval`` cap the train and each of the
    val/test splits to a seeded class-balanced subset (``sampling.balanced_subset``; quick runs,
    tests). The denoiser must live on ``device``; the probe itself trains on the CPU.
    """
    started = time.perf_counter()
    device, seed = torch.device(device), readout.seed
    splits = {"train": _subset(train, max_train, seed, 0), "val": _subset(val, max_eval, seed, 1),
              "test": _subset(test, max_eval, seed, 2)}
    _check(epochs, lr, batch_size, eval_batch_size, num_classes, splits)
    train_set, n_train = splits["train"], len(splits["train"].labels)

    x_val = _eval_features(denoiser, splits["val"], readout, batch_size=eval_batch_size, device=device)
    y_val = torch.from_numpy(splits["val"].labels)
    total_steps = epochs * math.ceil(n_train / batch_size)
    schedule = lambda step: lr * lr_factor(step, warmup_steps=0, total_steps=total_steps)  # noqa: E731
    head: _Head | None = None
    step = 0
    history: list[dict[str, float]] = []
    bar = tqdm(total=total_steps, disable=not progress, desc="online probe", unit="batch", dynamic_ncols=True)
    try:
        for epoch in range(epochs):  # epoch e reads augmented copy e + 1: new flip/crop and noise
            order = np.random.default_rng([seed, 3, epoch]).permutation(n_train)
            labels = torch.from_numpy(train_set.labels[order])
            loss_sum, hits = 0.0, 0
            for start, stop, batch in _extract(denoiser, _Permuted(train_set.images, order),
                                               train_set.sample_ids[order], readout, copy=epoch + 1,
                                               batch_size=batch_size, device=device):
                x = torch.from_numpy(readout.concat(batch))  # (B, D)
                head = head or _Head(x.shape[1], num_classes, lr, seed)  # the width is known at the first batch
                if epoch == 0:
                    head.observe(x)
                batch_loss, batch_hits = head.step(x, labels[start:stop], schedule(step))
                loss_sum, hits, step = loss_sum + batch_loss, hits + batch_hits, step + 1
                bar.update(1)
            assert head is not None
            row = {"epoch": epoch + 1, "loss": loss_sum / n_train, "train_acc": hits / n_train,
                   "val_acc": head.accuracy(x_val, y_val), "lr": schedule(step)}
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", val=f"{row['val_acc']:.3f}")
            logger.info("online probe epoch %d loss=%.4f train_acc=%.4f val_acc=%.4f",
                        epoch + 1, row["loss"], row["train_acc"], row["val_acc"])
    finally:
        bar.close()
    assert head is not None

    test_set = splits["test"]
    x_test = _eval_features(denoiser, test_set, readout, batch_size=eval_batch_size, device=device)
    return OnlineProbeResult(
        val_acc=history[-1]["val_acc"], test_acc=head.accuracy(x_test, torch.from_numpy(test_set.labels)),
        forward_passes=epochs * n_train + len(splits["val"].labels) + len(test_set.labels),
        wall_s=time.perf_counter() - started, epochs=epochs, train_images=n_train,
        val_images=len(splits["val"].labels), test_images=len(test_set.labels), probe=head.probe(), history=history,
    )


__all__ = ["ImageSet", "ImageSplit", "OnlineProbeResult", "online_probe"]
