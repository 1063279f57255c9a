"""The one feature path: noise an image, run the denoiser once, read named blocks, pool.

Used by the probe (extract stage), fine-tuning and inference alike, so features never differ
between training a classifier and serving it.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddae_core.noise import augment, copy_seed, sample_noise
from ddae_core.readout import FEATURE_PRECISIONS, FeatureKey, FeaturePrecision, Readout

logger = logging.getLogger(__name__)

class _StopForward(Exception):
    """Raised from the deepest needed hook to skip the rest of a forward pass."""


def _first_tensor(output: Any) -> torch.Tensor | None:
    """A block's output tensor; for tuple/list outputs, the first tensor in it."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _known_names(module: nn.Module, limit: int = 12) -> str:
    """A short list of valid tap names for error messages."""
    tap_names = getattr(module, "tap_names", None)
    names = list(tap_names()) if callable(tap_names) else [n for n, _ in module.named_modules() if n]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


@contextlib.contextmanager
def _capture(
    module: nn.Module, names: Sequence[str], stop_after: str | None
) -> Iterator[dict[str, torch.Tensor]]:
    """``capture`` plus an optional early stop after block ``stop_after`` has produced its output."""
    modules = dict(module.named_modules())
    for name in names:
        if name not in modules or not name:
            raise KeyError(f"unknown block {name!r}; known blocks: {_known_names(module)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            if tensor is None:
                raise TypeError(f"block {name!r} returned {type(output).__name__}, not a tensor")
            captured[name] = tensor
            if name == stop_after and all(n in captured for n in names):
                raise _StopForward

        return hook

    try:
        for name in dict.fromkeys(names):  # unique, in order
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def capture(module: nn.Module, names: Sequence[str]) -> contextlib.AbstractContextManager[dict[str, torch.Tensor]]:
    """Context manager yielding ``{name: output}`` filled by forward hooks on named submodules.

    Names are module paths (``module.get_submodule(name)``); an unknown one raises KeyError before
    any hook is set. Hooks are always removed on exit, also when the body raises. A block called
    several times in one forward keeps its last output.
    """
    return _capture(module, names, stop_after=None)


def pool(feature: torch.Tensor, grid: int) -> torch.Tensor:
    """``(N, C, H, W) -> (N, C * grid * grid)``: grid 1 = global average pooling (the paper).

    grid k = k x k adaptive average pooling flattened channel-major; a 2-D input is returned as is.
    Transformer tokens ``(N, L, D)`` on a square patch grid are pooled as the map ``(N, D, √L, √L)``,
    so grid 1 is the mean over tokens.
    """
    if feature.ndim == 2:
        return feature
    if feature.ndim == 3:
        side = math.isqrt(feature.shape[1])
        if side * side != feature.shape[1]:
            raise ValueError(f"pool: {feature.shape[1]} tokens do not form a square patch grid")
        feature = feature.transpose(1, 2).reshape(feature.shape[0], feature.shape[2], side, side)
    if feature.ndim != 4:
        raise ValueError(f"pool expects (N, C, H, W), tokens (N, L, D) or (N, D), got shape {tuple(feature.shape)}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if grid == 1:
        return feature.mean(dim=(2, 3))  # (N, C)
    return F.adaptive_avg_pool2d(feature, grid).flatten(1)  # (N, C * grid * grid)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode (dropout off) and restore each one's own state after."""
    states = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in states:
            m.training = training


def _stop_block(unet: nn.Module, taps: Sequence[str]) -> str | None:
    """The deepest requested tap in forward order, if the network lists its blocks; else None."""
    tap_names = getattr(unet, "tap_names", None)
    if not callable(tap_names):
        return None
    order = {name: i for i, name in enumerate(tap_names())}
    if not all(tap in order for tap in taps):
        return None
    return max(taps, key=order.__getitem__)


def running_in(precision: FeaturePrecision, device: torch.device) -> contextlib.AbstractContextManager:
    """The network's precision while it is read: fp32 as it is, or bf16 autocast (as it trains).

    bf16 reads about twice as fast where the hardware computes it natively; features move by about
    0.5% of their scale, well inside what a probe notices, but they are not fp32's: a readout
    records its precision and is always read back in it.
    """
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(FEATURE_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _device_of(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward_taps(
    denoiser: nn.Module, x: torch.Tensor, level: torch.Tensor, taps: Sequence[str]
) -> dict[str, torch.Tensor]:
    """One denoiser forward, returning the captured tap outputs (stopping early when possible)."""
    stop_after = _stop_block(denoiser.unet, taps)
    with _capture(denoiser.unet, taps, stop_after=stop_after) as captured:
        try:
            denoiser(x, level)
        except _StopForward:
            pass
    missing = [tap for tap in taps if tap not in captured]
    if missing:
        raise RuntimeError(f"blocks {missing} did not run in the forward pass")
    return dict(captured)


def extract_batch(
    denoiser: nn.Module,
    x0: torch.Tensor,
    sample_ids: torch.Tensor | np.ndarray | Sequence[int],
    *,
    taps: Sequence[str],
    levels: Sequence[float],
    pools: Sequence[int],
    seed: int,
    precision: FeaturePrecision = "fp32",
) -> dict[FeatureKey, np.ndarray]:
    """Features ``{(tap, level, pool): float32 (N, D)}`` of clean images ``x0`` (N, C, H, W) in [-1, 1].

    Per level: noise keyed by (seed, sample id, level), ``denoiser.add_noise``, one forward in eval
    mode under inference mode, in ``precision`` (``running_in``); the module's train/eval states are
    restored afterwards.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got shape {tuple(x0.shape)}")
    if len(sample_ids) != x0.shape[0]:
        raise ValueError(f"{len(sample_ids)} sample ids for {x0.shape[0]} images")
    features: dict[FeatureKey, np.ndarray] = {}
    with _eval_mode(denoiser), torch.inference_mode(), running_in(precision, x0.device):
        for level in levels:
            level = float(level)
            captured = _noised_taps(denoiser, x0, sample_ids, level, taps, seed)
            for tap in taps:
                for grid in pools:
                    pooled = pool(captured[tap].float(), grid)  # (N, D)
                    features[(tap, level, int(grid))] = pooled.cpu().numpy().astype(np.float32, copy=False)
    return features


def _noised_taps(
    denoiser: nn.Module, x0: torch.Tensor, sample_ids: Any, level: float, taps: Sequence[str], seed: int
) -> dict[str, torch.Tensor]:
    """Noise ``x0`` at ``level`` (keyed by seed and sample id) in the denoiser's space (pixels, or a
    latent model's latents: ``encode``) and return the taps' raw outputs."""
    z0 = denoiser.encode(x0)  # (N, C, H, W): x0 itself for a pixel-space network
    noise = sample_noise(seed, sample_ids, level, tuple(z0.shape[1:])).to(z0.device, z0.dtype)
    level_tensor = torch.full((x0.shape[0],), level, dtype=torch.float32, device=x0.device)  # (N,)
    x_noisy = denoiser.add_noise(z0, level_tensor, noise)  # (N, C, H, W)
    return _forward_taps(denoiser, x_noisy, level_tensor, taps)


def live_features(
    denoiser: nn.Module,
    x0: torch.Tensor,
    sample_ids: torch.Tensor | np.ndarray | Sequence[int],
    readout: Readout,
) -> torch.Tensor:
    """Differentiable features (N, D) of ``x0`` read out as ``readout`` (its taps concatenated in order).

    The same noise, forward and pooling as ``extract_batch`` (so a fine-tuned network is read out
    exactly as it was probed), but under the caller's grad mode and train/eval state: fine-tuning
    back-propagates through it.
    """
    if x0.ndim != 4:
        raise ValueError(f"x0 must be (N, C, H, W), got shape {tuple(x0.shape)}")
    if len(sample_ids) != x0.shape[0]:
        raise ValueError(f"{len(sample_ids)} sample ids for {x0.shape[0]} images")
    with running_in(readout.precision, x0.device):
        captured = _noised_taps(denoiser, x0, sample_ids, readout.level, readout.taps, readout.seed)
    return readout.concat({key: pool(captured[key[0]].float(), readout.pool) for key in readout.feature_keys})


def feature_dims(
    denoiser: nn.Module, taps: Sequence[str], pools: Sequence[int], input_shape: tuple[int, int, int]
) -> dict[tuple[str, int], int]:
    """``{(tap, pool): D}`` for images of ``input_shape`` (C, H, W), from one dummy forward."""
    device = _device_of(denoiser)
    x = torch.zeros((1, *input_shape), device=device)  # (1, C, H, W)
    level = torch.ones((1,), device=device)  # valid for DDPM (t = 1) and EDM (sigma = 1)
    with _eval_mode(denoiser), torch.inference_mode():
        captured = _forward_taps(denoiser, denoiser.encode(x), level, taps)
    return {(tap, int(grid)): pool(captured[tap], grid).shape[1] for tap in taps for grid in pools}


def _to_model_input(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` -> float32 ``(N, C, H, W)`` in [-1, 1]."""
    from ddae_core.data import to_model_input

    return to_model_input(images)


def extract(
    denoiser: nn.Module,
    images: Any,
    sample_ids: torch.Tensor | np.ndarray | Sequence[int],
    *,
    taps: Sequence[str],
    levels: Sequence[float],
    pools: Sequence[int],
    seed: int,
    batch_size: int = 256,
    copy: int = 0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    crop_fill: float | None = None,
    precision: FeaturePrecision = "fp32",
) -> Iterator[tuple[int, int, dict[FeatureKey, np.ndarray]]]:
    """Stream ``(start, stop, features)`` over uint8 ``images`` (N, H, W, C), batch by batch.

    ``images`` may be a memmap: only one batch is read and converted at a time. Copy 0 is the plain
    image; copy k > 0 is flipped/cropped by ``augment`` and noised with ``copy_seed(seed, k)`` so each
    copy also gets its own noise (crops reflect the border, or pad with ``crop_fill``, in the network's
    [-1, 1] units). The network runs in ``precision``; it must already live on ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model_device = _device_of(denoiser)
    if model_device.type != device.type:
        raise ValueError(f"denoiser is on {model_device}, asked to extract on {device}")
    ids = np.asarray(sample_ids.cpu() if isinstance(sample_ids, torch.Tensor) else sample_ids, dtype=np.int64)
    total = len(images)
    if ids.shape != (total,):
        raise ValueError(f"sample_ids shape {ids.shape} does not match {total} images")
    noise_seed = copy_seed(seed, copy)
    with tqdm(total=total, disable=not progress, desc=f"features (copy {copy})", unit="img") as bar:
        for start in range(0, total, batch_size):
            stop = min(start + batch_size, total)
            batch_ids = ids[start:stop]
            x0 = _to_model_input(np.array(images[start:stop])).to(device)  # one batch copied  # (B, C, H, W) in [-1, 1]
            x0 = augment(x0, batch_ids, copy, seed, fill=crop_fill)
            yield start, stop, extract_batch(
                denoiser, x0, batch_ids, taps=taps, levels=levels, pools=pools, seed=noise_seed, precision=precision
            )
            bar.update(stop - start)


def extract_all(
    denoiser: nn.Module, images: Any, sample_ids: torch.Tensor | np.ndarray | Sequence[int], **kwargs: Any
) -> dict[FeatureKey, np.ndarray]:
    """Collect ``extract`` over all images into ``{(tap, level, pool): float32 (N, D)}`` arrays."""
    total = len(images)
    out: dict[FeatureKey, np.ndarray] = {}
    for start, stop, batch in extract(denoiser, images, sample_ids, **kwargs):
        for key, value in batch.items():
            if key not in out:
                out[key] = np.empty((total, value.shape[1]), dtype=np.float32)
            out[key][start:stop] = value
    return out
