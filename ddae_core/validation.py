"""Checks that span params sections (network name x data shape x taps x levels), run before any work.

Each section validates itself in ``config.py``; what needs two sections (is ``extract.taps`` a block
of the network that ``pretrain.network`` builds at the data's shape?) is checked here, cheaply,
without building a network.
"""

from __future__ import annotations

from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.diffusion import feature_levels
from ddae_core.nn import NETWORKS, paper_aliases
from ddae_core.nn.unet import network_config, tap_names
from ddae_core.readout import resolve_taps


def validate_pipeline(config: PipelineConfig, source: str = "params.yaml") -> None:
    """Raise ConfigError (naming the key) if the sections do not fit together."""
    try:
        net = config.pretrain.network
        if net.name not in NETWORKS:
            raise ConfigError(f"pretrain.network.name: unknown network {net.name!r}; "
                              f"known: {', '.join(NETWORKS)}")
        overrides = {} if net.dropout is None else {"dropout": net.dropout}
        try:
            unet_config = network_config(net.name, config.data.channels, config.data.image_size, **overrides)
        except ValueError as err:
            raise ConfigError(f"pretrain.network.name: {net.name!r} does not fit "
                              f"{config.data.channels}x{config.data.image_size}x{config.data.image_size} "
                              f"images: {err}") from None
        known, aliases = tap_names(unet_config), paper_aliases(unet_config)
        extracted = resolve_taps(config.extract.taps, known, aliases, "extract.taps")
        for g, group in enumerate(config.probe.concat):
            for tap in resolve_taps(group, known, aliases, f"probe.concat[{g}]"):
                if tap not in extracted:
                    raise ConfigError(f"probe.concat[{g}]: tap {tap!r} is not in extract.taps")
        try:
            feature_levels(config.pretrain.diffusion, config.extract.levels, config.extract.sigma_indices)
        except ValueError as err:
            raise ConfigError(f"extract.{err}") from None
        if config.diagnostics.pool not in config.extract.pools:
            raise ConfigError(f"diagnostics.pool: {config.diagnostics.pool} is not in extract.pools "
                              f"{list(config.extract.pools)} (diagnostics read the cached features)")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
