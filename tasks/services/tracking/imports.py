"""Where ``pretrain.init.source`` lives on this machine, and the version of its weights.

A ``models:/<name>/<version>`` (or ``@alias``) URI of a registered ddae-classifier is downloaded from
the tracking store (``MLFLOW_TRACKING_URI``, or this repository's), and its bundled network is used;
anything else (a folder, a hub id) is found by ``ddae_core.pretrained.importer.locate``.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ddae_core.config import InitConfig
from ddae_core.pretrained.errors import ImportSourceError
from ddae_core.pretrained.importer import input_shape_of, locate, source_checksum

REGISTRY_PREFIX = "models:/"


@contextlib.contextmanager
def init_folder(root: Path, source: str) -> Iterator[Path]:
    """The local folder holding ``source``'s model while the block runs: a registry URI is downloaded
    into a temporary folder (removed after: the import has read it), a hub id into the hub's cache."""
    if not source.startswith(REGISTRY_PREFIX):
        yield locate(source)
        return
    with tempfile.TemporaryDirectory(prefix="ddae-import-") as tmp:
        yield registered_network(root, source, Path(tmp))


def registered_network(root: Path, uri: str, target: Path) -> Path:
    """Download the registered model ``uri`` into ``target`` and return its network folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from tasks.services.tracking.runs import tracking_uri

    store = tracking_uri(root)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except MlflowException as err:
        raise ImportSourceError(f"{uri}: not found in the tracking store {store}: {err.message}") from None
    network = next((p.parent for p in sorted(local.rglob("network.json"))), None)
    if network is None:
        raise ImportSourceError(f"{uri}: not a ddae-classifier model (no network/network.json among its artifacts)")
    return network


def init_snapshot(root: Path, init: InitConfig) -> dict:
    """What pretrain starts from, as a small JSON: mode, source, the weights' checksum and input shape.

    The snapshot stage writes it to ``data/init.json`` only when it changes, so DVC reruns pretrain (and
    prepare, whose ``auto`` shape follows the model) exactly when the imported weights change.
    """
    if init.mode == "scratch":
        return {"mode": "scratch"}
    with init_folder(root, init.source) as folder:
        return {"mode": init.mode, "source": init.source, "convert": init.convert,
                "checksum": source_checksum(folder), "input_shape": list(input_shape_of(folder))}
