"""End-to-end: profiles are params.yaml, and DVC says so.

A profile applied with ``ddae profile`` shows in ``dvc params diff``, a ``dvc exp run -S`` of one of
its keys takes effect, and ``-S profile=...`` is refused naming the key. (One run at a time, on the
session's project: test_pipeline_e2e.py.) Everything runs in tmp directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import e2e_helpers as h

pytestmark = pytest.mark.slow


def tiny_params(tmp_path: Path) -> dict:
    """TINY_PARAMS, cut further (6 steps), on Fashion-MNIST when installed, else a generated image folder."""
    params = {**h.TINY_PARAMS, "pretrain.train.steps": 6, "pretrain.train.checkpoint_every": 3,
              "pretrain.train.warmup_steps": 2, "data.max_train": 300, "data.max_test": 100,
              "probe.l2_grid": [0.001], "label_efficiency.fractions": [1.0], "diagnostics.pairs": 0}
    if not h.fashion_mnist_available():
        source = h.make_image_tree(tmp_path / "shapes", per_class=30)
        params.update({"data.dataset": "imagefolder", "data.source": str(source), "data.channels": 3,
                       "data.max_train": 0, "data.max_test": 0, "pretrain.train.batch_size": 16})
    return params


def profile_for_test(tmp_path: Path) -> dict:
    """A profile of our own: the tiny settings, nested as a profile file holds them."""
    nested: dict = {}
    for key, value in tiny_params(tmp_path).items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return nested


def test_a_profile_shows_in_dvc_and_its_keys_take_dvc_exp_run_overrides(tmp_path):
    root = h.copy_project(tmp_path / "project")
    profile = profile_for_test(tmp_path)
    (root / "profiles" / "tiny-e2e.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    h.git(root, "add", "-A")
    h.git(root, "commit", "-q", "-m", "a tiny profile")

    applied = h.run([h.tool("ddae"), "profile", "tiny-e2e"], root, timeout=120)
    assert applied.returncode == 0, applied.stdout[-3000:]
    diff = h.dvc(root, "params", "diff", "--json")
    assert diff.returncode == 0, diff.stdout[-3000:]
    changed = json.loads(diff.stdout[diff.stdout.index("{"):])["params.yaml"]
    head = yaml.safe_load(h.git(root, "show", "HEAD:params.yaml"))
    expected = {key: value for key, value in tiny_params(tmp_path).items() if value != _get(head, key)}
    shown = lambda value: str(value) if isinstance(value, list) else value  # noqa: E731 (DVC prints lists as text)
    assert {key: changed[key]["new"] for key in expected} == {k: shown(v) for k, v in expected.items()}
    assert all(changed[key]["old"] == shown(_get(head, key)) for key in expected)

    # a key the profile set, overridden by DVC: the stage runs with DVC's value
    fraction = {"fashion-mnist": 200, "imagefolder": 60}[profile["data"].get("dataset", "fashion-mnist")]
    run = h.dvc(root, "exp", "run", "-S", f"data.max_train={fraction}", "prepare", timeout=300)
    assert run.returncode == 0, run.stdout[-4000:]
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == fraction
    assert manifest["config"]["max_train"] == fraction

    # selecting a profile by key is refused, naming it: by DVC (no such param) ...
    before = (root / "params.yaml").read_bytes()
    refused = h.dvc(root, "exp", "run", "-S", "profile=cifar10-ddpm", "prepare", timeout=300)
    assert refused.returncode != 0 and "Could not override 'profile'" in refused.stdout, refused.stdout[-3000:]
    assert (root / "params.yaml").read_bytes() == before
    # ... and, forced in with +, by every stage, saying how to apply a profile
    forced = h.dvc(root, "exp", "run", "-S", "+profile=cifar10-ddpm", "prepare", timeout=300)
    assert forced.returncode != 0, forced.stdout[-3000:]
    assert "params.yaml: profile: 'cifar10-ddpm'" in forced.stdout, forced.stdout[-3000:]
    assert "`ddae profile cifar10-ddpm`" in forced.stdout and "`dvc exp run`" in forced.stdout
    assert json.loads((root / "data/prepared/manifest.json").read_text()) == manifest  # nothing re-prepared


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data
