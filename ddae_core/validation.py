"""Checks that span params sections (network name x data shape x taps x levels), run before any work.

Each section validates itself in ``config.py``; what needs two sections (is ``extract.taps`` a block
of the network that ``pretrain.network`` builds at the data's shape?) is checked here, cheaply,
without building a network.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.diffusion import feature_levels
from ddae_core.nn import NETWORKS, tap_selectors
from ddae_core.nn.unet import network_config, tap_names
from ddae_core.readout import resolve_taps


def validate_readouts(config: PipelineConfig, known: Sequence[str], selectors: Mapping[str, Sequence[str]]) -> None:
    """Raise ConfigError if ``extract.taps`` or ``probe.concat`` name blocks a network with taps ``known``
    and ``selectors`` does not have, or a concat group reads a block that extract does not cache."""
    extracted = resolve_taps(config.extract.taps, known, selectors, "extract.taps")
    for g, group in enumerate(config.probe.concat):
        for tap in resolve_taps(group, known, selectors, f"probe.concat[{g}]"):
            if tap not in extracted:
                raise ConfigError(f"probe.concat[{g}]: tap {tap!r} is not in extract.taps")


_SIZED_BLOCK = re.compile(r"^(enc|dec)\.\d+x\d+\.")  # dec.7x7.res0: exists only at one input size


def _without_sized_blocks(config: PipelineConfig) -> PipelineConfig:
    """``config`` with block names that depend on the input size left out of taps and concat groups."""
    def keep(taps: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(tap for tap in taps if not _SIZED_BLOCK.match(tap))

    extract = dataclasses.replace(config.extract, taps=keep(config.extract.taps) or ("mid",))
    probe = dataclasses.replace(config.probe, concat=tuple(keep(group) for group in config.probe.concat))
    return dataclasses.replace(config, extract=extract, probe=probe)


def _validate_network(config: PipelineConfig) -> None:
    """``pretrain.network`` exists, fits the data's shape where it is set, and has the taps extract reads."""
    net = config.pretrain.network
    if net.name not in NETWORKS:
        raise ConfigError(f"pretrain.network.name: unknown network {net.name!r}; known: {', '.join(NETWORKS)}")
    overrides = {} if net.dropout is None else {"dropout": net.dropout}
    channels = None if config.data.channels == "auto" else config.data.channels
    size = None if config.data.image_size == "auto" else config.data.image_size
    try:
        unet_config = network_config(net.name, channels, size, **overrides)
    except ValueError as err:
        raise ConfigError(f"pretrain.network.name: {net.name!r} does not fit "
                          f"{channels}x{size}x{size} images: {err}") from None
    checked = config if size is not None else _without_sized_blocks(config)
    validate_readouts(checked, tap_names(unet_config), tap_selectors(unet_config))


def validate_pipeline(config: PipelineConfig, source: str = "params.yaml") -> None:
    """Raise ConfigError (naming the key) if the sections do not fit together.

    With ``data.image_size: auto`` the size is known only after prepare, so block names that depend
    on it (``dec.7x7.res0``) are checked by the pretrain stage; every other name (``mid``, ``mid.res1``,
    ``decoder``, ``out_6``) here. An imported network (``pretrain.init``) has its own taps, checked by
    the pretrain stage when it reads the network.
    """
    try:
        if config.pretrain.init.mode == "scratch":  # an imported network is checked once pretrain reads it
            _validate_network(config)
        try:
            feature_levels(config.pretrain.diffusion, config.extract.levels, config.extract.sigma_indices)
        except ValueError as err:
            raise ConfigError(f"extract.{err}") from None
        if config.data.anomaly and config.finetune.enabled:
            raise ConfigError("finetune.enabled: true, but data.normal_classes makes this an anomaly-detection run "
                              "(one-class, no labels of anomalies to fine-tune a classifier on); set it to false")
        if config.diagnostics.pool not in config.extract.pools:
            raise ConfigError(f"diagnostics.pool: {config.diagnostics.pool} is not in extract.pools "
                              f"{list(config.extract.pools)} (diagnostics read the cached features)")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
