"""Helpers for the end-to-end pipeline tests: a tiny copy of the project, its environment, tools.

Nothing here runs in the working tree: ``copy_project`` makes a fresh git repository under a tmp
directory, and every subprocess gets an environment that keeps MLflow, Prefect and DVC inside it
(tracking store, Prefect home) and off the network.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# What a pipeline checkout needs (README, tests and scripts are not part of a run).
PROJECT_ITEMS = ("ddae_core", "tasks", "flows", "dvc.yaml", "params.yaml", ".dvc", ".dvcignore",
                 "prefect.yaml", ".gitignore", "profiles")
STAGES = ("prepare", "pretrain", "extract", "probe", "finetune", "evaluate", "register")

# The tiny profile: every stage runs for real, in well under a minute on two cores.
TINY_PARAMS: dict[str, Any] = {
    "data.image_size": 32,
    "data.max_train": 600,
    "data.max_test": 200,
    "pretrain.network.name": "ddpm-tiny",
    "pretrain.train.steps": 20,
    "pretrain.train.batch_size": 32,
    "pretrain.train.checkpoint_every": 10,
    "pretrain.train.warmup_steps": 5,
    "pretrain.train.mixed_precision": "no",
    "pretrain.samples.count": 4,
    "pretrain.samples.steps": 5,
    "extract.taps": ["mid.res1", "dec.16x16.res0"],
    "extract.pools": [1, 2],
    "probe.concat": [["mid.res1", "out_1"]],  # a paper alias (out_1 = dec.16x16.res0): resolved end to end
    "probe.max_iter": 50,
}


def imagefolder_params(source: Path, **extra) -> dict[str, Any]:
    """TINY_PARAMS on a generated image folder (or archive) at ``source``."""
    return {**TINY_PARAMS, "data.dataset": "imagefolder", "data.source": str(source), "data.channels": 3,
            "data.max_train": 0, "data.max_test": 0, "pretrain.train.batch_size": 16, **extra}


@dataclass
class Project:
    """The tiny project after its first ``dvc repro`` (the ``pipeline`` fixture of test_pipeline_e2e.py)."""

    root: Path
    dataset: str
    repro: Any  # CompletedProcess of the first `dvc repro`
    seconds: float

    @property
    def env(self) -> dict[str, str]:
        return project_env(self.root)


def fashion_mnist_available() -> bool:
    """The Debian package dataset-fashion-mnist is installed (plain or gzipped IDX files).

    ``DDAE_E2E_NO_FASHION_MNIST=1`` pretends it is not, to exercise the image-folder fallback.
    """
    if os.environ.get("DDAE_E2E_NO_FASHION_MNIST"):
        return False
    return all((FASHION_MNIST / name).is_file() or (FASHION_MNIST / f"{name}.gz").is_file()
               for name in FASHION_MNIST_FILES)


def tool(name: str) -> str:
    """A console script of the interpreter running the tests (dvc, prefect, mlflow, ddae)."""
    path = BIN / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install the project with its dependencies in this venv")
    return str(path)


def _ignore_junk(_directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in ("__pycache__", "tmp", "cache") or n.endswith(".pyc")}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=e2e", "-c", "user.email=e2e@example.invalid",
                           "-c", "commit.gpgsign=false", *args],
                          cwd=root, check=True, capture_output=True, text=True).stdout


def copy_project(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the pipeline into ``dest`` (a new git repository, committed), with params overridden."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in PROJECT_ITEMS:
        source = REPO / item
        if source.is_dir():
            shutil.copytree(source, dest / item, ignore=_ignore_junk)
        elif source.is_file():
            shutil.copy2(source, dest / item)
    if params:
        set_params(dest, params)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "e2e fixture")
    return dest


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def set_params(root: Path, changes: dict[str, Any]) -> None:
    """Write ``changes`` (dotted keys) into root/params.yaml, without validating them."""
    path = root / "params.yaml"
    data = yaml.safe_load(path.read_text()) or {}
    for key, value in changes.items():
        set_dotted(data, key, value)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def project_env(root: Path, **extra: str) -> dict[str, str]:
    """The environment every tool runs in: state under ``root``, the copy's code first, offline, bytecode on."""
    env = dict(os.environ)
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONPATH": str(root),  # the copy's tasks/flows/ddae_core win over the editable install
        "PWD": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PREFECT_HOME": str(root.parent / f"{root.name}-prefect-home"),
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "e2e", "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
        "GIT_COMMITTER_NAME": "e2e", "GIT_COMMITTER_EMAIL": "e2e@example.invalid",
    })
    # PYTHONDONTWRITEBYTECODE: a user's Python writes __pycache__/ into the copy, and DVC must not care.
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "DDAE_PIPELINE_RUN_ID", "DDAE_REPO", "PYTHONDONTWRITEBYTECODE"):
        env.pop(key, None)
    env.update(extra)
    return env


def run(args: list[str], root: Path, *, env: dict[str, str] | None = None, timeout: float = 300,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in the project; stdout and stderr merged into ``.stdout``."""
    return subprocess.run(args, cwd=cwd or root, env=env or project_env(root), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def dvc(root: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run([tool("dvc"), *args], root, env=env, timeout=timeout)


def stage_python(root: Path, stage: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"tasks.{stage}"], root, timeout=timeout)


def skipped_stages(output: str) -> set[str]:
    """Stages DVC reported as unchanged in a ``dvc repro`` log."""
    found = set()
    for line in output.splitlines():
        if "didn't change, skipping" in line:
            for stage in STAGES:
                if f"'{stage}'" in line:
                    found.add(stage)
    return found


def ran_stages(output: str) -> set[str]:
    """Stages DVC reported running (``Running stage 'x':``) in a ``dvc repro`` log."""
    return {s for s in STAGES if f"Running stage '{s}'" in output}


def tree_snapshot(root: Path, *relative: str) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of every file under the given paths: equal snapshots = nothing rewritten."""
    snap = {}
    for rel in relative:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for path in files:
            stat = path.stat()
            snap[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size)
    return snap


# ---------------------------------------------------------------------------------------------
# Generated image-folder datasets (no download, no Debian package)

def _pattern(kind: int, index: int, size: int = 16) -> np.ndarray:
    """A small RGB image of class ``kind``: stripes, a checkerboard or a disc, jittered per index."""
    rng = np.random.default_rng(1000 * kind + index)
    y, x = np.mgrid[0:size, 0:size]
    shift = int(rng.integers(0, 4))
    if kind == 0:
        base = ((x + shift) // 2 % 2) * 200          # vertical stripes
    elif kind == 1:
        base = (((x + shift) // 4 + (y // 4)) % 2) * 200   # a checkerboard
    else:
        cy, cx = 8 + rng.integers(-2, 3), 8 + rng.integers(-2, 3)
        base = (((y - cy) ** 2 + (x - cx) ** 2) < 20) * 220   # a disc
    noise = rng.integers(0, 30, size=(size, size))
    gray = np.clip(base + noise, 0, 255).astype(np.uint8)
    return np.stack([gray, np.roll(gray, 1, axis=1), gray // 2 + 60], axis=-1)


CLASSES = ("checks", "disc", "stripes")  # sorted, as the reader orders class folders
_KIND = {"stripes": 0, "checks": 1, "disc": 2}


def make_image_tree(root: Path, per_class: int = 40, corrupt: str | None = None, start: int = 0) -> Path:
    """``root/<class>/<i>.png`` for 3 classes, i from ``start``; ``corrupt`` = a broken .png to add."""
    from PIL import Image

    for name in CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            Image.fromarray(_pattern(_KIND[name], i)).save(folder / f"{i:03d}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return root


def zip_tree(tree: Path, archive: Path) -> Path:
    """Zip ``tree`` under one top folder (as archives usually are)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*")):
            if path.is_file():
                zf.write(path, Path(tree.name) / path.relative_to(tree))
    return archive


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# Background services (Prefect server and worker), each in its own process group

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """A long-running subprocess in its own session/process group, logging to a file."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")
        self.process = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM then SIGKILL to the whole process group (workers may ignore SIGTERM)."""
        pgid = self.process.pid  # start_new_session: the group id is the leader's pid
        if self.process.poll() is None:
            self._signal_and_wait(pgid, signal.SIGTERM, grace)
        self._signal_and_wait(pgid, signal.SIGKILL, grace)  # whatever the group still holds (flow-run children)
        self._log.close()

    def _signal_and_wait(self, pgid: int, sig: signal.Signals, grace: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)


def wait_healthy(url: str, service: Service, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"server exited with {service.process.returncode}:\n{service.log()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health not healthy after {timeout} s:\n{service.log()[-4000:]}")


def api(url: str, path: str, body: dict | None = None, method: str | None = None) -> Any:
    """A JSON call to the Prefect REST API on loopback."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}{path}", data=data, method=method or ("POST" if data else "GET"),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"null")


def make_loose_images(folder: Path, count: int, corrupt: str | None = None, start: int = 0) -> list[Path]:
    """``count`` PNGs of the three generated classes, straight in ``folder`` (for batch inference)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"img-{i:05d}.png"
        Image.fromarray(_pattern(i % 3, i)).save(path)
        paths.append(path)
    if corrupt:
        (folder / corrupt).write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return paths


@contextlib.contextmanager
def prefect_server(root: Path, logs: Path):
    """A Prefect server on a free loopback port for the project at ``root``; yields (api url, env)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = project_env(root, PREFECT_API_URL=url)
    server = Service([tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                     cwd=root, env=env, log=logs / "server.log")
    try:
        wait_healthy(url, server)
        yield url, env
    finally:
        server.stop()
