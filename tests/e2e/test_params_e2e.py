"""End-to-end: what a run uses is params.yaml, one run at a time, and MLflow and DVC say so.

Two ``ddae run --set`` on a copy of the session's tiny project: the second fails at once (or, with
``--wait``, queues) and never touches params.yaml while the first runs; each finished run's MLflow
parent run records exactly the params its pretrain stage logged. A profile applied with ``ddae
profile`` shows in ``dvc params diff``, a ``dvc exp run -S`` of one of its keys takes effect, and
``-S profile=...`` is refused naming the key. Everything runs in tmp directories on loopback.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tasks.services.params.editing import flatten
from tasks.services.params.overrides import overridden_params
from tasks.services.runner.run_lock import recorded_holder

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


def wait_for(condition, what: str, timeout: float = 300.0, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)
    return result


def start(root: Path, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """``ddae run ARGS`` in the background, with its own Prefect home and log file."""
    log = root.parent / f"{name}.log"
    env = h.project_env(root, PREFECT_HOME=str(root.parent / f"prefect-{name}"),
                        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # two servers on busy cores
    process = subprocess.Popen([h.tool("ddae"), "run", *args], cwd=root, env=env, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    return process, log


def runs_of(root: Path) -> tuple[object, list]:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("ddae")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def finished_copy(pipeline, tmp_path: Path) -> Path:
    """A committed copy of the session's finished project, params.yaml written the way ddae writes it.

    Its values are the ones its outputs were made with, so every stage is up to date; a fresh MLflow
    store and no run-lock record, so what the test reads is its own runs' doing.
    """
    root = tmp_path / "project"
    shutil.copytree(pipeline.root, root, symlinks=True)
    for store in ("mlflow.db", "mlartifacts", ".dvc/tmp/ddae-run.lock"):
        path = root / store
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    values = flatten(yaml.safe_load((root / "params.yaml").read_text()))
    shutil.copy2(h.REPO / "params.yaml", root / "params.yaml")  # the commented file, then the same values
    overridden_params(root / "params.yaml", values, write=True)
    assert flatten(yaml.safe_load((root / "params.yaml").read_text())) == values  # nothing for DVC to rerun
    h.git(root, "commit", "-q", "-am", "params as ddae writes them")
    return root


def stage_report(log: Path) -> dict[str, str]:
    """Stage -> ran/skipped/restored, from the table ``ddae run`` prints when it finishes."""
    return dict(re.findall(r"^(\w+) +(ran|skipped|restored)\b", log.read_text(errors="replace"), flags=re.M))


def test_two_runs_at_once_never_mix_params(pipeline, tmp_path):
    # Each run overrides checkpoint_every: a pretrain param, so pretrain reruns and logs it, training
    # afresh (the checkpoint fingerprint changes) from the same seeded weights, to the same outputs.
    root = finished_copy(pipeline, tmp_path)
    comments = [line for line in (root / "params.yaml").read_text().splitlines() if "#" in line]
    first, first_log = start(root, "first", "--set", "pretrain.train.checkpoint_every=5")
    waiter = None
    try:
        # the first run holds the repository and has written its override
        holder = wait_for(lambda: recorded_holder(root), "the first run to take the lock")
        assert holder.pid == first.pid and "pretrain.train.checkpoint_every=5" in holder.command
        wait_for(lambda: "checkpoint_every: 5" in (root / "params.yaml").read_text() or first.poll() is not None,
                 "the first run's override")
        assert first.poll() is None, first_log.read_text()[-6000:]
        before = (root / "params.yaml").read_bytes()

        refused = h.run([h.tool("ddae"), "run", "--set", "pretrain.train.checkpoint_every=4"], root, timeout=120)
        assert refused.returncode == 75, refused.stdout[-3000:]
        assert re.search(rf"error: another pipeline run holds .*\(pid {first.pid}, since "
                         rf".*pretrain.train.checkpoint_every=5\)", refused.stdout), refused.stdout[-3000:]
        assert (root / "params.yaml").read_bytes() == before  # the refused run wrote nothing
        assert first.poll() is None

        waiter, waiter_log = start(root, "waiter", "--wait", "--set", "pretrain.train.checkpoint_every=2")
        wait_for(lambda: "waiting for the pipeline run holding" in waiter_log.read_text(errors="replace")
                 or waiter.poll() is not None, "the queued run to say it waits")
        assert f"pid {first.pid}" in waiter_log.read_text(), waiter_log.read_text()[-3000:]
        assert first.wait(timeout=900) == 0, first_log.read_text()[-6000:]
        assert waiter.wait(timeout=900) == 0, waiter_log.read_text()[-6000:]
    finally:
        for process in (first, waiter):
            if process is not None and process.poll() is None:
                process.kill()

    # pretrain ran in each; its outputs came out the same, so DVC skipped every stage after it
    expected = {"snapshot": "ran", "prepare": "skipped", "pretrain": "ran",
                **{stage: "skipped" for stage in ("extract", "probe", "finetune", "evaluate", "register")}}
    assert [stage_report(first_log), stage_report(waiter_log)] == [expected, expected], waiter_log.read_text()[-3000:]
    written = (root / "params.yaml").read_text()
    assert yaml.safe_load(written)["pretrain"]["train"]["checkpoint_every"] == 2  # the last finished run's override
    assert [line for line in written.splitlines() if "#" in line] == comments  # every comment kept
    client, runs = runs_of(root)
    parents = sorted((r for r in runs if r.data.tags.get("ddae.stage") == "pipeline"), key=lambda r: r.info.start_time)
    assert [p.data.params["pretrain.train.checkpoint_every"] for p in parents] == ["5", "2"]
    assert [json.loads(p.data.tags["ddae.overrides"]) for p in parents] == [{"pretrain.train.checkpoint_every": 5},
                                                                         {"pretrain.train.checkpoint_every": 2}]
    assert parents[0].info.end_time <= parents[1].info.start_time  # one after the other, never overlapping
    for parent in parents:
        [pretrain] = [r for r in runs if r.data.tags.get("ddae.pipeline_run") == parent.info.run_id
                      and r.data.tags["ddae.stage"] == "pretrain"]  # a pretrain param changed: each run trained
        compared = {}  # every param pretrain logged that params.yaml holds too: the same value
        for key, value in pretrain.data.params.items():
            if f"pretrain.{key}" in parent.data.params:
                compared[key] = value
                assert parent.data.params[f"pretrain.{key}"] == value, key
        assert {"train.checkpoint_every", "train.lr", "train.steps", "train.batch_size",
                "diffusion.framework"} <= set(compared), compared


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
