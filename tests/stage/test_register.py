"""The register stage's contracts: experiments move no alias, every version is scored with its own
logged code, and the logged requirements pin what the classifier's code imports when it loads."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tasks import register
from tasks.register import Experiment, gate_version, model_requirements, promotion

from source_imports import check_pinned, imported_at_load

REPO = Path(__file__).resolve().parents[2]
NAME = "ddae-classifier"
FACTS = {"model": NAME, "data_checksum": "data-1", "git_commit": "abc1234"}


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A fresh MLflow store in tmp (sqlite + artifacts); the global tracking URI is put back after."""
    from tasks.services.tracking.runs import configure

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DDAE_PIPELINE_RUN_ID", raising=False)
    configure(tmp_path)  # sqlite:///tmp/mlflow.db, artifacts under tmp/mlartifacts
    yield mlflow.MlflowClient()
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def _versions(client, count: int) -> list[str]:
    """``count`` registered versions of NAME (no artifacts behind them: the gate only reads the registry)."""
    client.create_registered_model(NAME)
    return [str(client.create_model_version(NAME, source=f"file:///nowhere/{i}").version) for i in range(count)]


def _aliases(client) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(NAME).aliases.items()}


# ---------------------------------------------------------------------------------------------
# The experiment


def test_the_experiment_opens_in_the_model_training_view(tracking, tmp_path):
    from tasks.services.tracking.runs import EXPERIMENT, stage_run

    kind = "mlflow.experimentKind"
    assert tracking.get_experiment_by_name(EXPERIMENT).tags[kind] == "custom_model_development"  # created with it

    # An experiment made before the tag (an older store) gets it from the next stage run, once.
    other = tmp_path / "older"
    other.mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{other / 'mlflow.db'}")
    old_id = mlflow.create_experiment(EXPERIMENT, artifact_location=(other / "mlartifacts").as_uri())
    assert kind not in mlflow.MlflowClient().get_experiment(old_id).tags
    for _ in range(2):
        with stage_run(other, "register"):
            pass
    experiment = mlflow.MlflowClient().get_experiment_by_name(EXPERIMENT)
    assert experiment.experiment_id == old_id and experiment.tags[kind] == "custom_model_development"


def test_the_printed_ui_address_opens_the_model_training_view(tracking, tmp_path, monkeypatch):
    """MLflow 3.17's UI ignores the kind tag for its GenAI/Model training switch: the address carries it."""
    from tasks.services.tracking.runs import EXPERIMENT, ui_url

    with mlflow.start_run() as run:
        pass
    experiment_id = tracking.get_experiment_by_name(EXPERIMENT).experiment_id
    assert run.info.experiment_id == experiment_id
    local = ui_url(tmp_path, run.info.run_id)  # the sqlite store: `mlflow ui` on this machine
    assert local == f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning"
    # On a tracking server, its own address (the store is read through the same URI).
    monkeypatch.setattr("tasks.services.tracking.runs.tracking_uri", lambda root: "http://mlflow.example:8080/")
    monkeypatch.setattr(mlflow, "MlflowClient", lambda uri: tracking)
    assert ui_url(tmp_path, run.info.run_id) == (
        f"http://mlflow.example:8080/#/experiments/{experiment_id}?workflowType=machine_learning")


# ---------------------------------------------------------------------------------------------
# The gate


def test_experiment_is_read_from_the_variables_dvc_exp_run_sets():
    assert Experiment.from_env({}) is None
    assert Experiment.from_env({"DVC_EXP_NAME": "stray"}) is None  # DVC always sets the baseline
    assert Experiment.from_env({"DVC_EXP_BASELINE_REV": "f" * 40, "DVC_EXP_NAME": "lucky-owl"}) == \
        Experiment("lucky-owl", "f" * 40)


def test_promotion_needs_a_gain_above_the_margin_and_never_happens_in_an_experiment():
    assert promotion(0.5, None, 0.0, None) == (True, "no champion yet")
    assert promotion(0.80, 0.70, 0.05, None)[0] is True
    assert promotion(0.74, 0.70, 0.05, None)[0] is False
    assert promotion(0.70, 0.70, 0.0, None)[0] is False  # a tie keeps the champion
    promoted, reason = promotion(0.99, None, -1.0, Experiment("lucky-owl", "0123456789abcdef"))
    assert promoted is False and "lucky-owl" in reason and "0123456" in reason


def test_inside_an_experiment_a_version_is_registered_and_tagged_but_no_alias_moves(tracking):
    client = tracking
    champion, challenger, new = _versions(client, 3)
    client.set_registered_model_alias(NAME, "champion", champion)
    client.set_registered_model_alias(NAME, "challenger", challenger)
    scores = {f"models:/{NAME}/{champion}": 0.5, f"models:/{NAME}/{new}": 0.9}  # far better, margin -1

    experiment = Experiment("lucky-owl", "0123456789abcdef")
    decision = gate_version(client, NAME, new, score_uri=scores.__getitem__, margin=-1.0,
                            experiment=experiment, facts=FACTS)
    assert decision["promoted"] is False and "experiment 'lucky-owl'" in decision["reason"]
    assert decision["experiment"] == {"name": "lucky-owl", "baseline_rev": "0123456789abcdef"}
    assert decision["test_acc"] == 0.9 and decision["champion_test_acc"] == 0.5
    assert _aliases(client) == {"champion": champion, "challenger": challenger}
    tags = client.get_model_version(NAME, new).tags
    assert tags["ddae.gate.experiment"] == "lucky-owl" and tags["ddae.gate.promoted"] == "False"
    assert tags["ddae.gate.reason"] == decision["reason"]
    assert not any(k.startswith("ddae.gate.") for k in client.get_model_version(NAME, champion).tags)

    # The same version outside an experiment: the gate moves both aliases (so the check above can fail).
    decision = gate_version(client, NAME, new, score_uri=scores.__getitem__, margin=-1.0, experiment=None,
                            facts=FACTS)
    assert decision["promoted"] is True and decision["experiment"] is None
    assert _aliases(client) == {"champion": new, "challenger": new}
    assert client.get_model_version(NAME, champion).tags["ddae.gate.challenger_version"] == new


def test_outside_an_experiment_a_worse_version_becomes_challenger_only(tracking):
    client = tracking
    champion, new = _versions(client, 2)
    client.set_registered_model_alias(NAME, "champion", champion)
    scores = {f"models:/{NAME}/{champion}": 0.8, f"models:/{NAME}/{new}": 0.6}
    decision = gate_version(client, NAME, new, score_uri=scores.__getitem__, margin=0.0, experiment=None,
                            facts=FACTS)
    assert decision["promoted"] is False and "does not beat" in decision["reason"]
    assert _aliases(client) == {"champion": champion, "challenger": new}


# ---------------------------------------------------------------------------------------------
# Scoring in a process of its own


MARKER_MODEL = textwrap.dedent('''
    """A pyfunc whose answer is ddae_core.marker.CLASS_ID of the code it is loaded with."""
    import mlflow
    import pandas as pd
    from mlflow.pyfunc import PythonModel


    class MarkerModel(PythonModel):
        def load_context(self, context):
            from ddae_core.marker import CLASS_ID

            self.class_id = CLASS_ID

        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"class_id": [self.class_id] * len(model_input)})


    mlflow.models.set_model(MarkerModel())
''')


def _fake_project(root: Path, class_id: int) -> None:
    """A project whose ``ddae_core`` says ``class_id``; ``tasks/`` holds only the scorer."""
    (root / "ddae_core").mkdir(parents=True, exist_ok=True)
    (root / "ddae_core" / "__init__.py").write_text("")
    (root / "ddae_core" / "marker.py").write_text(f"CLASS_ID = {class_id}\n")
    for name in ("tasks/__init__.py", "tasks/services/__init__.py", "tasks/services/tracking/__init__.py",
                 "tasks/services/tracking/score_model.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)


def test_a_version_is_scored_with_the_code_it_was_logged_with(tracking, tmp_path):
    """Logged with ddae_core X (answers 1), then the project's ddae_core becomes Y (answers 0)."""
    project = tmp_path / "project"
    _fake_project(project, class_id=1)
    (tmp_path / "marker_model.py").write_text(MARKER_MODEL)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=str(tmp_path / "marker_model.py"),
                                       code_paths=[str(project / "ddae_core")], pip_requirements=["mlflow"])
    (project / "ddae_core" / "marker.py").write_text("CLASS_ID = 0\n")  # the code moves on
    frame = register.write_scoring_frame(tmp_path / "test.parquet", pd.DataFrame({"image": [b"x"] * 4}),
                                         np.ones(4, dtype=np.int64))

    assert register.score(project, info.model_uri, frame) == 1.0  # X, not the Y beside it in the cwd

    # Control: a process that imported the project's ddae_core first scores with Y, whatever is logged.
    shadowed = subprocess.run(
        [sys.executable, "-c", "import ddae_core.marker, sys, mlflow\n"
         "print(mlflow.pyfunc.load_model(sys.argv[1]).predict({'image': [b'x']})['class_id'][0])",
         info.model_uri], cwd=project, capture_output=True, text=True, check=True)
    assert shadowed.stdout.strip() == "0"


def test_the_scorer_imports_none_of_the_project():
    loaded = subprocess.run(
        [sys.executable, "-c", "import json, sys, tasks.services.tracking.score_model\n"
         "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('ddae_core', 'tasks', 'flows'))))"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(loaded) == ["tasks", "tasks.services", "tasks.services.tracking",
                                  "tasks.services.tracking.score_model"]


# ---------------------------------------------------------------------------------------------
# Requirements


def test_requirements_pin_every_module_the_classifier_imports_at_load():
    modules = imported_at_load()
    assert {"torch", "numpy", "mlflow"} <= modules  # the derivation sees the obvious ones
    requirements = list(model_requirements())
    check_pinned(requirements, modules)
    assert all("==" in line and "+" not in line for line in requirements), requirements
    torch_pin = next(line for line in requirements if line.startswith("torch=="))
    assert torch_pin == f"torch=={metadata.version('torch').split('+')[0]}"


def test_the_logged_model_code_is_the_pyfunc_module():
    """register logs the pyfunc model from its file: that path must be the module tests import."""
    import tasks.services.tracking.pyfunc_model as pyfunc_model

    assert register.CLASSIFIER_CODE.resolve() == Path(pyfunc_model.__file__).resolve()


# ---------------------------------------------------------------------------------------------
# The model card


def test_the_stage_logs_a_model_card_and_the_confusion_matrix_with_the_version(tmp_path, monkeypatch):
    """The register stage on a tiny project; the card and PNG are read back from the version's run."""
    from ddae_core.config import PipelineConfig
    from tasks.services.tracking.model_card import CARD_FILE

    from served_model import build_project

    paths = build_project(tmp_path / "project")
    (paths.root / "ddae_core").symlink_to(REPO / "ddae_core")  # the model's code_paths, as in the repository
    evaluate = {"label_efficiency": {"ddae": {"10%": 0.625, "100%": 0.75}}, "labels": {"10%": 3, "100%": 9}}
    (paths.metrics / "evaluate.json").write_text(json.dumps(evaluate))
    probe_metrics = json.loads((paths.metrics / "probe.json").read_text())
    probe_metrics["novelty"] = {"method": "mahalanobis", "threshold": 35.7, "false_alarm": 0.05, "val_rows": 9,
                                "val_false_alarm": 0.0, "test_false_alarm": 0.25}
    (paths.metrics / "probe.json").write_text(json.dumps(probe_metrics))
    for key in ("MLFLOW_TRACKING_URI", "DDAE_PIPELINE_RUN_ID", "DVC_EXP_BASELINE_REV", "DVC_EXP_NAME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # scoring in-process never happens, but loading prepends
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        decision = register.run(PipelineConfig(), paths)
        client = mlflow.MlflowClient()
        version = client.get_model_version(NAME, str(decision["version"]))
        names = {a.path for a in client.list_artifacts(version.run_id)}
        assert {CARD_FILE, "confusion.png"} <= names
        card = Path(client.download_artifacts(version.run_id, CARD_FILE, str(tmp_path / "dl"))).read_text()
        png = Path(client.download_artifacts(version.run_id, "confusion.png", str(tmp_path / "dl"))).read_bytes()
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    probe = json.loads((paths.metrics / "probe.json").read_text())
    manifest = json.loads((paths.prepared / "manifest.json").read_text())
    assert png == (paths.plots / "probe" / "confusion.png").read_bytes()
    assert f"{NAME} version {decision['version']}" in card
    assert f"test accuracy: {100 * probe['test_acc']:.2f}%" in card
    assert f"balanced accuracy, the mean recall over classes: {100 * probe['test_balanced_acc']:.2f}%" in card
    assert manifest["checksum"] in card and f"{100 * decision['test_acc']:.2f}%" in card
    assert "trained from scratch by the pretrain stage" in card and "mid.res1" in card
    assert "| ddae | 62.50% | 75.00% |" in card  # label efficiency from metrics/evaluate.json
    selective = probe["selective"]
    assert f"below **{selective['suggested_threshold']:.3f}**" in card
    assert f"accepts {100 * selective['test_coverage']:.2f}% of the images" in card
    assert "## Novelty threshold" in card and "above **35.7**" in card and "9 validation images" in card
    assert "25.00% on test" in card
    assert "## Known limits" in card and "a, b, c" in card and "32x32" in card
