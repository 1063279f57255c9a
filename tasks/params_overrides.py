"""Apply ``section.key=value`` overrides to params.yaml, validated before the file changes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.validation import validate_pipeline
from tasks.common import read_params_file, write_bytes_atomic


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``data[a][b][c] = value`` for ``a.b.c``; intermediate sections must exist."""
    *parents, last = dotted.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[:i + 1])}: is a value, not a section (override {dotted!r})")
        node = child
    node[last] = value


def overridden_params(params_path: Path, overrides: dict[str, Any]) -> tuple[dict, PipelineConfig]:
    """params.yaml with the overrides applied, validated; the file itself is not touched.

    Raises:
        ConfigError naming the offending key.
    """
    data = read_params_file(params_path)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    source = f"{params_path.name} (with overrides)"
    config = PipelineConfig.from_dict(data, source=source)
    validate_pipeline(config, source=source)
    return data, config


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> PipelineConfig:
    """Validate the overridden params and only then rewrite params.yaml (atomically)."""
    data, config = overridden_params(params_path, overrides)
    if overrides:
        write_bytes_atomic(params_path, yaml.safe_dump(data, sort_keys=False).encode())
    return config
