"""Exponential moving average of a network's weights, kept in fp32 whatever the training precision.

Parameters and buffers are both averaged (floating ones by lerp, so constants stay bit-exact; integer
ones are copied), so the EMA network is a complete, self-consistent copy of the model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers (persistent or not), by their module paths."""
    yield from model.named_parameters()
    yield from model.named_buffers()


class EMA:
    """fp32 shadow copies of every parameter and buffer of ``model``; ``update`` after each step."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow: dict[str, torch.Tensor] = {}
        for name, tensor in _named_tensors(model):
            value = tensor.detach()
            self.shadow[name] = value.float().clone() if value.is_floating_point() else value.clone()

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """shadow <- decay * shadow + (1 - decay) * model, for every floating tensor; copy the rest."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        seen = 0
        for name, tensor in _named_tensors(model):
            shadow = self._shadow_for(name, tensor)
            if shadow.is_floating_point():
                # lerp: shadow + (1 - decay) * (x - shadow); exact when x == shadow
                shadow.lerp_(tensor.detach().float(), 1.0 - decay)
            else:
                shadow.copy_(tensor.detach())
            seen += 1
        if seen != len(self.shadow):
            raise KeyError(f"model has {seen} tensors, EMA tracks {len(self.shadow)}")

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged values into ``model`` (cast to each tensor's own dtype)."""
        for name, tensor in _named_tensors(model):
            tensor.copy_(self._shadow_for(name, tensor))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors by name (copies, safe to save with safetensors)."""
        return {name: value.detach().clone().contiguous() for name, value in self.shadow.items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore shadows saved by ``state_dict``; keys and shapes must match exactly."""
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, value in state.items():
            shadow = self.shadow[name]
            if shadow.shape != value.shape:
                raise ValueError(f"EMA state {name}: shape {tuple(value.shape)} != {tuple(shadow.shape)}")
            shadow.copy_(value)

    def _shadow_for(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        try:
            shadow = self.shadow[name]
        except KeyError:
            raise KeyError(f"EMA has no shadow for {name!r}: was the model changed after EMA(model)?") from None
        if shadow.shape != tensor.shape:
            raise ValueError(f"EMA {name}: shape {tuple(shadow.shape)} != model {tuple(tensor.shape)}")
        return shadow
