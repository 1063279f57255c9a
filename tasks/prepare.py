"""The prepare stage: read the configured dataset into the canonical prepared format (data/prepared)."""

from __future__ import annotations

import json

from ddae_core.config import PipelineConfig
from ddae_core.data import prepare_dataset
from ddae_core.nn.unet import size_multiple
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import stage_main
from tasks.services.tracking.runs import stage_run


def imported_shape(paths: Paths) -> tuple[int, int] | None:
    """The (channels, size) an imported model reads, as the snapshot stage recorded it; None from scratch."""
    record = json.loads(paths.init_record.read_text()) if paths.init_record.is_file() else {}
    shape = record.get("input_shape")  # written only for an imported model (init_snapshot)
    return (int(shape[0]), int(shape[1])) if shape else None


def run(config: PipelineConfig, paths: Paths) -> dict:
    """Prepare the dataset atomically and record its manifest (counts, checksum) in MLflow.

    Returns:
        A summary dict: dataset, split counts, checksum and how many files were skipped.
    """
    multiple = size_multiple(config.pretrain.network.name)
    manifest = prepare_dataset(config.data, paths.prepared, progress=True, size_multiple=multiple,
                               model_shape=imported_shape(paths))
    summary = {
        "dataset": manifest["dataset"],
        "layout": manifest["layout"],
        "shape": manifest["shape"],
        "splits": manifest["splits"],
        "checksum": manifest["checksum"],
        "skipped": len(manifest.get("skipped", [])),
        "warnings": manifest["warnings"],
    }
    with stage_run(paths.root, "prepare", {"ddae.data_checksum": manifest["checksum"]}) as _:
        import mlflow

        mlflow.log_params({f"data.{k}": v for k, v in manifest["config"].items()})
        mlflow.log_params({"layout": manifest["layout"][:500], "working_shape": "x".join(map(str, manifest["shape"]))})
        mlflow.log_metrics({f"{split}_images": n for split, n in manifest["splits"].items()})
        mlflow.log_metric("skipped_images", summary["skipped"])
        mlflow.log_dict(manifest, "manifest.json")
    return summary


if __name__ == "__main__":
    stage_main("prepare", run)
