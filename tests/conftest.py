"""Test-wide settings: quiet, offline, bytecode on, and no OpenMP spin-waiting on a busy 2-core machine;
the session's tiny pipeline project, shared by the end-to-end tests of several files."""

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for key, value in {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
}.items():
    os.environ.setdefault(key, value)
# Every subprocess writes __pycache__/ next to the code, as a user's Python does: caching tests must
# see it (this process already imported with the setting it was started with).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


import e2e_helpers as h  # noqa: E402 (after the environment above)


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory) -> dict[str, Path]:
    """A generated 3-class tree of 16x16 PNGs (40 each), the same with one corrupt file, and zips."""
    base = tmp_path_factory.mktemp("images")
    clean = h.make_image_tree(base / "shapes", per_class=40)
    broken = h.make_image_tree(base / "shapes-broken", per_class=40, corrupt="disc/broken.png")
    return {
        "clean": clean,
        "broken": broken,
        "broken_zip": h.zip_tree(broken, base / "shapes-broken.zip"),
    }


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, image_tree) -> h.Project:
    """The tiny project after one `dvc repro`: Fashion-MNIST when installed, else the generated tree.

    Built once per session: the tests of test_pipeline_e2e.py read and change it (in order), others copy it.
    """
    if h.fashion_mnist_available():
        dataset, params = "fashion-mnist", dict(h.TINY_PARAMS)
    else:
        dataset, params = "imagefolder", h.imagefolder_params(image_tree["clean"])
    root = h.copy_project(tmp_path_factory.mktemp("e2e") / "project", params)
    start = time.monotonic()
    result = h.dvc(root, "repro", timeout=600)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        pytest.fail(f"dvc repro failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return h.Project(root, dataset, result, seconds)
