"""Diffusion pretraining loop on Hugging Face Accelerate: EMA, rotation of checkpoints, exact resume.

Everything random at optimizer step ``s`` (data order, flips, t/sigma, noise, dropout) is derived from
``(config.seed, s, process_index, micro-batch)``, so a run resumed from the checkpoint of step ``s``
continues exactly as the uninterrupted run would have: the checkpoint only needs to hold the step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from ddae_core.atomic import write_json_atomic
from ddae_core.checkpoint import EMA_FILE, latest_checkpoint, load_training_state, save_training_state, step_dir_name
from ddae_core.config import TrainConfig, as_dict
from ddae_core.data import to_model_input
from ddae_core.precision import resolve_mixed_precision
from ddae_core.training.ema import EMA
from ddae_core.training.monitor import best_point
from ddae_core.training.schedules import ema_decay_at, lr_factor

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, float]], None]  # cb(step, {"loss", "lr", "images_per_s", "epoch"} or {"monitor.*"})
LossFn = Callable[..., torch.Tensor]  # loss(net, x0, generator) -> (N,)

_DATA_ORDER, _STEP_RNG = 0, 1  # stream tags, so data-order and per-step seeds never coincide
_SEED_MASK = (1 << 64) - 1
# config keys that may change between a checkpoint and its resumption without breaking exactness
_RESUMABLE_CHANGES = {"steps", "checkpoint_every", "keep_last", "log_every"}


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped training after a checkpoint of the last finished step was saved."""

    def __init__(self, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"training interrupted after step {step}; checkpoint: {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint


MONITOR_FILE = "monitor.json"  # in out_dir: the probe monitor's points, kept across resumes


@dataclass(frozen=True)
class Monitor:
    """Scores the EMA network after chosen steps; with ``select`` the run carries forward its best checkpoint."""

    evaluate: Callable[[nn.Module], dict[str, float]]  # EMA network (eval mode) -> metrics with "score" (higher wins)
    steps: frozenset[int]  # optimizer-step counts after which it runs (each is also checkpointed)
    select: bool = True  # False: the last step is carried forward and the points are only logged
    key: str = ""  # what the scores depend on; points saved under another key are not resumed


@dataclass
class TrainResult:
    """What ``train`` returns: the last step, the EMA network carried forward (of ``chosen_step``), logged
    metrics, the monitor's points ({"step", "score", ...}, by step) and wall time (s)."""

    step: int
    ema_denoiser: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0
    chosen_step: int = 0
    monitor: list[dict[str, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- determinism


def derive_seed(*parts: int) -> int:
    """A 64-bit seed from integers via NumPy's SeedSequence (well mixed, order-sensitive)."""
    entropy = [int(p) & _SEED_MASK for p in parts]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The shuffled image order of one epoch: a permutation of ``range(num_images)``."""
    rng = np.random.default_rng(derive_seed(seed, _DATA_ORDER, epoch))
    return rng.permutation(num_images)


def global_batch_indices(seed: int, step: int, batch_size: int, num_images: int) -> np.ndarray:
    """Image indices of the global batch of ``step``: positions ``[step*B, (step+1)*B)`` of the
    concatenated epoch orders (an epoch ends mid-batch -> the batch continues into the next one)."""
    start = step * batch_size
    out = np.empty(batch_size, dtype=np.int64)
    filled = 0
    while filled < batch_size:
        epoch, offset = divmod(start + filled, num_images)
        take = min(batch_size - filled, num_images - offset)
        out[filled : filled + take] = epoch_order(seed, epoch, num_images)[offset : offset + take]
        filled += take
    return out


def local_micro_batches(
    indices: np.ndarray, grad_accum: int, num_processes: int, process_index: int
) -> list[np.ndarray]:
    """Split a global batch into ``grad_accum`` micro-batches; keep this process's slice of each.

    The global micro-batch ``m`` is the same for any number of processes, so N processes at global
    batch B see the same images per optimizer step as one process does. Slices are sorted (memmap).
    """
    per_micro = len(indices) // grad_accum
    per_process = per_micro // num_processes
    micro = []
    for m in range(grad_accum):
        chunk = indices[m * per_micro : (m + 1) * per_micro]
        mine = chunk[process_index * per_process : (process_index + 1) * per_process]
        micro.append(np.sort(mine))
    return micro


def _random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Flip each image of (N, C, H, W) left-right with probability 1/2 (draws on ``generator``)."""
    flip = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    flip = flip.to(x.device).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# ----------------------------------------------------------------------------- signals


class _StopFlag:
    """Set by SIGINT/SIGTERM while training; the loop finishes its step, saves and stops."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        log.warning("received signal %d: finishing this step, then saving a checkpoint", signum)
        self.signum = signum


@contextlib.contextmanager
def _stop_on_signals(flag: _StopFlag) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``flag`` inside the block; restore the old handlers after it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, flag) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- the loop


class _LossView:
    """What the loss sees as ``net``: calls go through the prepared module (DDP sync, autocast);
    attributes such as ``add_noise`` come from the bare denoiser, which DDP would hide."""

    def __init__(self, prepared: nn.Module, bare: nn.Module) -> None:
        self._prepared = prepared
        self._bare = bare

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # only reached when our own fields are missing (copy, pickle)
            raise AttributeError(name)
        return getattr(self._bare, name)


def _make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=resolve_mixed_precision(config.mixed_precision),
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )


def _check_inputs(images: np.ndarray, config: TrainConfig, num_processes: int) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"images must be uint8 (N, H, W, C) with N >= 1, got {images.dtype} {images.shape}")
    split = config.grad_accum * num_processes
    if config.batch_size % split:
        raise ValueError(
            f"batch_size {config.batch_size} must divide into grad_accum ({config.grad_accum}) x "
            f"processes ({num_processes}) equal micro-batches"
        )


def _warn_config_changes(meta: dict, config: TrainConfig, num_images: int) -> None:
    """A resumed run stays exact only if the settings that shape steps and the data did not change."""
    current = as_dict(config)
    saved = meta.get("config", {})
    changed = sorted(
        key for key, value in saved.items() if key not in _RESUMABLE_CHANGES and current.get(key) != value
    )
    if meta.get("data", {}).get("num_images", num_images) != num_images:
        changed.append("num_images")
    if changed:
        log.warning("resuming with changed settings %s: the run will not equal an uninterrupted one", changed)


def _accelerator_for(config: TrainConfig, accelerator: Any) -> Any:
    """The given accelerator (its gradient accumulation set to the config's) or a new one."""
    accelerator = accelerator if accelerator is not None else _make_accelerator(config)
    if accelerator.gradient_accumulation_steps != config.grad_accum:  # the config decides
        log.info("setting accelerator.gradient_accumulation_steps to config.grad_accum=%d", config.grad_accum)
        accelerator.gradient_accumulation_steps = config.grad_accum
    return accelerator


@dataclass
class _Session:
    """What a training run steps and checkpoints: the prepared model, the bare module, optimizer, schedule, EMA."""

    accelerator: Any
    model: nn.Module
    bare: nn.Module
    optimizer: Any
    lr_scheduler: Any
    ema: EMA


def _prepare(denoiser: nn.Module, config: TrainConfig, accelerator: Any) -> _Session:
    """Adam, the warm-up schedule and the fp32 EMA around ``denoiser``, prepared by Accelerate."""
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
    model, optimizer = accelerator.prepare(denoiser, optimizer)
    bare = accelerator.unwrap_model(model)
    # not prepared: Accelerate would step it once per process; we step it once per optimizer step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer,
        lambda s: lr_factor(s, warmup_steps=config.warmup_steps),
    )
    return _Session(accelerator, model, bare, optimizer, lr_scheduler, EMA(bare))


def _scaler(accelerator: Any) -> Any:
    """fp16's gradient scaler (its scale and growth counter are part of an exact resume), else None."""
    return getattr(accelerator, "scaler", None)


def _resume(session: _Session, ckpt_root: Path, config: TrainConfig, num_images: int) -> int:
    """Load the newest complete checkpoint under ``ckpt_root`` into the session; its step (0 if none)."""
    resume_from = latest_checkpoint(ckpt_root)
    if resume_from is None:
        return 0
    meta = load_training_state(resume_from, model=session.bare, ema=session.ema, optimizer=session.optimizer,
                               lr_scheduler=session.lr_scheduler, scaler=_scaler(session.accelerator))
    _warn_config_changes(meta, config, num_images)
    log.info("resuming from %s (step %d)", resume_from, int(meta["step"]))
    return int(meta["step"])


def _save(session: _Session, ckpt_root: Path, step: int, config: TrainConfig, num_images: int,
          protect: frozenset[int] = frozenset()) -> Path | None:
    """Checkpoint ``step`` (main process writes, every process waits); the path on the main process.
    Steps in ``protect`` (the monitor's best) survive the rotation."""
    accelerator, path = session.accelerator, None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        meta = {
            "config": as_dict(config),
            "data": {
                "num_images": num_images,
                "images_seen": step * config.batch_size,
                "epoch": step * config.batch_size / num_images,
            },
            "num_processes": accelerator.num_processes,
        }
        path = save_training_state(
            ckpt_root, step, model=session.bare, ema=session.ema, optimizer=session.optimizer,
            lr_scheduler=session.lr_scheduler, meta=meta, keep_last=config.keep_last,
            scaler=_scaler(accelerator), protect=protect,
        )  # fmt: skip
    accelerator.wait_for_everyone()
    return path


class _Monitoring:
    """The probe monitor's points of one run (kept in ``out_dir/monitor.json`` across resumes), scored on the
    main process on a copy holding the EMA weights while the other processes wait."""

    def __init__(self, monitor: Monitor | None, out_dir: Path, start_step: int, device: torch.device) -> None:
        self.monitor, self.path, self.device = monitor, out_dir / MONITOR_FILE, device
        self.points: list[dict[str, float]] = []
        if monitor is not None and self.path.is_file():  # points after the resumed step are scored again
            saved = json.loads(self.path.read_text(encoding="utf-8"))
            if saved.get("key") != monitor.key:
                log.warning("%s was scored with other monitor settings: its points are dropped", self.path)
            else:
                self.points = [p for p in saved["points"] if p["step"] <= start_step and p["step"] in monitor.steps]
        self._copy: nn.Module | None = None

    def due(self, step: int) -> bool:
        return self.monitor is not None and step in self.monitor.steps

    def protected(self) -> frozenset[int]:
        """The best point's step, whose checkpoint the rotation keeps (it may be carried forward)."""
        best = best_point(self.points) if self.monitor is not None and self.monitor.select else None
        return frozenset() if best is None else frozenset({int(best["step"])})

    def score(self, step: int, bare: nn.Module, ema: EMA, accelerator: Any, callbacks: Sequence[Callback]) -> None:
        """Score the EMA weights after ``step`` unless that point is on record; every process must call it."""
        if accelerator.is_main_process and not any(p["step"] == step for p in self.points):
            assert self.monitor is not None
            if self._copy is None:
                self._copy = copy.deepcopy(bare)
            ema.copy_to(self._copy)
            self._copy.eval()
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                metrics = self.monitor.evaluate(self._copy)  # never touches the training's random streams
            metrics = {**metrics, "wall_s": time.perf_counter() - started}
            self.points = sorted([*self.points, {"step": step, **metrics}], key=lambda p: p["step"])
            write_json_atomic(self.path, {"key": self.monitor.key, "points": self.points})
            log.info("monitor at step %d: %s", step, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            for callback in callbacks:
                callback(step, {f"monitor.{key}": value for key, value in metrics.items()})
        accelerator.wait_for_everyone()

    def chosen(self, last_step: int) -> int:
        """The step carried forward: the best point's with ``select``, else the last."""
        protected = self.protected()
        return next(iter(protected)) if protected else last_step


def _load_ema_weights(ckpt_root: Path, step: int, network: nn.Module) -> None:
    """Put the EMA weights of the checkpoint of ``step`` into ``network``."""
    path = ckpt_root / step_dir_name(step) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the monitor's best checkpoint is gone; rerun to rescore, or set "
                                f"pretrain.monitor.select: false to keep the last step")
    ema = EMA(network)
    ema.load_state_dict(load_file(str(path), device=str(next(network.parameters()).device)))
    ema.copy_to(network)


def train(
    denoiser: nn.Module,
    loss_fn: LossFn,
    images: np.ndarray,
    config: TrainConfig,
    *,
    out_dir: str | Path,
    accelerator: Any = None,
    callbacks: Sequence[Callback] = (),
    monitor: Monitor | None = None,
    progress: bool = True,
) -> TrainResult:
    """Pretrain ``denoiser`` (in place) on ``images`` (uint8 (N, H, W, C)); resume if possible.

    Checkpoints go to ``out_dir/checkpoints/step-XXXXXXXX`` every ``config.checkpoint_every`` steps
    and at the end; the newest complete one there is resumed from. Callbacks run on the main process
    every ``config.log_every`` steps. SIGINT/SIGTERM: finish the step, checkpoint, raise
    ``TrainingInterrupted``. A ``monitor`` scores the EMA weights after its steps (each one also
    checkpointed; the best one's checkpoint is kept). Returns a deep copy of the denoiser holding the
    EMA weights of the last step, or with ``monitor.select`` of its best-scoring step.
    A given ``accelerator`` gets its gradient accumulation set to ``config.grad_accum``.
    """
    started = time.perf_counter()
    accelerator = _accelerator_for(config, accelerator)
    _check_inputs(images, config, accelerator.num_processes)
    ckpt_root = Path(out_dir) / "checkpoints"
    num_images = images.shape[0]
    session = _prepare(denoiser, config, accelerator)
    model, bare, ema = session.model, session.bare, session.ema
    start_step = _resume(session, ckpt_root, config, num_images)
    if start_step >= config.steps:
        log.info("checkpoint at step %d already covers config.steps=%d: nothing to train", start_step, config.steps)
    monitoring = _Monitoring(monitor, Path(out_dir), start_step, accelerator.device)
    if monitoring.due(start_step):  # killed between a checkpoint and its score
        monitoring.score(start_step, bare, ema, accelerator, callbacks)
    view = _LossView(model, bare)
    window = _MetricWindow(config, num_images, accelerator.device)
    history: list[dict[str, float]] = []
    stop = _StopFlag()
    bar = tqdm(
        total=config.steps, initial=start_step, disable=not (progress and accelerator.is_main_process),
        desc="pretrain", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    step = start_step
    path: Path | None = None
    model.train()
    accelerator.step = 0  # align Accelerate's micro-batch counter with our optimizer steps
    try:
        with _stop_on_signals(stop):
            while step < config.steps:
                loss = _train_step(step, model, view, loss_fn, images, config, accelerator, session.optimizer,
                                   session.lr_scheduler)
                window.add(loss)
                ema.update(bare, ema_decay_at(step, config.ema_decay, config.ema_warmup))
                step += 1
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    metrics = window.flush(step, accelerator)
                    history.append({"step": step, **metrics})
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                    img_s=f"{metrics['images_per_s']:.0f}")  # fmt: skip
                    if accelerator.is_main_process:
                        for callback in callbacks:
                            callback(step, metrics)
                stopping = _any_process_stopping(stop, accelerator)
                due = monitoring.due(step)
                if stopping or due or step % config.checkpoint_every == 0 or step == config.steps:
                    path = _save(session, ckpt_root, step, config, num_images, monitoring.protected())
                if due:
                    monitoring.score(step, bare, ema, accelerator, callbacks)
                if stopping and step < config.steps:
                    raise TrainingInterrupted(step, path)
    finally:
        bar.close()

    ema_denoiser = copy.deepcopy(bare)
    ema.copy_to(ema_denoiser)
    chosen = monitoring.chosen(step)
    if chosen != step:
        log.info("carrying forward step %d (the monitor's best), not the last step %d", chosen, step)
        _load_ema_weights(ckpt_root, chosen, ema_denoiser)
    ema_denoiser.eval()
    return TrainResult(step=step, ema_denoiser=ema_denoiser, history=history, wall_s=time.perf_counter() - started,
                       chosen_step=chosen, monitor=list(monitoring.points))  # fmt: skip


class _MetricWindow:
    """Loss summed over the steps since the last log, without a device sync per step."""

    def __init__(self, config: TrainConfig, num_images: int, device: torch.device) -> None:
        self.config = config
        self.num_images = num_images
        self.loss = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def flush(self, step: int, accelerator: Any) -> dict[str, float]:
        """{"loss", "lr", "images_per_s", "epoch"} of the window ending at ``step``; then reset.
        Collective (mean loss over processes): every process must call it at the same step."""
        config = self.config
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        metrics = {
            "loss": accelerator.reduce(self.loss / self.steps, reduction="mean").item(),
            "lr": config.lr * lr_factor(step - 1, warmup_steps=config.warmup_steps),  # lr of the last step
            "images_per_s": self.steps * config.batch_size / elapsed,
            "epoch": step * config.batch_size / self.num_images,
        }
        self.loss.zero_()
        self.steps = 0
        self.started = time.perf_counter()
        return metrics


def _any_process_stopping(stop: _StopFlag, accelerator: Any) -> bool:
    """Whether any process got a stop signal (all processes must agree to save and stop together)."""
    if accelerator.num_processes == 1:
        return stop.signum is not None
    flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def _train_step(
    step: int,
    model: nn.Module,
    view: _LossView,
    loss_fn: LossFn,
    images: np.ndarray,
    config: TrainConfig,
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns this process's mean loss ()."""
    device = accelerator.device
    indices = global_batch_indices(config.seed, step, config.batch_size, images.shape[0])
    micro = local_micro_batches(indices, config.grad_accum, accelerator.num_processes, accelerator.process_index)
    fork_devices = [device] if device.type == "cuda" else []
    total = torch.zeros((), device=device)
    for m, local in enumerate(micro):
        seed = derive_seed(config.seed, _STEP_RNG, step, accelerator.process_index, m)
        generator = torch.Generator(device=device).manual_seed(seed)
        x0 = to_model_input(images[local]).to(device, non_blocking=True)  # (n, C, H, W) in [-1, 1]
        if config.hflip:
            x0 = _random_hflip(x0, generator)
        with torch.random.fork_rng(devices=fork_devices):
            torch.manual_seed(derive_seed(seed, 1))  # dropout and any other global-RNG draw
            with accelerator.accumulate(model):
                loss = loss_fn(view, x0, generator).float().mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if m != len(micro) - 1:
                        raise RuntimeError("Accelerate synced gradients before the last micro-batch")
                    if config.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        total += loss.detach()
    if not accelerator.sync_gradients:
        raise RuntimeError("Accelerate did not sync gradients at the last micro-batch")
    lr_scheduler.step()
    return total / len(micro)


__all__ = [
    "MONITOR_FILE",
    "Monitor",
    "TrainResult",
    "TrainingInterrupted",
    "derive_seed",
    "epoch_order",
    "global_batch_indices",
    "local_micro_batches",
    "train",
]
