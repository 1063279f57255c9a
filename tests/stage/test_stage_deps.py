"""dvc.yaml's code deps are exactly the project files each stage runs (derived from its imports)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stage_code as sc

STAGES = sc.dvc_stages()


def _covered(path: str, folders: set[str]) -> bool:
    return any(path.startswith(folder.rstrip("/") + "/") for folder in folders)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_exactly_the_code_the_stage_runs(stage):
    declared = [dep for dep in STAGES[stage].get("deps", []) if sc.is_code_path(dep)]
    for dep in declared:
        assert (sc.REPO / dep).exists(), f"stage {stage}: dvc.yaml dep {dep} does not exist"
    folders = {dep for dep in declared if (sc.REPO / dep).is_dir()}
    allowed = sc.WHOLE_DIRECTORY_DEPS.get(stage, frozenset())
    assert folders <= allowed, (f"stage {stage}: dvc.yaml depends on the folder(s) {sorted(folders - allowed)}; "
                                "list the files the stage imports instead")
    assert allowed <= folders, f"stage {stage}: dvc.yaml must depend on the whole folder(s) {sorted(allowed - folders)}"

    runs = sc.stage_code(stage)
    missing = sorted(f for f in runs if f not in declared and not _covered(f, folders))
    extra = sorted(set(declared) - runs - folders)
    assert not missing, f"stage {stage}: dvc.yaml misses code the stage imports: {missing}"
    assert not extra, f"stage {stage}: dvc.yaml lists code the stage never imports: {extra}"


def test_register_still_logs_the_folder_it_depends_on_whole():
    """The one folder dep is there because the model's code_paths is that folder: keep them together."""
    source = (sc.REPO / "tasks/register.py").read_text()
    for folder in sc.WHOLE_DIRECTORY_DEPS["register"]:
        assert f'"{folder}"' in source and "code_paths" in source


def test_the_derivation_sees_lazy_imports_and_packages_and_not_everything():
    probe = sc.stage_code("probe")
    # module level (plots, selective), inside functions (tracking: stage_main; probe_online: the online
    # probe) and the packages' __init__ files every import runs first
    assert {"tasks/probe.py", "tasks/services/outputs/plots.py", "tasks/services/outputs/selective.py",
            "tasks/services/tracking/runs.py", "tasks/services/runner/stage_main.py", "tasks/__init__.py",
            "tasks/services/__init__.py", "tasks/services/outputs/__init__.py", "ddae_core/__init__.py",
            "ddae_core/heads/probe_online.py", "ddae_core/nn/__init__.py", "ddae_core/nn/unet.py"} <= probe
    assert "tasks/services/outputs/feature_store.py" in sc.stage_code("evaluate") & sc.stage_code("finetune")
    assert "tasks/services/tracking/pyfunc_model.py" in sc.stage_code("register")  # imported inside log_classifier
    every = set().union(*(sc.stage_code(s) for s in STAGES))
    assert not every & {"tasks/services/serving/predict.py", "tasks/services/serving/embed.py",
                        "tasks/services/runner/prefect_tasks.py", "ddae_core/nn/describe.py",
                        "tasks/services/params/profiles.py", "tasks/services/params/editing.py",
                        "tasks/services/runner/run_lock.py"}  # ddae run/profile/networks only
    assert not any(path.startswith("flows/") for path in every)


def test_write_restores_a_dropped_and_removes_an_extra_code_dep_and_keeps_the_rest():
    """`python tests/stage_code.py --write` regenerates the lists (a PR that changes imports runs it)."""
    text = (sc.REPO / "dvc.yaml").read_text()
    assert sc.rewrite_code_deps(text) == text  # the committed file is what the imports give
    edited = text.replace("      - tasks/services/tracking/runs.py\n", "", 1).replace(
        "      - tasks/prepare.py\n", "      - tasks/prepare.py\n      - tasks/services/serving/embed.py\n", 1)
    assert edited != text and sc.rewrite_code_deps(edited) == text


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))


def test_imports_resolve_relative_from_and_nested_forms(tmp_path):
    _write(tmp_path, {
        "tasks/__init__.py": "",
        "tasks/entry.py": """
            from typing import TYPE_CHECKING
            import numpy
            from . import sibling
            from .helpers import name_not_a_module
            if TYPE_CHECKING:
                import tasks.only_for_types
            def later():
                from ddae_core.sub import leaf
            """,
        "tasks/sibling.py": "",
        "tasks/helpers.py": "name_not_a_module = 1\n",
        "tasks/only_for_types.py": "",
        "tasks/unused.py": "",
        "ddae_core/__init__.py": "",
        "ddae_core/sub/__init__.py": "from .inner import thing\n",
        "ddae_core/sub/inner.py": "from ..top import value\nthing = value\n",
        "ddae_core/sub/leaf.py": "",
        "ddae_core/top.py": "value = 1\n",
    })
    assert sc.code_files("tasks.entry", tmp_path) == {
        "tasks/__init__.py", "tasks/entry.py", "tasks/sibling.py", "tasks/helpers.py",
        "ddae_core/__init__.py", "ddae_core/sub/__init__.py", "ddae_core/sub/inner.py", "ddae_core/sub/leaf.py",
        "ddae_core/top.py",
    }


def test_the_static_walk_covers_every_module_a_stage_import_loads():
    """Cross-check against Python itself: importing each stage's module loads no project file the
    walk missed; what the walk adds on top are the imports that run inside functions."""
    modules = {stage: sc.entry_module(spec) for stage, spec in STAGES.items()}
    script = textwrap.dedent("""
        import importlib, json, sys
        from pathlib import Path
        root, found = Path(sys.argv[1]), {}
        for stage, module in json.loads(sys.argv[2]).items():
            for name in [n for n in sys.modules if n.split(".")[0] in ("tasks", "ddae_core")]:
                del sys.modules[name]  # project code imports afresh per stage; third-party stays loaded
            importlib.import_module(module)
            found[stage] = sorted({Path(m.__file__).resolve().relative_to(root).as_posix()
                                   for n, m in sys.modules.items()
                                   if n.split(".")[0] in ("tasks", "ddae_core") and getattr(m, "__file__", None)})
        print(json.dumps(found))
        """)
    result = subprocess.run([sys.executable, "-c", script, str(sc.REPO), json.dumps(modules)], cwd=sc.REPO,
                            env={**os.environ, "PYTHONPATH": str(sc.REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    for stage, files in loaded.items():
        derived = sc.stage_code(stage)
        assert set(files) <= derived, f"stage {stage}: the import walk misses {sorted(set(files) - derived)}"
        assert f"tasks/{stage}.py" in files
    assert "tasks/services/tracking/runs.py" not in loaded["snapshot"]  # only imported when stage_main runs...
    assert "tasks/services/tracking/runs.py" in sc.stage_code("snapshot")  # ...which the walk follows
