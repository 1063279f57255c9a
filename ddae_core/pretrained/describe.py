"""What ``ddae networks --from SOURCE`` prints: an imported network's taps, widths, output sizes and roles."""

from __future__ import annotations

import torch

from ddae_core.features import capture
from ddae_core.nn.describe import format_table
from ddae_core.nn.unet import count_parameters
from ddae_core.pretrained.importer import ImportedNetwork


def tap_shapes(denoiser: torch.nn.Module) -> dict[str, tuple[int, str]]:
    """Tap -> (channels, output size as text) from one forward of a blank image (tokens: ``L tokens``)."""
    channels, size = denoiser.input_shape
    backbone = denoiser.unet
    with torch.inference_mode(), capture(backbone, backbone.tap_names()) as captured:
        z = denoiser.encode(torch.zeros(1, channels, size, size))
        backbone(z, torch.zeros(1))
    shapes = {}
    for name in backbone.tap_names():
        out = captured[name]
        if out.ndim == 4:
            shapes[name] = (int(out.shape[1]), f"{out.shape[2]}x{out.shape[3]}")
        else:  # transformer tokens (1, L, D)
            shapes[name] = (int(out.shape[-1]), f"{out.shape[1]} tokens")
    return shapes


def describe_imported(imported: ImportedNetwork) -> str:
    """The network read from a source: form, parameters, input, then every tap with the selectors naming it."""
    denoiser = imported.denoiser
    channels, size = denoiser.input_shape
    roles: dict[str, list[str]] = {}
    for selector, blocks in denoiser.unet.tap_selectors().items():
        for block in blocks:
            roles.setdefault(block, []).append(selector)
    rows = [[tap, str(ch), out, " ".join(roles.get(tap, []))] for tap, (ch, out) in tap_shapes(denoiser).items()]
    head = [f"{imported.location}: {imported.form}",
            f"parameters {count_parameters(denoiser, trainable_only=False):,}; input {channels}x{size}x{size}; "
            f"DDPM T={imported.diffusion.timesteps}, t in 1..{imported.diffusion.timesteps} (extract.levels)",
            f"weights sha256 {imported.checksum}", ""]
    return "\n".join(head + format_table(["tap", "channels", "output", "selectors"], rows)) + "\n"
