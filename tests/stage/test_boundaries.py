"""The layering rule: ddae_core imports none of Prefect, MLflow or DVC; tasks never import flows."""

import ast
import subprocess
import sys
from pathlib import Path

from source_imports import imported_roots

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_CORE = {"prefect", "mlflow", "dvc"}


def test_core_sources_import_no_orchestration_stack():
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & (FORBIDDEN_IN_CORE | {"tasks", "flows"}))
        for path in (ROOT / "ddae_core").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_tasks_do_not_import_flows():
    offenders = [str(p) for p in (ROOT / "tasks").rglob("*.py") if "flows" in imported_roots(p)]
    assert offenders == []


def test_importing_core_loads_no_orchestration_module():
    code = (
        "import sys, ddae_core, ddae_core.training.loop, ddae_core.features, ddae_core.heads.probe, ddae_core.data, "
        "ddae_core.classifier, ddae_core.nn.describe; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'mlflow', 'dvc'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_tasks_holds_the_stages_and_nothing_else():
    """The folder shows the pipeline: tasks/<stage>.py per dvc.yaml stage, every helper in tasks/services/."""
    import yaml

    stages = set(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    modules = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
    assert modules == stages
    assert {p.name for p in (ROOT / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__"} == {"services"}


def test_stages_do_not_import_each_other():
    stages = {p.stem for p in (ROOT / "tasks").glob("*.py")} - {"__init__"}
    offenders = {}
    for path in (ROOT / "tasks").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        names |= {f"tasks.{alias.name}" for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom) and node.module == "tasks" for alias in node.names}
        hits = sorted(name for name in names if name.split(".")[:1] == ["tasks"] and name.count(".") == 1
                      and name.split(".")[1] in stages and name != f"tasks.{path.stem}")
        if hits:
            offenders[str(path.relative_to(ROOT))] = hits
    assert offenders == {}
