"""Reading another model's weights without running its code: safetensors, or a weights-only unpickle.

A ``.bin``/``.pt`` file is read with ``torch.load(weights_only=True)``, which builds tensors and plain
containers only; a file that needs anything else (a pickled class, a function) is refused, never run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ddae_core.pretrained.errors import ImportSourceError

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def weight_files(folder: Path, stem: str) -> list[Path]:
    """The files holding ``stem``'s weights in ``folder``: safetensors (all shards) if any, else a pickle
    format; none is an ``ImportSourceError`` naming the folder and what was looked for."""
    for suffixes in (SAFE_SUFFIXES, PICKLE_SUFFIXES):
        found = sorted(p for p in folder.glob(f"{stem}*") if p.suffix in suffixes and p.is_file())
        plain = [p for p in found if p.name == f"{stem}{p.suffix}"]
        if found:
            return plain or found
    raise ImportSourceError(f"{folder}: no weights file {stem}.safetensors (or {stem}.bin) found")


def read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of ``files`` (shards of one state dict), read safely; errors name the file."""
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(_read_one(path))
    return state


def _read_one(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix in SAFE_SUFFIXES:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ImportSourceError(f"{path}: cannot read safetensors weights ({err})") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types on a damaged or unsafe file
        if "weights only load failed" in str(err).lower():
            raise ImportSourceError(f"{path}: refused: this pickle holds more than tensors (code or classes), "
                                    "which is never run here; save the weights as safetensors") from None
        raise ImportSourceError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ImportSourceError(f"{path}: not a state dict of tensors")
    return state
