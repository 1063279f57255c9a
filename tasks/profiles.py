"""Params profiles: ``profiles/<name>.yaml`` layered over params.yaml, chosen by its ``profile`` key.

A profile holds the paper's settings for one dataset and framework (CIFAR-10 DDPM, CIFAR-10 EDM,
Tiny-ImageNet); its keys replace the same keys of params.yaml, so ``dvc exp run -S profile=NAME`` (or
the deployment override ``{"profile": NAME}``) switches the whole configuration with one value.
dvc.yaml lists ``profile`` as a param and ``profiles/${profile}.yaml`` as a dependency of every stage,
so a switch, or an edit of the chosen profile, reruns what it affects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ddae_core.config import ConfigError

PROFILES_DIR = "profiles"
BASE_PROFILE = "base"  # params.yaml as written
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


def read_profile(root: Path, name: str) -> dict:
    """The parsed profile (a mapping of params sections); errors name the file."""
    import yaml

    path = profile_path(root, name)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of params sections, got {type(data).__name__}")
    if "profile" in data:
        raise ConfigError(f"{path}: profile: a profile cannot select another profile")
    return data


def merge(base: dict, layer: dict) -> dict:
    """``base`` with ``layer`` on top: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def dotted_keys(data: dict, prefix: str = "") -> set[str]:
    """Every leaf key of a nested mapping, dotted (``pretrain.train.lr``)."""
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys |= dotted_keys(value, dotted) if isinstance(value, dict) and value else {dotted}
    return keys


def resolve_profile(data: dict, root: Path) -> dict:
    """params.yaml's mapping with its selected profile applied (``profile`` missing = ``base``)."""
    if not isinstance(data, dict):
        return data  # not a mapping: PipelineConfig.from_dict reports it
    name = data.get("profile", BASE_PROFILE)
    if name in (None, "", BASE_PROFILE) and not (root / PROFILES_DIR / f"{BASE_PROFILE}.yaml").is_file():
        return data
    return merge(data, read_profile(root, name or BASE_PROFILE))


def source_name(params_path: Path, data: dict) -> str:
    """How errors name the configuration: ``params.yaml``, or ``params.yaml + profiles/<name>.yaml``."""
    name = data.get("profile", BASE_PROFILE) if isinstance(data, dict) else BASE_PROFILE
    return params_path.name if name in (None, "", BASE_PROFILE) else f"{params_path.name} + {PROFILES_DIR}/{name}.yaml"


def check_overrides(data: dict, root: Path, overrides: dict[str, Any]) -> None:
    """Reject overrides of keys the selected profile sets: written to params.yaml they would not apply."""
    if not isinstance(data, dict):
        return  # not a mapping: PipelineConfig.from_dict reports it
    name = overrides.get("profile", data.get("profile", BASE_PROFILE)) or BASE_PROFILE
    if name == BASE_PROFILE and not (root / PROFILES_DIR / f"{BASE_PROFILE}.yaml").is_file():
        return
    profile_keys = dotted_keys(read_profile(root, name))
    for key in sorted(overrides):
        if any(key == k or k.startswith(key + ".") or key.startswith(k + ".") for k in profile_keys):
            raise ConfigError(f"{key}: set by profile {name!r} ({PROFILES_DIR}/{name}.yaml), which wins over "
                              f"params.yaml; change it there, e.g. dvc exp run -S '{PROFILES_DIR}/{name}.yaml:{key}=...'")
