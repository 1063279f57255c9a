"""The snapshot stage: record the content checksum of the dataset's source (data/snapshot.json).

DVC runs it on every ``repro`` (``always_changed``); the file is rewritten only when the checksum
moved, so an unchanged source leaves ``prepare`` and everything after it cached.
"""

from __future__ import annotations

import json

from ddae_core.atomic import write_json_atomic
from ddae_core.config import PipelineConfig
from ddae_core.data.snapshot import source_snapshot
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import stage_main


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Checksum the source; write data/snapshot.json only when it differs from the recorded one."""
    target = paths.root / "data" / "snapshot.json"
    snapshot = source_snapshot(config.data)
    recorded = json.loads(target.read_text()) if target.is_file() else None
    changed = recorded != snapshot
    if changed:
        write_json_atomic(target, snapshot)
    return {**snapshot, "changed": changed}


if __name__ == "__main__":
    stage_main("snapshot", run)
