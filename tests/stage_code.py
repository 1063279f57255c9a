"""The project code each DVC stage runs, derived from the source, and the stage graph of dvc.yaml.

A stage runs ``python -m <module>`` (or ``python -m <launcher> -m <module>``: every module its cmd names
after ``-m`` runs); the files it executes are that module, every project module it
imports (at module level or inside a function, followed transitively), every project module it
starts as a child ``python -m`` (a ``"-m", "pkg.mod"`` pair in an argument list: register's
``tasks.services.tracking.score_model``) with what that imports, and the package ``__init__.py`` files those run. The walk is static (an AST of every import statement) rather
than an import in a subprocess: importing ``tasks.<stage>`` does not run the imports inside functions
(``stage_main`` importing ``tasks.services.tracking.runs``), and those are the ones hand-written deps forget.
Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "ddae_core")  # the project's importable code; everything else is third-party

# Stages that use a whole code directory, not only what they import: register logs ddae_core/ as the
# MLflow model's code (``code_paths``), so every file in it is part of that stage's output.
WHOLE_DIRECTORY_DEPS = {"register": frozenset({"ddae_core"})}

_COMMAND = re.compile(r"\bpython\s+-m\s+([\w.]+)")
_MODULE = re.compile(r"(?:^|\s)-m\s+([\w.]+)")


def dvc_stages(root: Path = REPO) -> dict[str, dict]:
    """The ``stages:`` mapping of ``root/dvc.yaml``."""
    return yaml.safe_load((root / "dvc.yaml").read_text())["stages"]


def entry_modules(stage: dict) -> list[str]:
    """Every module a stage's ``cmd`` names after ``-m``: the launcher (if any), then the stage's module."""
    if not _COMMAND.search(stage["cmd"]):
        raise ValueError(f"dvc.yaml cmd {stage['cmd']!r} does not run `python -m <module>`")
    return _MODULE.findall(stage["cmd"].split("#")[0])


def entry_module(stage: dict) -> str:
    """The stage's own module: the last one its ``cmd`` names (``tasks.<stage>``, also behind a launcher)."""
    return entry_modules(stage)[-1]


def module_file(root: Path, dotted: str) -> Path | None:
    """The file a project module's import executes (``pkg/__init__.py`` or ``mod.py``); None if not ours."""
    if dotted.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*dotted.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those in ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        stack.extend(children)


def imported_modules(root: Path, path: Path) -> set[str]:
    """Dotted names of the project modules one file imports (``from pkg import sub`` names ``pkg.sub``)."""
    relative = path.relative_to(root).with_suffix("")
    package = list(relative.parts[:-1])  # the package a relative import starts from (level 1)
    found: set[str] = set()
    for node in _import_nodes(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = node.module.split(".") if node.module else []
        if node.level:
            base = package[: len(package) - node.level + 1] + base
        module = ".".join(base)
        found.add(module)
        found.update(f"{module}.{alias.name}" for alias in node.names if alias.name != "*")
    return {name for name in found if module_file(root, name) is not None}


def launched_modules(root: Path, path: Path) -> set[str]:
    """Project modules one file starts in a child process: ``"-m", "pkg.mod"`` in a list or tuple."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.List, ast.Tuple)):
            values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
            found.update(name for flag, name in zip(values, values[1:]) if flag == "-m" and isinstance(name, str))
    return {name for name in found if module_file(root, name) is not None}


def _with_parents(dotted: str) -> list[str]:
    """``a.b.c`` -> ``a``, ``a.b``, ``a.b.c``: importing a submodule first runs its packages."""
    parts = dotted.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _code_files(root: Path, module: str) -> frozenset[str]:
    seen: set[str] = set()
    todo = _with_parents(module)
    while todo:
        name = todo.pop()
        if name in seen or module_file(root, name) is None:
            continue
        seen.add(name)
        path = module_file(root, name)
        for imported in imported_modules(root, path) | launched_modules(root, path):
            todo.extend(_with_parents(imported))
    return frozenset(module_file(root, name).relative_to(root).as_posix() for name in seen)


def code_files(module: str, root: Path = REPO) -> frozenset[str]:
    """Repository-relative paths of every project file that running ``python -m module`` executes."""
    return _code_files(root.resolve(), module)


def stage_code(stage: str, root: Path = REPO) -> frozenset[str]:
    """The project files a dvc.yaml stage runs (its entry modules and all they import)."""
    return frozenset().union(*(code_files(module, root) for module in entry_modules(dvc_stages(root)[stage])))


def is_code_path(dep: str) -> bool:
    return dep.split("/")[0] in PACKAGES


# ---------------------------------------------------------------------------------------------
# The stage graph, from deps and outs


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or ()]


def outputs(stage: dict) -> list[str]:
    """Every path a stage writes (outs, metrics and plots that are outputs)."""
    return [p for key in ("outs", "metrics", "plots") for p in _paths(stage.get(key))]


def _overlaps(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def downstream(stages: dict[str, dict], names: set[str]) -> set[str]:
    """``names`` and every stage that depends, directly or not, on one of their outputs."""
    result = set(names)
    changed = True
    while changed:
        changed = False
        written = [out for name in result for out in outputs(stages[name])]
        for name, stage in stages.items():
            if name not in result and any(_overlaps(dep, out) for dep in _paths(stage.get("deps"))
                                          for out in written):
                result.add(name)
                changed = True
    return result


# ---------------------------------------------------------------------------------------------
# Rewriting dvc.yaml's code deps from the imports (`python tests/stage_code.py --write`)

_DEP_LINE = re.compile(r"^(\s+- )([\w./-]+)(\s*#.*)?$")


def _canonical(path: str) -> tuple[int, str]:
    """dvc.yaml's order of code deps: tasks/ first, then ddae_core/, each sorted."""
    return (0 if path.startswith("tasks/") else 1, path)


def _dep_lines(lines: list[str], stages: dict) -> list[tuple[int, str, re.Match]]:
    """(line index, stage, match) of every ``- path`` line inside a stage's ``deps:`` list."""
    found, stage, in_deps = [], None, False
    for index, line in enumerate(lines):
        header = re.match(r"^  ([\w-]+):\s*(#.*)?$", line)
        if header and header.group(1) in stages:
            stage, in_deps = header.group(1), False
        elif stage and re.match(r"^    deps:\s*$", line):
            in_deps = True
        elif stage and re.match(r"^    \w", line):
            in_deps = False
        elif in_deps and (match := _DEP_LINE.match(line)):
            found.append((index, stage, match))
    return found


def rewrite_code_deps(text: str, root: Path = REPO) -> str:
    """``text`` (dvc.yaml) with each stage's code-file deps replaced by the files the stage runs.

    Other deps, comments on kept lines and whole-folder deps stay; files under a whole-folder dep are
    not listed. The derived lines take the place of the stage's first code-file dep.
    """
    stages = yaml.safe_load(text)["stages"]
    lines = text.splitlines(keepends=True)
    code = [(i, stage, m) for i, stage, m in _dep_lines(lines, stages)
            if is_code_path(m.group(2)) and not (root / m.group(2)).is_dir()]
    comments = {(stage, m.group(2)): m.group(3) or "" for _, stage, m in code}
    replaced: dict[int, str] = {i: "" for i, _, _ in code}
    for stage in dict.fromkeys(stage for _, stage, _ in code):
        first, _, match = next(entry for entry in code if entry[1] == stage)
        folders = {d for d in _paths(stages[stage].get("deps")) if is_code_path(d) and (root / d).is_dir()}
        runs = [f for f in stage_code(stage, root) if not any(f.startswith(d + "/") for d in folders)]
        replaced[first] = "".join(f"{match.group(1)}{path}{comments.get((stage, path), '')}\n"
                                  for path in sorted(runs, key=_canonical))
    return "".join(replaced.get(i, line) for i, line in enumerate(lines))


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Check or rewrite dvc.yaml's code deps from the imports.")
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml in place (else: exit 1 if stale)")
    args = parser.parse_args(argv)
    path = REPO / "dvc.yaml"
    text = path.read_text()
    new = rewrite_code_deps(text)
    if args.write:
        path.write_text(new)
    elif new != text:
        print(f"{path}: code deps are stale; run python tests/stage_code.py --write")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
