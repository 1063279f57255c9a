"""Checkpoints without pickled code: safetensors weights + JSON config, written atomically.

Two kinds. A *network* (``network.safetensors`` + ``network.json``) is everything needed to rebuild
a denoiser for sampling or features. A *training state* (``step-00000100/``) adds the EMA, optimizer
and lr-scheduler state so a run resumes exactly. Both are written through ``ddae_core.atomic``'s
``atomic_directory`` (a temporary directory, fsynced and renamed), so a directory with the final name
is always complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ddae_core.atomic import atomic_directory, write_json_atomic
from ddae_core.config import ConfigError, DiffusionConfig, as_dict, section_from_dict

log = logging.getLogger(__name__)

NETWORK_WEIGHTS = "network.safetensors"
NETWORK_CONFIG = "network.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not match the network it is loaded into."""


# what a failed write raises: OSError (disk full, quota, file size limit), safetensors' own error,
# and torch.save's RuntimeError ("PytorchStreamWriter failed writing file")
_WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


# ----------------------------------------------------------------------------- file helpers


def _tensors_for_file(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies (safetensors refuses tensors that share storage)."""
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in state.items()}


def _load_strict(module: nn.Module, path: Path, device: str | torch.device = "cpu") -> None:
    """Load a safetensors file into ``module``; any key or shape mismatch names the file."""
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read weights ({err})") from err
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit the network: {err}") from err


# ----------------------------------------------------------------------------- networks


def _diffusion_dict(value: Any) -> dict:
    if isinstance(value, DiffusionConfig):
        return as_dict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"config['diffusion'] must be a DiffusionConfig or a dict, got {type(value).__name__}")


def save_network(directory: str | Path, denoiser: nn.Module, config: Mapping[str, Any]) -> Path:
    """Write ``network.safetensors`` (the denoiser's state_dict) and ``network.json`` atomically.

    ``config`` must hold ``"diffusion"`` (a ``DiffusionConfig`` or its dict); its other keys are
    stored as they are (JSON-serialisable). What rebuilds the network (its kind and configuration:
    ``"unet"``, or a diffusers model's config) always comes from ``denoiser.spec()``.
    """
    if "diffusion" not in config:
        raise KeyError("save_network: config needs a 'diffusion' entry (DiffusionConfig or dict)")
    final = Path(directory)
    spec = denoiser.spec()
    meta = {key: value for key, value in config.items() if key not in (*spec, "diffusion")}
    meta.update(spec)
    meta["diffusion"] = _diffusion_dict(config["diffusion"])
    try:
        with atomic_directory(final) as tmp:
            save_file(_tensors_for_file(denoiser.state_dict()), str(tmp / NETWORK_WEIGHTS))
            write_json_atomic(tmp / NETWORK_CONFIG, meta)
    except _WRITE_ERRORS as err:
        raise CheckpointError(f"{final}: cannot write the network ({err}); the previous one is kept") from err
    return final


def read_network_config(directory: str | Path) -> dict:
    """The parsed ``network.json`` of a saved network."""
    path = Path(directory) / NETWORK_CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read network config ({err})") from err


NETWORK_KINDS = ("unet", "diffusers-unet", "latent-dit")  # ours; a wrapped diffusers UNet2DModel; DiT + VAE


def denoiser_from_meta(meta: Mapping[str, Any], source: str = NETWORK_CONFIG) -> nn.Module:
    """The denoiser ``network.json`` describes, with fresh (random) weights; a bad entry names ``source``.

    Nothing executable is read: a kind names one of our classes, which is built from plain configs.
    """
    # imported here so checkpoint I/O of training states does not need the network modules
    from ddae_core.diffusion import DDPMSchedule, build_denoiser
    from ddae_core.nn.unet import UNet, UNetConfig

    kind = meta.get("kind", "unet")
    try:
        diffusion = section_from_dict(DiffusionConfig, meta["diffusion"], "diffusion")
        if kind == "unet":
            return build_denoiser(diffusion, UNet(UNetConfig.from_dict(meta["unet"])),
                                  meta.get("noise_label", diffusion.noise_label))
        if kind == "diffusers-unet":
            from ddae_core.pretrained import wrapped

            return build_denoiser(diffusion, wrapped.build(dict(meta)), meta.get("noise_label", "index"))
        if kind == "latent-dit":
            from ddae_core.pretrained import dit

            schedule = DDPMSchedule(diffusion.timesteps, diffusion.beta_start, diffusion.beta_end)
            return dit.build(dict(meta), schedule)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise CheckpointError(f"{source}: invalid network config: {err!r}") from err
    raise CheckpointError(f"{source}: unknown network kind {kind!r} (known: {', '.join(NETWORK_KINDS)})")


def load_network(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a denoiser from ``network.json`` alone and load ``network.safetensors`` into it."""
    directory = Path(directory)
    denoiser = denoiser_from_meta(read_network_config(directory), str(directory / NETWORK_CONFIG))
    _load_strict(denoiser, directory / NETWORK_WEIGHTS)
    return denoiser.to(device).eval()


def network_hash(directory: str | Path) -> str:
    """sha256 (hex) of ``network.safetensors``: identifies the weights, e.g. in MLflow tags.

    A missing file is a ``CheckpointError`` naming it, which a stage reports in one line.
    """
    path = Path(directory) / NETWORK_WEIGHTS
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: run the pretrain stage first") from None
    return digest.hexdigest()


# ----------------------------------------------------------------------------- training states


def step_dir_name(step: int) -> str:
    """``step-00000100``: zero-padded so names sort by step."""
    return f"step-{step:08d}"


def _complete_step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Final-named step directories holding every file, ascending by step (no load attempted)."""
    if not ckpt_root.is_dir():
        return []
    found = []
    for child in ckpt_root.iterdir():
        match = _STEP_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        if all((child / f).is_file() for f in (MODEL_FILE, EMA_FILE, OPTIMIZER_FILE, STATE_FILE)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def save_training_state(
    ckpt_root: str | Path,
    step: int,
    *,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    meta: Mapping[str, Any],
    keep_last: int,
    scaler: Any = None,
    protect: Collection[int] = (),
) -> Path:
    """Write ``ckpt_root/step-XXXXXXXX/`` atomically, then keep only the newest ``keep_last`` and the
    steps in ``protect`` (the probe monitor's best, which a run may carry forward).

    Files: ``model.safetensors``, ``ema.safetensors`` (``ema.state_dict()``), ``optimizer.pt``
    (optimizer, lr schedule and, in fp16, the gradient ``scaler``'s scale and growth counter: plain
    tensors and numbers, loads with ``weights_only=True``) and ``state.json`` (``step`` plus ``meta``:
    config, data position, ...). Call on one process only.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    try:
        with atomic_directory(final) as tmp:
            save_file(_tensors_for_file(model.state_dict()), str(tmp / MODEL_FILE))
            save_file(_tensors_for_file(ema.state_dict()), str(tmp / EMA_FILE))
            states = {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
            if scaler is not None:
                states["scaler"] = scaler.state_dict()
            torch.save(states, tmp / OPTIMIZER_FILE)
            write_json_atomic(tmp / STATE_FILE, {**meta, "step": step})
    except _WRITE_ERRORS as err:
        raise CheckpointError(
            f"{final}: cannot write the checkpoint ({err}); earlier checkpoints are kept, free space and rerun"
        ) from err
    _rotate(root, keep_last, protect)
    log.info("saved training state %s", final)
    return final


def _discard(path: Path) -> None:
    """Rename to a temp name first, then delete: a kill mid-delete never leaves a half step directory."""
    trash = path.with_name(f"{path.name}.tmp-discard-{os.getpid()}")
    try:
        path.rename(trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def _rotate(root: Path, keep_last: int, protect: Collection[int] = ()) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints and the ``protect`` steps, incomplete
    ones and stale temps."""
    complete = _complete_step_dirs(root)
    for step, path in complete[:-keep_last]:
        if step not in protect:
            _discard(path)
    kept = {path for _, path in complete[-keep_last:]} | {path for step, path in complete if step in protect}
    own = f".tmp-{os.getpid()}"
    for child in root.iterdir():
        if not child.is_dir() or child in kept or child.name.endswith(own):
            continue
        if ".tmp-" in child.name or ".old-" in child.name:  # left by a run killed while saving
            shutil.rmtree(child, ignore_errors=True)
        elif _STEP_DIR.match(child.name):  # a final name missing files (a kill mid-delete, by older code)
            _discard(child)


def _read_state_json(path: Path) -> dict:
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read ({err})") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / STATE_FILE}: no integer 'step'")
    return state


def _verify(path: Path) -> None:
    """Raise ``CheckpointError`` unless every file of the checkpoint reads back."""
    _read_state_json(path)
    for name in (MODEL_FILE, EMA_FILE):
        try:
            load_file(str(path / name))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path / name}: cannot read ({err})") from err
    _load_optimizer_file(path)


def _load_optimizer_file(path: Path) -> dict:
    try:
        state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types on a damaged file
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: cannot read ({err})") from err
    if not isinstance(state, dict) or not {"optimizer", "lr_scheduler"} <= set(state):
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: expected optimizer and lr_scheduler states")
    return state


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """Newest step directory whose files all load; temp, incomplete and corrupt ones are skipped."""
    for step, path in reversed(_complete_step_dirs(Path(ckpt_root))):
        try:
            _verify(path)
        except CheckpointError as err:
            log.warning("skipping unreadable checkpoint %s: %s", path, err)
            continue
        if _read_state_json(path)["step"] != step:
            log.warning("skipping checkpoint %s: state.json names another step", path)
            continue
        return path
    return None


def load_training_state(
    path: str | Path,
    *,
    model: nn.Module,
    ema: Any,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: Any = None,
) -> dict:
    """Load a ``step-XXXXXXXX`` directory into the given objects; return its ``state.json``.

    A ``scaler`` (fp16's gradient scaler) gets its saved state; a checkpoint saved without one (bf16 or
    fp32, or older code) leaves it at its initial scale, with a warning: that resume is not exact.
    """
    path = Path(path)
    meta = _read_state_json(path)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    _load_strict(model, path / MODEL_FILE, device)
    try:
        ema.load_state_dict(load_file(str(path / EMA_FILE), device=str(device)))
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path / EMA_FILE}: does not fit the EMA: {err}") from err
    states = _load_optimizer_file(path)
    try:
        optimizer.load_state_dict(states["optimizer"])
        lr_scheduler.load_state_dict(states["lr_scheduler"])
        if scaler is not None and "scaler" in states:
            scaler.load_state_dict(states["scaler"])
        elif scaler is not None:
            log.warning("%s holds no gradient-scaler state: fp16 resumes from the initial scale", path)
    except (KeyError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path / OPTIMIZER_FILE}: does not fit the optimizer: {err}") from err
    return meta


__all__ = [
    "CheckpointError",
    "denoiser_from_meta",
    "latest_checkpoint",
    "load_network",
    "load_training_state",
    "network_hash",
    "read_network_config",
    "save_network",
    "save_training_state",
    "step_dir_name",
]
