"""Where each stage reads and writes, and the one way to find the repository those paths are under."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# A flow run by a Prefect worker started elsewhere finds its repository here (when no ``repo`` is given).
REPO_ENV = "DDAE_REPO"


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the repository root."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def init_record(self) -> Path:
        """``data/init.json``: where pretraining starts (the snapshot stage's record of ``pretrain.init``)."""
        return self.root / "data" / "init.json"

    @property
    def pretrain(self) -> Path:
        return self.root / "outputs" / "pretrain"

    @property
    def network(self) -> Path:
        return self.pretrain / "network"

    @property
    def checkpoints(self) -> Path:
        return self.root / "outputs" / "checkpoints"

    @property
    def features(self) -> Path:
        return self.root / "outputs" / "features"

    @property
    def probe(self) -> Path:
        return self.root / "outputs" / "probe"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def resolve_root(explicit: str | Path | None = None) -> Path:
    """The repository root: ``explicit`` (``--repo``, a flow's ``repo``) if given, else the nearest
    directory holding params.yaml, searching upward from the working directory."""
    if explicit:
        root = Path(explicit).resolve()
        if not (root / "params.yaml").is_file():
            raise FileNotFoundError(f"{root}: no params.yaml here (not a ddae repository)")
        return root
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / "params.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"no params.yaml found in {here} or any parent directory")
