"""What ``ddae networks`` prints: every named network with its exact parameter count, input and taps."""

from __future__ import annotations

from typing import Sequence

import torch

from ddae_core.nn.unet import (
    NETWORKS,
    SELECTOR_HELP,
    UNet,
    UNetConfig,
    count_parameters,
    network_config,
    tap_channels,
    tap_selectors,
)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def parameter_count(config: UNetConfig) -> int:
    """Exact trainable parameter count of the network, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        return count_parameters(UNet(config))


def describe_networks(in_channels: int | None = None, resolution: int | None = None, *, taps: bool = False) -> str:
    """Table of every named network: exact parameter count, input shape, number of taps (and, with
    ``taps``, every tap with its channels, output size and the selectors that name it: mid, dec1, out_6).
    ``None`` keeps each network's own."""
    rows: list[list[str]] = []
    details: list[str] = []
    for name in NETWORKS:
        try:
            config = network_config(name, in_channels, resolution)
        except ValueError as err:
            rows.append([name, "-", "-", "-", f"invalid at this shape: {err}"])
            continue
        channels = tap_channels(config)
        shape = f"{config.in_channels}x{config.resolution}x{config.resolution}"
        summary = (NETWORKS[name].__doc__ or "").strip().splitlines()[0]
        rows.append([name, str(parameter_count(config)), shape, str(len(channels)), summary])
        if taps:
            roles: dict[str, list[str]] = {}
            for selector, blocks in tap_selectors(config).items():
                for block in blocks:
                    roles.setdefault(block, []).append(selector)
            tap_rows = [[tap, str(ch), f"{res}x{res}", " ".join(roles.get(tap, []))]
                        for tap, (ch, res) in channels.items()]
            details.append(f"\n{name} ({shape}):")
            details.extend("  " + line for line in format_table(["tap", "channels", "output", "selectors"], tap_rows))
    lines = format_table(["network", "parameters", "input", "taps", "description"], rows)
    if taps:
        details.append(f"\nSelectors name taps at any input size: {SELECTOR_HELP}.")
    return "\n".join(lines + details) + "\n"
