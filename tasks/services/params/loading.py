"""params.yaml read as DVC reads it and validated once: the one way every stage, override and profile loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.validation import validate_pipeline


def read_params_file(path: Path) -> dict:
    """Parse params.yaml into a dict, with errors that name the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    return parse_params(text, str(path))


def parse_params(text: str, source: str = "params.yaml") -> Any:
    """params.yaml's values exactly as DVC reads them (ruamel.yaml's safe loader, YAML 1.2).

    So ``dvc params diff`` / ``dvc exp show`` show what the stages use, also where YAML 1.1 (PyYAML)
    reads otherwise: ``no`` and ``on`` stay strings, ``1e-4`` is a number.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        data = YAML(typ="safe").load(text)  # the call DVC's own params loader makes
    except YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return {} if data is None else data


def load_params(path: Path) -> PipelineConfig:
    """Read and validate params.yaml (each section, then how they fit); ConfigError names the key."""
    return config_from_params(read_params_file(path), source=path.name)


def config_from_params(data: Any, source: str = "params.yaml") -> PipelineConfig:
    """Validate parsed params: the one check stages, overrides and profiles share."""
    if isinstance(data, dict) and "profile" in data:
        # what `dvc exp run -S +profile=NAME` (or the old layout of this file) leaves behind
        name = data["profile"] if isinstance(data["profile"], str) and data["profile"] else "NAME"
        raise ConfigError(
            f"{source}: profile: {data['profile']!r}: params.yaml does not select a profile by key; a profile "
            f"is written into it: run `ddae profile {name}` (which also drops this key), then `dvc exp run` "
            f"or `ddae run`")
    config = PipelineConfig.from_dict(data, source=source)
    validate_pipeline(config, source=source)
    return config


