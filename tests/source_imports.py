"""What the project's source imports: top-level module names per file, and what the registered model loads."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def imported_at_load() -> set[str]:
    """Top-level third-party modules the classifier's own code imports when MLflow loads it.

    Loads what ``DDAEClassifierModel.load_context`` loads in a fresh interpreter, then reads the
    import statements of every project module that got loaded, keeping the names that were imported.
    """
    script = textwrap.dedent("""
        import json, sys
        import tasks.services.tracking.pyfunc_model
        from ddae_core.classifier import Classifier
        project = {name: module.__file__ for name, module in sys.modules.items()
                   if name.split('.')[0] in ('ddae_core', 'tasks') and getattr(module, '__file__', None)}
        print(json.dumps({"project": project, "loaded": sorted(sys.modules)}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                                    check=True).stdout)
    names = set().union(*(imported_roots(Path(path)) for path in out["project"].values()))
    loaded = set(out["loaded"])
    return {n for n in names - set(sys.stdlib_module_names) - {"ddae_core", "tasks"} if n in loaded}


def check_pinned(requirements: list[str], modules: set[str]) -> None:
    """Each module's distribution is pinned ``==`` the version installed here (public part)."""
    pins = dict(line.split("==", 1) for line in requirements if "==" in line)
    distributions = metadata.packages_distributions()
    for module in sorted(modules):
        candidates = distributions.get(module, [])
        pinned = [d for d in candidates if d.lower() in {p.lower() for p in pins}]
        assert pinned, f"{module} (from {candidates}) is imported when the model loads but not pinned: {requirements}"
        for dist in pinned:
            pin = next(v for p, v in pins.items() if p.lower() == dist.lower())
            assert pin == metadata.version(dist).split("+")[0], (dist, pin)
