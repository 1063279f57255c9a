"""Apply ``section.key=value`` overrides to params.yaml, validated before the file changes.

``profile=NAME`` among them writes that profile first (tasks/services/params/profiles.py), then the other keys. The
file keeps its comments and order (tasks/services/params/editing.py); a refused override leaves it byte-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ddae_core.config import PipelineConfig
from tasks.services.params.editing import edit_params
from tasks.services.params.loading import config_from_params
from tasks.services.params.profiles import PROFILE_KEY, with_profile


def overridden_params(params_path: Path, overrides: dict[str, Any], *,
                      write: bool = False) -> tuple[dict, PipelineConfig]:
    """params.yaml with the overrides applied and validated; written only with ``write``.

    Raises:
        ConfigError naming the offending key (the file unchanged).
    """
    settings, source = with_profile(params_path, overrides)
    source = f"{source} (with overrides)" if overrides else source
    return edit_params(params_path, settings, lambda data: (data, config_from_params(data, source)),
                       remove=(PROFILE_KEY,) if PROFILE_KEY in overrides else (), write=write)


def apply_overrides(params_path: Path, overrides: dict[str, Any]) -> PipelineConfig:
    """Validate the overridden params and only then rewrite params.yaml (atomically, comments kept).

    The caller holds the repository's run lock (tasks/services/runner/run_lock.py).
    """
    return overridden_params(params_path, overrides, write=True)[1]
