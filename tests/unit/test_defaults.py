"""One set of defaults: params.yaml lists every config field, and each dataclass default is its value.

So a key left out of a params mapping (a test's, a deployment's) means what the default run uses, and
``dvc params diff`` / MLflow see every knob the code reads.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from ddae_core.config import PipelineConfig
from tasks.services.params.editing import flatten
from tasks.services.params.loading import read_params_file

REPO = Path(__file__).resolve().parents[2]
PROFILES = sorted((REPO / "profiles").glob("*.yaml"))


def leaf_fields(cls: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Dotted names of every non-section field (``pretrain.train.lr``), in declaration order."""
    names = []
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        section = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        names += leaf_fields(section, dotted) if dataclasses.is_dataclass(section) else [dotted]
    return names


def value_at(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def differences(a: PipelineConfig, b: PipelineConfig) -> dict[str, tuple[Any, Any]]:
    """Dotted key -> (a's value, b's value) for every leaf field that differs."""
    return {key: (value_at(a, key), value_at(b, key)) for key in leaf_fields()
            if value_at(a, key) != value_at(b, key)}


@pytest.fixture(scope="module")
def params() -> dict:
    return read_params_file(REPO / "params.yaml")  # DVC's own YAML reading


def test_every_default_is_params_yamls_value(params):
    shipped, defaults = PipelineConfig.from_dict(params), PipelineConfig.from_dict({})
    diff = differences(shipped, defaults)
    assert not diff, "dataclass defaults differ from params.yaml: " + "; ".join(
        f"{key}: params.yaml {ours!r}, default {theirs!r}" for key, (ours, theirs) in diff.items())
    assert defaults == shipped == PipelineConfig()


def test_a_changed_value_is_named_by_its_key(params):
    """The comparison above is field by field: it names the key that differs."""
    changed = {**params, "pretrain": {**params["pretrain"],
                                      "train": {**params["pretrain"]["train"], "ema_warmup": "none"}}}
    assert differences(PipelineConfig.from_dict(changed), PipelineConfig()) == {
        "pretrain.train.ema_warmup": ("none", "ramp")}


def test_params_yaml_lists_exactly_the_config_fields(params):
    keys, fields = list(flatten(params)), leaf_fields()
    unknown, unlisted = [k for k in keys if k not in fields], [f for f in fields if f not in keys]
    assert not unknown, f"params.yaml keys that are no config field: {unknown}"
    assert not unlisted, f"config fields params.yaml does not list: {unlisted}"


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_profile_keys_are_config_fields(path):
    keys = list(flatten(read_params_file(path)))
    unknown = [k for k in keys if k not in leaf_fields()]
    assert keys and not unknown, f"{path.name}: keys that are no config field: {unknown}"


def test_every_field_is_read_by_the_code():
    """No dead knob: each field's name is read as an attribute (``.name``) outside config.py.

    Names shared by several sections (``seed``, ``batch_size``) pass once any of them is read; the
    names that belong to one field only (``num_workers`` was such a knob, read by nothing) are the
    ones this catches.
    """
    code = "\n".join(path.read_text() for folder in ("ddae_core", "tasks", "flows")
                     for path in sorted((REPO / folder).rglob("*.py")) if path != REPO / "ddae_core" / "config.py")
    unread = sorted({key for key in leaf_fields()
                     if not re.search(rf"\.{re.escape(key.split('.')[-1])}\b", code)})
    assert not unread, f"config fields no code reads: {unread}"
