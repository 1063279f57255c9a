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
    from tasks.profiles import check_overrides, resolve_profile, source_name

    data = read_params_file(params_path)
    check_overrides(data, params_path.parent, overrides)
    for key, value in overrides.items():
        set_dotted(data, key, value)
    source = f"{source_name(params_path, data)} (with overrides)"
    config = PipelineConfig.from_dict(resolve_profile(data, params_path.parent), source=source)
    validate_pipeline(config, source=source)
    return data, config


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> PipelineConfig:
    """Validate the overridden params and only then rewrite params.yaml (atomically)."""
    data, config = overridden_params(params_path, overrides)
    if overrides:
        write_bytes_atomic(params_path, yaml.safe_dump(data, sort_keys=False).encode())
    return config
