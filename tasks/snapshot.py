"""The snapshot stage: record the versions of what the pipeline starts from, as small JSON files.

``data/snapshot.json``: the content checksum of the dataset's source. ``data/init.json``: where the
network starts (``pretrain.init``) and, for an imported model, its weights' checksum and input shape.
DVC runs the stage on every ``repro`` (``always_changed``); each file is rewritten only when it
changed, so an unchanged source and unchanged weights leave everything after it cached.
"""

from __future__ import annotations

import json
from pathlib import Path

from ddae_core.atomic import write_json_atomic
from ddae_core.config import PipelineConfig
from ddae_core.data.snapshot import source_snapshot
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import stage_main
from tasks.services.tracking.imports import init_snapshot


def write_if_changed(target: Path, snapshot: dict) -> bool:
    """Write ``snapshot`` to ``target`` unless it already holds exactly that; whether it wrote."""
    recorded = json.loads(target.read_text()) if target.is_file() else None
    if recorded != snapshot:
        write_json_atomic(target, snapshot)
    return recorded != snapshot


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Checksum the data source and the imported weights; rewrite each file only when it differs."""
    snapshot = source_snapshot(config.data)
    init = init_snapshot(paths.root, config.pretrain.init)
    changed = write_if_changed(paths.root / "data" / "snapshot.json", snapshot)
    init_changed = write_if_changed(paths.init_record, init)
    return {**snapshot, "changed": changed, "init": init, "init_changed": init_changed}


if __name__ == "__main__":
    stage_main("snapshot", run)
