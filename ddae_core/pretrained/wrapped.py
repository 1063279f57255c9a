"""A diffusers ``UNet2DModel`` behind our network interface, for the UNets our own cannot express exactly.

The class *is* the diffusers model (a subclass), so its blocks keep their diffusers names as taps
(``up_blocks.1.resnets.2``) and a forward hook on a tap is a hook on the diffusers block itself. It adds
what the pipeline asks of a network: ``forward(x, noise_label) -> eps``, ``tap_names``, ``tap_selectors``
(``mid``, ``decoder``, ``dec1``, ``out_N``: the same roles as on our UNet), ``input_shape`` and ``spec``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DModel

from ddae_core.pretrained.configs import unet_input_shape

KIND = "diffusers-unet"


class DiffusersUNet(UNet2DModel):
    """``UNet2DModel`` whose forward takes ``(x, noise_label)`` and returns the eps prediction only."""

    def forward(self, x: torch.Tensor, noise_label: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # x: (N, C, H, W); noise_label: (N,) the 0-based step the model was trained with -> (N, C, H, W)
        out = super().forward(x, noise_label).sample
        channels = self.config.in_channels
        return out[:, :channels] if out.shape[1] == 2 * channels else out  # a learned variance is dropped

    @property
    def input_shape(self) -> tuple[int, int]:
        """(channels, size) of the images it denoises."""
        return unet_input_shape(self.config)

    def spec(self) -> dict[str, Any]:
        """What rebuilds it (``network.json``): the diffusers config, nothing executable."""
        return {"kind": KIND, "diffusers": dict(self.config)}

    def tap_names(self) -> list[str]:
        """Every tap (res blocks, attentions, resamplers, the mid and up blocks whole), in forward order."""
        names: list[str] = []
        for i, block in enumerate(self.down_blocks):
            names += _block_taps(f"down_blocks.{i}", block)
        names += [*_res_attn_taps("mid_block", self.mid_block), "mid_block"]
        for i, block in enumerate(self.up_blocks):
            names += [*_block_taps(f"up_blocks.{i}", block), f"up_blocks.{i}"]
        return names

    def tap_selectors(self) -> dict[str, tuple[str, ...]]:
        """Resolution-free names: ``mid`` the mid block's output; ``decoder`` each up layer's output
        (its attention where it has one, as the paper counts ``out_N``), deepest first; ``dec<K>`` the
        layers of the K-th up block; ``out_N`` the N-th decoder layer."""
        decoder: list[tuple[int, str]] = []
        for k, block in enumerate(self.up_blocks, start=1):
            attentions = getattr(block, "attentions", None)
            for j in range(len(block.resnets)):
                attn = attentions is not None and j < len(attentions) and attentions[j] is not None
                decoder.append((k, f"up_blocks.{k - 1}.{'attentions' if attn else 'resnets'}.{j}"))
        selectors: dict[str, tuple[str, ...]] = {"mid": ("mid_block",), "decoder": tuple(n for _, n in decoder)}
        for k in range(1, len(self.up_blocks) + 1):
            selectors[f"dec{k}"] = tuple(n for level, n in decoder if level == k)
        selectors.update({f"out_{i}": (name,) for i, (_, name) in enumerate(decoder, start=1)})
        return selectors


def _block_taps(path: str, block: torch.nn.Module) -> list[str]:
    """A down or up block's res blocks and attentions, then its resampler if it has one."""
    resamplers = [f"{path}.{name}.0" for name in ("downsamplers", "upsamplers")
                  if getattr(block, name, None) is not None]
    return _res_attn_taps(path, block) + resamplers


def _res_attn_taps(path: str, block: torch.nn.Module) -> list[str]:
    """``path.resnets.j`` and, after each where present, ``path.attentions.j`` (diffusers' order);
    the mid block runs resnets.0, attentions.0, resnets.1."""
    attentions = getattr(block, "attentions", None) or []
    taps: list[str] = []
    for j in range(len(block.resnets)):
        if path == "mid_block" and j > 0 and j - 1 < len(attentions) and attentions[j - 1] is not None:
            taps.append(f"{path}.attentions.{j - 1}")
        taps.append(f"{path}.resnets.{j}")
        if path != "mid_block" and j < len(attentions) and attentions[j] is not None:
            taps.append(f"{path}.attentions.{j}")
    return taps


def build(spec: dict[str, Any]) -> DiffusersUNet:
    """The wrapped model of a ``spec`` (random weights: the caller loads them)."""
    return DiffusersUNet.from_config(spec["diffusers"])
