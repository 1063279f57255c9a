"""Exponential moving average of a network's weights, kept in fp32 whatever the training precision.

Everything in the model's ``state_dict`` is tracked: parameters and persistent buffers (floating ones
by lerp, so constants stay bit-exact; integer ones copied). ``EMA.state_dict()`` therefore has the
model's keys and loads straight into a copy of the model with ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The live parameters and persistent buffers, under their ``state_dict`` keys.

    Non-persistent buffers (e.g. a noise schedule derived from the config) are constants that every
    copy of the model rebuilds itself, so they are neither averaged nor saved.
    """
    yield from model.state_dict(keep_vars=True).items()


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (bf16/fp16 weights are averaged in fp32; fp64 stays fp64)."""
    return torch.promote_types(dtype, torch.float32)


class EMA:
    """fp32 shadow copies of the parameters and buffers of ``model``; ``update`` after each step."""

    def __init__(self, model: nn.Module) -> None:
        self.shadow: dict[str, torch.Tensor] = {}
        for name, tensor in _named_tensors(model):
            value = tensor.detach()
            if value.is_floating_point():
                self.shadow[name] = value.to(_shadow_dtype(value.dtype), copy=True)
            else:
                self.shadow[name] = value.clone()

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
                shadow.lerp_(tensor.detach().to(shadow.dtype), 1.0 - decay)
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
