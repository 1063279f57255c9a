"""Networks: the named-block denoising UNet, its building blocks and the paper's configurations."""

from ddae_core.nn.unet import (
    NETWORKS,
    SELECTOR_HELP,
    UNet,
    UNetConfig,
    build_unet,
    count_parameters,
    network_config,
    paper_aliases,
    tap_channels,
    tap_names,
    tap_selectors,
)

__all__ = [
    "NETWORKS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "count_parameters",
    "network_config",
    "SELECTOR_HELP",
    "paper_aliases",
    "tap_channels",
    "tap_selectors",
    "tap_names",
]
