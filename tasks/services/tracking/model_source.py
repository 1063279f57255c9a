"""Which registered model a batch job uses: ``models:/<name>@champion`` by default, or a version.

Shared by ``ddae predict`` and ``ddae embed`` so both read the registry the same way and record the
exact version they used.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tasks.services.runner.stage_main import StageError
from tasks.services.tracking.runs import tracking_uri


@dataclass(frozen=True)
class LoadedModel:
    """A pyfunc model, the URI it came from and the registry version that URI pointed at."""

    uri: str
    version: str  # "" when the URI is not a registry URI (runs:/..., a local path)
    pyfunc: object

    @property
    def classifier(self):
        """The ``ddae_core.classifier.Classifier`` inside the pyfunc (class names, network, taps)."""
        return self.pyfunc.unwrap_python_model().classifier

    @property
    def device(self) -> str:
        """Where the model's network runs (it picks the GPU when loaded, if there is one)."""
        return str(getattr(self.classifier, "device", "cpu"))  # versions logged before devices: cpu


def model_uri(name: str, model: str | None = None, version: int | None = None) -> str:
    """``model`` as given, else ``models:/<name>/<version>``, else ``models:/<name>@champion``."""
    if model and version is not None:
        raise StageError("give a model URI or a version, not both")
    if model:
        return model
    return f"models:/{name}/{version}" if version is not None else f"models:/{name}@champion"


def registry_version(client, uri: str) -> str:
    """The version a ``models:/name@alias`` or ``models:/name/N`` URI points at ("" for other URIs)."""
    alias = re.fullmatch(r"models:/([^/@]+)@([^/]+)", uri)
    if alias:
        return str(client.get_model_version_by_alias(alias.group(1), alias.group(2)).version)
    numbered = re.fullmatch(r"models:/([^/@]+)/(\d+)", uri)
    return numbered.group(2) if numbered else ""


def load_model(root: Path, uri: str) -> LoadedModel:
    """Load ``uri`` from the repository's tracking store (or ``MLFLOW_TRACKING_URI``); errors name it."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    store = tracking_uri(root)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    try:
        version = registry_version(MlflowClient(), uri)
        pyfunc = mlflow.pyfunc.load_model(uri)
    except MlflowException as err:
        raise StageError(f"model {uri} not found in {store}: {err.message}") from None
    return LoadedModel(uri, version, pyfunc)
