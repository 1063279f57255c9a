"""Fine-tuning: the denoiser up to its readout, at the readout's noise level, plus a linear head.

The classifier reads features through ``features.live_features`` (the probe's noise, forward and pooling,
differentiable), standardises them with fixed statistics and applies the head, so a fine-tuned model
is again "network + ``LinearProbe``" and serves through ``classifier.Classifier`` unchanged.
Training: AdamW with a lower learning rate for the network than for the head, linear warm-up then
cosine decay, keyed flip/crop augmentation and fresh noise per epoch, early stopping on validation
(the best validation state is kept). The from-scratch baseline is the same code on random weights.
Batches go to the device the model lives on (move the model there first).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddae_core.config import FinetuneConfig
from ddae_core.data import to_model_input
from ddae_core.features import live_features
from ddae_core.heads.probe import STD_EPS, LinearProbe, Standardizer
from ddae_core.heads.probe_online import ImageSplit
from ddae_core.noise import augment, copy_seed
from ddae_core.readout import Readout
from ddae_core.training.schedules import lr_factor

logger = logging.getLogger(__name__)


class ReadoutClassifier(nn.Module):
    """``logits = head((features(x0) - mean) / std)``: a denoiser read out as ``readout`` + a head."""

    def __init__(self, denoiser: nn.Module, head: LinearProbe, readout: Readout) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.readout = readout
        self.head = nn.Linear(head.weight.shape[1], head.num_classes)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(head.weight))
            self.head.bias.copy_(torch.from_numpy(head.bias))
        self.register_buffer("mean", torch.from_numpy(head.mean.copy()))
        self.register_buffer("std", torch.from_numpy(head.std.copy()))

    def forward(self, x0: torch.Tensor, sample_ids: np.ndarray, noise_seed: int | None = None) -> torch.Tensor:
        """Class scores (N, K) of clean images ``x0`` (N, C, H, W) in [-1, 1]."""
        readout = self.readout if noise_seed is None else dataclasses.replace(self.readout, seed=noise_seed)
        features = live_features(self.denoiser, x0, sample_ids, readout)  # (N, D)
        return self.head((features - self.mean) / self.std)

    def to_probe(self) -> LinearProbe:
        """The head with its standardisation, as a ``LinearProbe`` (what ``Classifier`` loads)."""
        return LinearProbe(weight=self.head.weight.detach().cpu().numpy().copy(),
                           bias=self.head.bias.detach().cpu().numpy().copy(),
                           mean=self.mean.cpu().numpy().copy(), std=self.std.cpu().numpy().copy())


def zero_head(features: np.ndarray, num_classes: int, eps: float = STD_EPS) -> LinearProbe:
    """A head that predicts uniformly, standardising with the mean/std of ``features`` (N, D)."""
    scaler = Standardizer.fit(features, eps)
    dim = scaler.mean.shape[0]
    return LinearProbe(weight=np.zeros((num_classes, dim), np.float32), bias=np.zeros(num_classes, np.float32),
                       mean=scaler.mean, std=scaler.std)


def total_steps(rows: int, config: FinetuneConfig) -> int:
    """Optimizer steps for ``rows`` labelled images: ``epochs`` passes, capped by ``max_steps``."""
    steps = config.epochs * math.ceil(rows / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _batches(split: ImageSplit, rows: np.ndarray, batch_size: int, device: torch.device):
    """``(x0 (B, C, H, W) in [-1, 1], sample ids (B,), labels (B,))`` over ``rows`` in order, tensors on
    ``device``."""
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        sorted_chunk = np.sort(chunk)  # memmaps read fastest in order
        back = np.argsort(np.argsort(chunk))
        images = np.asarray(split.images[sorted_chunk])[back]
        yield (to_model_input(images).to(device), np.asarray(split.sample_ids)[chunk],
               torch.from_numpy(np.asarray(split.labels, dtype=np.int64)[chunk]).to(device))


def accuracy(model: ReadoutClassifier, split: ImageSplit, rows: np.ndarray | None = None,
             batch_size: int = 256) -> float:
    """Accuracy on ``split`` (or its ``rows``): no augmentation, the readout's own noise (copy 0)."""
    rows = np.arange(len(split.labels)) if rows is None else np.asarray(rows)
    if len(rows) == 0:
        return 0.0
    was_training = model.training
    model.eval()
    hits = 0
    try:
        with torch.no_grad():
            for x0, ids, labels in _batches(split, rows, batch_size, _device_of(model)):
                hits += int((model(x0, ids).argmax(1) == labels).sum())
    finally:
        model.train(was_training)
    return hits / len(rows)


@dataclass
class FinetuneResult:
    """Outcome of one fine-tuning run; the model holds the best-on-validation state."""

    model: ReadoutClassifier
    val_acc: float  # best validation accuracy seen (the state kept)
    best_step: int  # optimizer steps taken when that state was reached (0 = the initial model)
    steps: int  # optimizer steps taken before stopping
    stopped_early: bool
    wall_s: float
    history: list[dict[str, float]] = field(default_factory=list)  # per check: step, loss, val_acc


def finetune(model: ReadoutClassifier, train: ImageSplit, train_rows: np.ndarray, val: ImageSplit,
             val_rows: np.ndarray, config: FinetuneConfig, *, progress: bool = True) -> FinetuneResult:
    """Train ``model`` end to end on ``train_rows`` of ``train``; keep its best state on ``val_rows``.

    Epoch ``e`` flips/crops every image as augmented copy ``e + 1`` and noises it with
    ``copy_seed(seed, e + 1)``, both keyed by sample id, so a run is reproducible for one seed.
    """
    started = time.perf_counter()
    train_rows = np.asarray(train_rows)
    if len(train_rows) == 0:
        raise ValueError("fine-tuning needs at least one labelled train image")
    steps_total = total_steps(len(train_rows), config)
    backbone = [p for p in model.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": backbone, "lr": config.lr * config.backbone_lr_scale, "base_lr": config.lr * config.backbone_lr_scale},
         {"params": list(model.head.parameters()), "lr": config.lr, "base_lr": config.lr}],
        weight_decay=config.weight_decay,
    )
    best_acc = accuracy(model, val, val_rows)
    best_state, best_step = copy.deepcopy(model.state_dict()), 0
    history: list[dict[str, float]] = [{"step": 0, "loss": float("nan"), "val_acc": best_acc}]
    checks_without_gain, step, stopped_early, loss_sum, loss_count = 0, 0, False, 0.0, 0
    model.train()
    bar = tqdm(total=steps_total, disable=not progress, desc="fine-tune", unit="step", dynamic_ncols=True)
    try:
        epoch = 0
        while step < steps_total and not stopped_early:
            order = train_rows[np.random.default_rng([config.seed, 5, epoch]).permutation(len(train_rows))]
            for x0, ids, labels in _batches(train, order, config.batch_size, _device_of(model)):
                if step >= steps_total:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(step, warmup_steps=config.warmup_steps,
                                                               total_steps=steps_total)
                x0 = augment(x0, ids, epoch + 1, config.seed)
                with torch.enable_grad():
                    loss = F.cross_entropy(model(x0, ids, noise_seed=copy_seed(model.readout.seed, epoch + 1)), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                step += 1
                loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
                bar.update(1)
                if step % config.eval_every == 0 or step == steps_total:
                    val_acc = accuracy(model, val, val_rows)
                    history.append({"step": step, "loss": loss_sum / loss_count, "val_acc": val_acc})
                    loss_sum, loss_count = 0.0, 0
                    bar.set_postfix(val=f"{val_acc:.3f}")
                    logger.info("fine-tune step %d val_acc=%.4f", step, val_acc)
                    if val_acc > best_acc:
                        best_acc, best_state, best_step = val_acc, copy.deepcopy(model.state_dict()), step
                        checks_without_gain = 0
                    else:
                        checks_without_gain += 1
                        if checks_without_gain >= config.patience:
                            stopped_early = True
                            break
            epoch += 1
    finally:
        bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return FinetuneResult(model=model, val_acc=best_acc, best_step=best_step, steps=step,
                          stopped_early=stopped_early, wall_s=time.perf_counter() - started, history=history)
