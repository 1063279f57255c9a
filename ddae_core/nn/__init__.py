"""Networks: the named-block denoising UNet, its building blocks and the paper's configurations."""

from ddae_core.nn.unet import (
    NETWORKS,
    UNet,
    UNetConfig,
    build_unet,
    count_parameters,
    network_config,
    paper_aliases,
    tap_channels,
    tap_names,
)

__all__ = [
    "NETWORKS",
    "UNet",
    "UNetConfig",
    "build_unet",
    "count_parameters",
    "network_config",
    "paper_aliases",
    "tap_channels",
    "tap_names",
]
