"""Params profiles: ``profiles/<name>.yaml``, presets written into params.yaml by ``ddae profile NAME``.

A profile holds the paper's settings for one dataset and framework (CIFAR-10 DDPM, CIFAR-10 EDM,
Tiny-ImageNet). Applying it writes its keys into params.yaml (comments and order kept, the profile's
own comments on the keys it sets), so params.yaml stays the only thing stages read: ``dvc params diff``
and ``dvc exp show`` show the values used, and ``dvc exp run -S KEY=VALUE`` takes effect on any key.
The same happens for the override ``profile=NAME`` (``ddae run --set``, a deployment's ``overrides``),
applied before the other overrides.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ddae_core.config import ConfigError, PipelineConfig
from tasks.services.params.editing import Setting, edit_params, end_of_line_comments, flatten
from tasks.services.params.loading import config_from_params, parse_params, read_params_file

PROFILES_DIR = "profiles"
PROFILE_KEY = "profile"  # the override that names a profile; never a key of params.yaml
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def available_profiles(root: Path) -> list[str]:
    """Names of the profiles in ``root/profiles`` (file stems), sorted."""
    folder = root / PROFILES_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def profile_path(root: Path, name: str) -> Path:
    """``root/profiles/<name>.yaml``; a missing or malformed name fails naming the choices."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"profile: {name!r} is not a profile name (lowercase letters, digits, '-', '.', '_')")
    path = root / PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"profile: {name!r} not found ({path}); profiles: {', '.join(available_profiles(root))}")
    return path


def profile_source(params_path: Path, name: str) -> str:
    """How errors name params.yaml with a profile applied: ``params.yaml + profiles/<name>.yaml``."""
    return f"{params_path.name} + {PROFILES_DIR}/{name}.yaml"


def profile_settings(root: Path, name: str) -> list[Setting]:
    """The profile's leaves, in file order, each with its end-of-line comment; errors name the file."""
    path = profile_path(root, name)
    text = path.read_text()
    data = parse_params(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    if PROFILE_KEY in data:
        raise ConfigError(f"{path}: profile: a profile cannot select another profile")
    comments = end_of_line_comments(text)
    return [Setting(key, value, *comments[key]) if key in comments else Setting(key, value)
            for key, value in flatten(data).items()]


def with_profile(params_path: Path, overrides: dict[str, Any]) -> tuple[list[Setting], str]:
    """``overrides`` as settings, the profile they name (``profile=NAME``) first; and the error source."""
    settings: list[Setting] = []
    source = params_path.name
    name = overrides.get(PROFILE_KEY)
    if PROFILE_KEY in overrides:
        settings += profile_settings(params_path.parent, name)
        source = profile_source(params_path, name)
    settings += [Setting(key, value) for key, value in overrides.items() if key != PROFILE_KEY]
    return settings, source


def changed_keys(before: dict, after: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (old, new) for each leaf that differs (missing = None)."""
    old, new = flatten(before), flatten(after)
    return {key: (old.get(key), new.get(key)) for key in [*new, *(k for k in old if k not in new)]
            if old.get(key) != new.get(key)}


def apply_profile(params_path: Path, name: str) -> tuple[PipelineConfig, dict[str, tuple[Any, Any]]]:
    """Write profile ``name`` into params.yaml, validated first; returns the config and what changed.

    A leftover ``profile`` key (from ``dvc exp run -S +profile=NAME``) is dropped. The caller holds
    the repository's run lock (tasks/services/runner/run_lock.py): params.yaml never changes under a pipeline run.
    """
    before = read_params_file(params_path)
    source = profile_source(params_path, name)
    settings = profile_settings(params_path.parent, name)
    config = edit_params(params_path, settings, lambda data: config_from_params(data, source),
                         remove=(PROFILE_KEY,))
    return config, changed_keys(before, read_params_file(params_path))
