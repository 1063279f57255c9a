"""End-to-end tests: the real pipeline (DVC, Prefect, MLflow) on a tiny copy of the project.

One copy (the ``pipeline`` fixture) runs ``dvc repro`` once (one to three minutes on two cores); the
tests after it read its outputs, drive a real Prefect server and worker over it, and check the model
registry. Tests in this file run in order (on one pytest-xdist worker: ``--dist loadfile``) and share
that copy: the ones that change it (registry gate, params change) come last among its users and leave
it consistent for the next.

Everything runs on loopback, in tmp directories: nothing touches the working tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.services.params.editing import flatten
from tasks.services.params.overrides import overridden_params
from tasks.services.runner.run_lock import recorded_holder

import e2e_helpers as h
import stage_code as sc
from e2e_helpers import imagefolder_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, image_tree) -> h.Project:
    """The tiny project after one `dvc repro`: Fashion-MNIST when installed, else the generated tree.

    Built once: the tests below read and change it, in order.
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


# ---------------------------------------------------------------------------------------------
# 0. One run at a time, on a copy of the finished project: what a run uses is params.yaml, and MLflow
#    says so. Two `ddae run --set`: the second fails at once (or, with --wait, queues) and never
#    touches params.yaml while the first runs; each finished run's MLflow parent run records exactly
#    the params its pretrain stage logged.


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


# ---------------------------------------------------------------------------------------------
# 1. dvc repro: outputs, no-op rerun


def test_fashion_mnist_is_what_the_pipeline_ran_on(pipeline):
    if pipeline.dataset != "fashion-mnist":
        pytest.skip(f"Fashion-MNIST IDX files not in {h.FASHION_MNIST} (Debian package dataset-fashion-mnist); "
                    "the pipeline tests ran on a generated image folder instead")
    manifest = json.loads((pipeline.root / "data/prepared/manifest.json").read_text())
    assert manifest["dataset"] == "fashion-mnist"
    assert len(manifest["class_names"]) == 10
    assert manifest["splits"]["train"] + manifest["splits"]["val"] == 600
    assert manifest["splits"]["test"] == 200


def test_repro_writes_every_output(pipeline):
    root = pipeline.root
    assert h.ran_stages(pipeline.repro.stdout) == set(h.STAGES), pipeline.repro.stdout[-3000:]
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert sum(manifest["splits"].values()) > 0
    assert (root / "outputs/pretrain/network/network.safetensors").stat().st_size > 0
    for png in ("outputs/pretrain/loss.png", "outputs/pretrain/samples.png",
                "plots/probe/heatmap_pool1.png", "plots/probe/heatmap_pool2.png", "plots/probe/confusion.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    probe = json.loads((root / "metrics/probe.json").read_text())
    chance = 1.0 / len(manifest["class_names"])
    assert 0.0 <= probe["test_acc"] <= 1.0 and 0.0 <= probe["test_balanced_acc"] <= 1.0
    per_class = (root / "plots/probe/per_class.csv").read_text().strip().splitlines()[1:]
    assert [row.split(",")[0] for row in per_class] == manifest["class_names"]
    assert sum(int(row.split(",")[1]) for row in per_class) == manifest["splits"]["test"]
    assert probe["test_acc"] > chance + 0.1, f"probe no better than chance: {probe}"

    table = (root / "plots/probe/table.csv").read_text().strip().splitlines()
    assert table[0].split(",")[:3] == ["candidate", "taps", "level"]
    assert len(table) - 1 == probe["candidates"] == 6  # 2 taps + 1 concat, x 2 pools
    candidates = [line.split(",")[0] for line in table[1:]]
    assert "mid.res1+dec.16x16.res0@11/p1" in candidates  # probe.concat's alias out_1, as its block

    register = json.loads((root / "metrics/register.json").read_text())
    assert register["model"] == "ddae-classifier"
    assert register["promoted"] is True and register["version"] == 1


def test_features_are_partitioned_parquet_with_checkpoint_hash(pipeline):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ddae_core.checkpoint import network_hash

    root = pipeline.root
    features = root / "outputs/features"
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    expected_hash = network_hash(root / "outputs/pretrain/network")
    keys = [(tap, pool) for tap in ("mid.res1", "dec.16x16.res0") for pool in (1, 2)]
    total = 0
    for tap, pool in keys:
        directory = features / f"tap={tap}" / "level=11" / f"pool={pool}"
        assert directory.is_dir(), sorted(str(p.relative_to(features)) for p in features.rglob("*"))
        for split, count in manifest["splits"].items():
            path = directory / f"{split}-copy0.parquet"
            schema = pq.read_schema(path)
            assert schema.names == ["sample_id", "split", "label", "tap", "level", "pool", "copy", "feature"]
            feature = schema.field("feature").type
            assert pa.types.is_fixed_size_list(feature) and feature.value_type == pa.float32(), feature
            meta = json.loads(schema.metadata[b"ddae"])
            assert meta["network_hash"] == expected_hash
            assert meta["data_checksum"] == manifest["checksum"]
            table = pq.read_table(path)
            assert table.num_rows == count
            assert set(table.column("tap").to_pylist()) == {tap}
            assert set(table.column("pool").to_pylist()) == {pool}
            assert set(table.column("split").to_pylist()) == {split}
            ids = np.load(root / "data/prepared" / split / "sample_ids.npy")
            assert np.array_equal(table.column("sample_id").to_numpy(), ids)
            total += table.num_rows
    parts = list(features.rglob("*.parquet"))
    assert len(parts) == len(keys) * 3
    assert total == sum(manifest["splits"].values()) * len(keys)  # images x keys


def test_label_efficiency_and_diagnostics_reuse_the_probe(pipeline):
    from ddae_core.sampling import fraction_label, subset_size

    root = pipeline.root
    assert json.loads((root / "metrics/finetune.json").read_text()) == {"enabled": False}
    assert json.loads((root / "outputs/finetune/status.json").read_text()) == {"enabled": False}
    probe = json.loads((root / "metrics/probe.json").read_text())
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    metrics = json.loads((root / "metrics/evaluate.json").read_text())
    table = metrics["label_efficiency"]
    assert set(table) == {"ddae_probe", "ddae_knn", "raw_pixels"}
    train, classes = manifest["splits"]["train"], len(manifest["class_names"])
    # under one label per class a fraction is skipped (Fashion-MNIST's 540 train images: 1% is 5 for 10 classes)
    shares = {fraction_label(f): round(f * train) for f in (0.01, 0.1)}
    assert metrics["skipped_fractions"] == {name: n for name, n in shares.items() if n < classes}
    ran = {name: subset_size(train, f, classes) for name, f in (("1%", 0.01), ("10%", 0.1), ("100%", 1.0))
           if name not in metrics["skipped_fractions"]}
    assert metrics["labels"] == ran and "10%" in ran and ran["100%"] == train
    for method in table.values():
        assert set(method) == set(ran) and all(0.0 <= v <= 1.0 for v in method.values())
    assert table["ddae_probe"]["100%"] == probe["test_acc"]  # the probe stage's own fit, not redone
    assert table["raw_pixels"]["100%"] == probe["raw_pixels_test_acc"]
    assert set(metrics["diagnostics"]) == {"mid.res1@11/p1", "dec.16x16.res0@11/p1"}
    for row in metrics["diagnostics"].values():
        assert 0.0 <= row["alignment"] <= 4.0 and row["uniformity"] <= 0.0 and 0.0 <= row["knn_test_acc"] <= 1.0
    markdown = (root / "plots/evaluate/label_efficiency.md").read_text()
    assert "| DDAE, linear probe |" in markdown and "| raw pixels, linear probe |" in markdown
    assert f"{100 * probe['test_acc']:.2f}%" in markdown
    assert (root / "plots/evaluate/label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _dvc_json(root: Path, *args: str):
    """Run a DVC command with ``--json``; its parsed output (anything logged before the JSON skipped)."""
    result = h.dvc(root, *args, "--json")
    assert result.returncode == 0, result.stdout[-3000:]
    start = min(i for i in (result.stdout.find("{"), result.stdout.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(result.stdout[start:])[0]


def test_dvc_metrics_show_reads_the_json_metrics(pipeline):
    root = pipeline.root
    probe = json.loads((root / "metrics/probe.json").read_text())
    shown = h.dvc(root, "metrics", "show")
    assert shown.returncode == 0, shown.stdout[-3000:]
    assert "failed to load" not in shown.stdout.lower(), shown.stdout[-3000:]
    header, *rows = shown.stdout.strip().splitlines()
    assert "test_acc" in header.split()
    [probe_row] = [row for row in rows if row.startswith("metrics/probe.json")]
    assert str(round(probe["test_acc"], 5)) in probe_row.split(), probe_row  # rounded to DVC's 5 decimals

    [(_rev, workspace)] = _dvc_json(root, "metrics", "show").items()
    files = workspace["data"]
    assert set(files) == {"metrics/pretrain.json", "metrics/probe.json", "metrics/finetune.json",
                          "metrics/evaluate.json"}  # JSON only; register.json is a decision, not a metric
    assert all("error" not in result for result in files.values()), files
    assert files["metrics/probe.json"]["data"]["test_acc"] == probe["test_acc"]
    assert files["metrics/pretrain.json"]["data"] == json.loads((root / "metrics/pretrain.json").read_text())


def test_dvc_plots_show_draws_every_curve(pipeline, tmp_path):
    root = pipeline.root
    shown = _dvc_json(root, "plots", "show", "-o", str(tmp_path / "json"))
    assert "errors" not in shown, shown.get("errors")
    plots = shown["data"]

    def drawn(name: str, x: str, y: str) -> list[dict]:
        [plot] = plots[name]
        assert plot["type"] == "vega" and plot["revisions"] == ["workspace"], plot
        spec = json.dumps({key: value for key, value in plot["content"].items() if key != "data"})
        assert f'"field": "{x}"' in spec and f'"field": "{y}"' in spec, spec
        return plot["content"]["data"]["values"]

    # the loss curve: one point per logged window, the last one the loss metrics/pretrain.json reports
    train = yaml.safe_load((root / "params.yaml").read_text())["pretrain"]["train"]
    loss = drawn("outputs/pretrain/loss.csv", "step", "loss")
    assert [int(p["step"]) for p in loss] == list(range(train["log_every"], train["steps"] + 1, train["log_every"]))
    final_loss = json.loads((root / "metrics/pretrain.json").read_text())["final_loss"]
    assert float(loss[-1]["loss"]) == pytest.approx(final_loss, rel=1e-5)

    # the probe monitor: its points over the run, the carried-forward step the best of them
    pretrain = json.loads((root / "metrics/pretrain.json").read_text())
    [monitor] = plots["outputs/pretrain/monitor.csv"]  # two lines: DVC draws them as (field, value) rows
    values = monitor["content"]["data"]["values"]
    assert {p["field"] for p in values} == {"linear_val_acc", "knn_val_acc"}
    points = {int(p["step"]): float(p["dvc_inferred_y_value"]) for p in values if p["field"] == "linear_val_acc"}
    assert len(points) == pretrain["monitor_points"] >= 5 and max(points) == train["steps"]
    best = max(points.values())
    assert pretrain["chosen_step"] == min(step for step, acc in points.items() if acc == best)
    assert pretrain["chosen_linear_val_acc"] == pytest.approx(best, abs=5e-5)

    # label efficiency: a line per method that ran, the cells metrics/evaluate.json holds
    table = json.loads((root / "metrics/evaluate.json").read_text())["label_efficiency"]
    efficiency = drawn("plots/evaluate/label_efficiency.csv", "labels", "test_acc")
    assert plots["plots/evaluate/label_efficiency.csv"][0]["content"]["encoding"]["color"]["field"] == "method"
    cells = {(p["method"], p["fraction"]): float(p["test_acc"]) for p in efficiency}
    expected = {(method, fraction): acc for method, row in table.items() for fraction, acc in row.items()}
    assert cells == pytest.approx(expected, abs=5e-5)

    # selective classification: accuracy against coverage, ending at full coverage = the test accuracy
    probe = json.loads((root / "metrics/probe.json").read_text())
    selective = drawn("plots/probe/selective.csv", "coverage", "accuracy")
    assert float(selective[-1]["coverage"]) == 1.0
    assert float(selective[-1]["accuracy"]) == pytest.approx(probe["test_acc"], abs=1e-3)
    assert len(drawn("plots/probe/table.csv", "val_acc", "candidate")) == probe["candidates"]
    confusion = drawn("plots/probe/confusion.csv", "predicted", "actual")  # one point per test image
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert len(confusion) == manifest["splits"]["test"]
    assert sum(p["actual"] == p["predicted"] for p in confusion) / len(confusion) == pytest.approx(probe["test_acc"])
    assert [p["class"] for p in drawn("plots/probe/per_class.csv", "recall", "class")] == manifest["class_names"]

    assert plots["plots/probe/roc.csv"] == []  # the anomaly mode's table: declared, written empty, no error
    images = {name: items for name, items in plots.items() if items and items[0]["type"] == "image"}
    assert set(images) == {"outputs/pretrain/loss.png", "outputs/pretrain/monitor.png", "outputs/pretrain/samples.png",
                           "plots/probe/selective.png",
                           "plots/probe/heatmap_pool1.png", "plots/probe/heatmap_pool2.png",
                           "plots/probe/confusion.png", "plots/evaluate/label_efficiency.png"}
    for name, [image] in images.items():
        assert Path(image["url"]).read_bytes() == (root / name).read_bytes(), name

    html = h.dvc(root, "plots", "show", "-o", str(tmp_path / "html"))  # the page a user opens
    assert html.returncode == 0 and "failed to load" not in html.stdout.lower(), html.stdout[-3000:]
    assert (tmp_path / "html" / "index.html").is_file()


def test_dvc_exp_show_lists_params_and_headline_metrics(pipeline):
    root = pipeline.root
    rows = _dvc_json(root, "exp", "show")
    [workspace] = [row["data"] for row in rows if row["rev"] == "workspace"]
    params = workspace["params"]["params.yaml"]["data"]
    assert params == yaml.safe_load((root / "params.yaml").read_text())
    assert params["pretrain"]["train"]["steps"] == h.TINY_PARAMS["pretrain.train.steps"]
    metrics = workspace["metrics"]
    assert set(metrics) == {"metrics/pretrain.json", "metrics/probe.json", "metrics/finetune.json",
                            "metrics/evaluate.json"}
    probe = json.loads((root / "metrics/probe.json").read_text())
    assert metrics["metrics/probe.json"]["data"]["test_acc"] == probe["test_acc"]
    assert metrics["metrics/probe.json"]["data"]["raw_pixels_test_acc"] == probe["raw_pixels_test_acc"]


def test_second_repro_reruns_nothing(pipeline):
    root = pipeline.root
    watched = ("data", "outputs/pretrain", "outputs/features", "outputs/probe", "metrics")
    before, lock = h.tree_snapshot(root, *watched), (root / "dvc.lock").read_text()
    result = h.dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:]
    assert h.skipped_stages(result.stdout) == set(h.STAGES), result.stdout
    assert h.ran_stages(result.stdout) == set()
    assert h.tree_snapshot(root, *watched) == before
    assert (root / "dvc.lock").read_text() == lock  # rewritten by DVC (snapshot always runs), unchanged


# One process edits each project file in turn and asks DVC's Python API what is stale: each stage's
# status (stale when more than "always changed"), and the plan `dvc repro --downstream` makes from the
# stale stages (them and their descendants); each file is restored before the next. One Repo, lock
# held throughout: a `dvc status` process per file would spend most of its time starting. Only .py
# files are edited, so DVC's parse of params.yaml (most of each status call) is reused while the
# file's size, mtime and inode stay the same; any change to it is read afresh.
_EDIT_EACH_FILE = """
import copy, json, sys
from pathlib import Path
import dvc.dependency.param as dvc_param
from dvc.repo import Repo
from dvc.repo.reproduce import get_active_graph, plan_repro

read_param_file, parsed = dvc_param.read_param_file, {}

def read_unchanged_once(fs, path, *args, **kwargs):
    info = fs.info(path)
    key = (path, info.get("size"), info.get("mtime"), info.get("inode"), repr(args), repr(sorted(kwargs.items())))
    if key not in parsed:
        parsed[key] = read_param_file(fs, path, *args, **kwargs)
    return copy.deepcopy(parsed[key])

dvc_param.read_param_file = read_unchanged_once

root, report = Path(sys.argv[1]), {}
with Repo(str(root)) as repo, repo.lock:
    stages, graph = repo.index.stages, get_active_graph(repo.index.graph)

    def stale():
        return [s for s in stages if [why for why in s.status().get(s.addressing, []) if why != "always changed"]]

    for rel in json.loads(sys.argv[2]):
        path = root / rel
        original = path.read_bytes()
        path.write_bytes(original + b"\\n# an edit: DVC hashes content, so a bare touch would change nothing\\n")
        try:
            targets = stale()
        finally:
            path.write_bytes(original)
        rerun = plan_repro(graph, targets, downstream=True) if targets else []
        report[rel] = {"stale": sorted(s.addressing for s in targets), "rerun": sorted(s.addressing for s in rerun)}
print(json.dumps(report))
"""


def _dvc_status(root: Path) -> dict:
    status = h.dvc(root, "status", "--json")
    assert status.returncode == 0, status.stdout[-3000:]
    return json.loads(status.stdout[status.stdout.index("{"):])


def test_stale_stages_are_exactly_those_that_run_the_edited_file(pipeline):
    """Bytecode changes nothing; an edited project file makes stale exactly the stages that import it.

    DVC's status lists a stage whose own deps changed; its descendants rerun after it when its outputs
    change (DVC's repro plan): both sets must be what the imports and dvc.yaml's graph say.
    """
    root = pipeline.root
    assert h.dvc(root, "repro").returncode == 0
    assert _dvc_status(root) == {"snapshot": ["always changed"]}  # nothing else to rerun

    caches = [root / "ddae_core" / "__pycache__", root / "tasks" / "__pycache__"]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    imported = h.run([sys.executable, "-c", "import ddae_core, tasks.probe"], root)
    assert imported.returncode == 0, imported.stdout[-3000:]
    assert all(any(cache.glob("*.pyc")) for cache in caches)  # bytecode really was written
    assert _dvc_status(root) == {"snapshot": ["always changed"]}  # importing wrote bytecode; no dep changed

    stages = sc.dvc_stages(root)
    runs = {name: sc.stage_code(name, root) for name in stages}
    files = sorted(p.relative_to(root).as_posix() for package in sc.PACKAGES for p in (root / package).rglob("*.py")
                   if "__pycache__" not in p.parts)
    assert set().union(*runs.values()) < set(files)  # every imported module, and some no stage imports
    result = h.run([sys.executable, "-c", _EDIT_EACH_FILE, str(root), json.dumps(files)], root, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    wrong = []
    for rel in files:
        importers = {name for name in stages if rel in runs[name]
                     or any(rel.startswith(f"{folder}/") for folder in sc.WHOLE_DIRECTORY_DEPS.get(name, ()))}
        expected = {"stale": sorted(importers), "rerun": sorted(sc.downstream(stages, importers))}
        if report[rel] != expected:
            wrong.append(f"{rel}: expected {expected}, DVC says {report[rel]}")
    assert not wrong, "\n".join(wrong)
    assert _dvc_status(root) == {"snapshot": ["always changed"]}  # every file restored: nothing to rerun


def test_finetune_enabled_runs_cached_and_registers_a_second_flavour(pipeline, tmp_path):
    """On a copy of the finished project: fine-tuning adds its cells to the table and a tagged version."""
    from mlflow import MlflowClient

    root = tmp_path / "project"
    shutil.copytree(pipeline.root, root, symlinks=True)
    for store in ("mlflow.db", "mlartifacts"):  # a fresh registry, so the copy never writes into the original
        path = root / store
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    h.set_params(root, {"finetune.enabled": True, "finetune.max_steps": 4, "finetune.eval_every": 2,
                        "finetune.val_max": 30, "finetune.test_max": 40, "finetune.batch_size": 16})
    result = h.dvc(root, "repro", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:]
    assert h.ran_stages(result.stdout) == {"finetune", "evaluate", "register"}, result.stdout[-3000:]

    finetune = json.loads((root / "metrics/finetune.json").read_text())
    cells = {(c["model"], c["fraction"]): c for c in finetune["cells"]}
    evaluated = json.loads((root / "metrics/evaluate.json").read_text())
    assert finetune["skipped_fractions"] == evaluated["skipped_fractions"]  # the same fractions as the probe's
    ran = [f for f, name in ((0.01, "1%"), (0.1, "10%"), (1.0, "100%")) if name not in finetune["skipped_fractions"]]
    assert set(cells) == {(m, f) for m in ("ddae_finetune", "scratch_finetune") for f in ran}
    assert all(c["steps"] <= 4 and 0.0 <= c["test_acc"] <= 1.0 for c in cells.values())
    assert finetune["test_images"] == 40
    table = evaluated["label_efficiency"]
    assert table["ddae_finetune"]["100%"] == cells[("ddae_finetune", 1.0)]["test_acc"]
    assert table["scratch_finetune"]["10%"] == cells[("scratch_finetune", 0.1)]["test_acc"]
    assert "| same network from scratch |" in (root / "plots/evaluate/label_efficiency.md").read_text()

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    tuned = client.get_model_version_by_alias("ddae-classifier", "finetune")
    champion = client.get_model_version_by_alias("ddae-classifier", "champion")
    assert tuned.tags["ddae.kind"] == "finetune" and champion.tags["ddae.kind"] == "probe"
    assert tuned.version != champion.version and "ddae.finetune_test_acc" in tuned.tags

    again = h.dvc(root, "repro", timeout=300)
    assert again.returncode == 0 and h.ran_stages(again.stdout) == set(), again.stdout[-3000:]


# ---------------------------------------------------------------------------------------------
# 2. Prefect: a real server, the process work pool, `prefect deploy`, a worker, a deployment run


@pytest.fixture(scope="module")
def prefect_server(pipeline, tmp_path_factory):
    """A Prefect server on a free loopback port, its own PREFECT_HOME; killed by process group."""
    logs = tmp_path_factory.mktemp("prefect-logs")
    port = h.free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = h.project_env(pipeline.root, PREFECT_API_URL=url)
    server = h.Service([h.tool("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       cwd=pipeline.root, env=env, log=logs / "server.log")
    try:
        h.wait_healthy(url, server)
        yield url, env, logs
    finally:
        server.stop()


def test_prefect_deployment_run_recomputes_nothing(pipeline, prefect_server, tmp_path_factory):
    url, env, logs = prefect_server
    root = pipeline.root
    prefect = h.tool("prefect")
    created = h.run([prefect, "--no-prompt", "work-pool", "create", "ddae-process", "--type", "process"],
                    root, env=env, timeout=120)
    assert created.returncode == 0, created.stdout[-3000:]

    # Deployed by a program whose $PWD is elsewhere (as from CI, or subprocess cwd=): the flow runs
    # must still start in this repository, i.e. the working directory of `prefect deploy`.
    elsewhere = tmp_path_factory.mktemp("not-the-repo")
    deployed = h.run([prefect, "--no-prompt", "deploy", "--all"], root, env={**env, "PWD": str(elsewhere)},
                     timeout=180)
    assert deployed.returncode == 0, deployed.stdout[-3000:]
    deployments = {d["name"]: d for d in h.api(url, "/deployments/filter", {})}
    assert set(deployments) >= {"default", "weekly-retrain"}
    entrypoints = {"default": "flows/pipeline.py:ddae_pipeline", "weekly-retrain": "flows/retrain.py:ddae_retrain",
                   "batch": "flows/predict.py:ddae_predict"}
    for name, deployment in deployments.items():
        assert deployment["entrypoint"] == entrypoints[name]
        assert deployment["work_pool_name"] == "ddae-process"
        [step] = deployment["pull_steps"]
        directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
        assert Path(directory).resolve() == root.resolve(), deployment["pull_steps"]
    schedules = deployments["weekly-retrain"]["schedules"]
    assert [s["schedule"].get("cron") for s in schedules] == ["0 3 * * 1"]
    assert schedules[0]["schedule"]["timezone"] == "UTC" and schedules[0]["active"]
    assert deployments["default"]["schedules"] == []

    watched = ("data", "outputs/pretrain", "outputs/features", "outputs/probe", "metrics")
    before, lock = h.tree_snapshot(root, *watched), (root / "dvc.lock").read_text()
    worker_dir = tmp_path_factory.mktemp("worker-cwd")
    worker_env = {**env, "PWD": str(worker_dir), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    worker = h.Service([prefect, "worker", "start", "--pool", "ddae-process"], cwd=worker_dir,
                       env=worker_env, log=logs / "worker.log")
    try:
        ran = h.run([prefect, "deployment", "run", "ddae-pipeline/default", "--watch", "--watch-timeout", "240"],
                    root, env=env, timeout=300)
    finally:
        worker.stop()
    assert ran.returncode == 0, f"{ran.stdout[-4000:]}\n--- worker log ---\n{worker.log()[-6000:]}"
    match = re.search(r"UUID: ([0-9a-f-]{36})", ran.stdout)
    assert match, ran.stdout
    flow_run = h.api(url, f"/flow_runs/{match.group(1)}")
    assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
    assert flow_run["deployment_id"] == deployments["default"]["id"]

    # The flow's summary artifact lists each stage and how DVC brought it up to date.
    artifacts = h.api(url, "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["ddae-results"]}, "flow_run_id": {"any_": [flow_run["id"]]}}})
    assert len(artifacts) == 1, artifacts
    rows = dict(re.findall(r"^\| (\w+) \| (ran|skipped|restored) \|", artifacts[0]["data"], flags=re.M))
    assert rows == {"snapshot": "ran", **{stage: "skipped" for stage in h.STAGES}}, artifacts[0]["data"]
    assert h.tree_snapshot(root, *watched) == before, "the deployment run rewrote pipeline outputs"
    assert (root / "dvc.lock").read_text() == lock


# ---------------------------------------------------------------------------------------------
# 3. The registry: champion loads and predicts from PNG files; the gate moves it only on gains


def _write_test_pngs(root: Path, directory: Path, n: int) -> tuple[list[Path], np.ndarray]:
    from ddae_core.data import load_prepared

    _manifest, splits = load_prepared(root / "data/prepared")
    test = splits["test"]
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"test-{i:03d}.png"
        path.write_bytes(h.png_bytes(np.asarray(test.images[i])))
        paths.append(path)
    return paths, np.asarray(test.labels[:n])


def _replace_file(path: Path, payload: bytes) -> None:
    """New inode (DVC may have linked the old one to its cache): write aside, then rename."""
    tmp = path.with_name(path.name + ".e2e-tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def test_registry_champion_predicts_and_gate(pipeline, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from safetensors.numpy import load_file, save_file

    import tasks.register as register
    from ddae_core.classifier import Classifier
    from tasks.services.outputs.paths import Paths
    from tasks.services.params.loading import load_params

    root = pipeline.root
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("DDAE_PIPELINE_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # loading a model prepends its code path
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "ddae-classifier"
    decision = json.loads((root / "metrics/register.json").read_text())
    champion = client.get_model_version_by_alias(name, "champion")
    assert decision["promoted"] and int(champion.version) == decision["version"]  # built from outputs/

    files, labels = _write_test_pngs(root, tmp_path / "pngs", 12)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in files]})
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    predicted = model.predict(frame)
    assert list(predicted.columns)[:4] == ["class_name", "class_id", "confidence", "probabilities"]
    assert len(predicted) == len(files)
    probs = np.array(predicted["probabilities"].tolist())
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert probs.shape == (len(files), len(manifest["class_names"]))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (predicted["class_id"].to_numpy() == probs.argmax(axis=1)).all()
    assert list(predicted["class_name"]) == [manifest["class_names"][i] for i in predicted["class_id"]]

    local = Classifier.load(root / "outputs/pretrain/network", root / "outputs/probe", manifest["preprocess"])
    local_probs = local.predict_proba([p.read_bytes() for p in files])
    assert np.allclose(probs, local_probs, atol=1e-5)
    assert np.array_equal(predicted["class_id"].to_numpy(), local_probs.argmax(axis=1))

    # A worse model (the probe zeroed: uniform probabilities) is registered but does not take over.
    paths = Paths(root)
    config = load_params(paths.params)
    probe_file = root / "outputs/probe/probe.safetensors"
    good_probe = probe_file.read_bytes()
    good_register = (root / "metrics/register.json").read_bytes()
    state = load_file(str(probe_file))
    zeroed = {k: (np.zeros_like(v) if k in ("weight", "bias") else v) for k, v in state.items()}
    try:
        save_file(zeroed, str(tmp_path / "zeroed.safetensors"))
        _replace_file(probe_file, (tmp_path / "zeroed.safetensors").read_bytes())
        worse = register.run(config, paths)
        assert worse["promoted"] is False, worse
        assert worse["test_acc"] < worse["champion_test_acc"], worse
        assert worse["champion_version"] == int(champion.version)
        assert int(client.get_model_version_by_alias(name, "champion").version) == int(champion.version)
        assert int(client.get_model_version_by_alias(name, "challenger").version) == worse["version"]
        assert json.loads((root / "metrics/register.json").read_text())["promoted"] is False
        for tagged in (str(worse["version"]), str(champion.version)):  # the decision, on both versions
            tags = client.get_model_version(name, tagged).tags
            assert float(tags["ddae.gate.challenger_test_acc"]) == pytest.approx(worse["test_acc"])
            assert float(tags["ddae.gate.champion_test_acc"]) == pytest.approx(worse["champion_test_acc"])
            assert tags["ddae.gate.champion_version"] == str(champion.version)
            assert tags["ddae.gate.promoted"] == "False" and tags["ddae.gate.data_version"] == worse["data_checksum"]

        # With that worse model as champion, the good probe registered again must take over.
        client.set_registered_model_alias(name, "champion", str(worse["version"]))
        _replace_file(probe_file, good_probe)
        better = register.run(config, paths)
        assert better["promoted"] is True, better
        assert better["champion_version"] == worse["version"]
        assert better["test_acc"] > better["champion_test_acc"]
        assert int(client.get_model_version_by_alias(name, "champion").version) == better["version"]
        for tagged in (str(better["version"]), str(worse["version"])):
            tags = client.get_model_version(name, tagged).tags
            assert tags["ddae.gate.promoted"] == "True" and tags["ddae.gate.challenger_version"] == str(better["version"])
            assert float(tags["ddae.gate.champion_test_acc"]) == pytest.approx(better["champion_test_acc"])
    finally:
        _replace_file(probe_file, good_probe)
        _replace_file(root / "metrics/register.json", good_register)


def _zeroed_probe(probe_file: Path, tmp_path: Path) -> bytes:
    """The probe with weight and bias zeroed (uniform probabilities: a model worse than any trained one)."""
    from safetensors.numpy import load_file, save_file

    state = load_file(str(probe_file))
    save_file({k: (np.zeros_like(v) if k in ("weight", "bias") else v) for k, v in state.items()},
              str(tmp_path / "zeroed.safetensors"))
    return (tmp_path / "zeroed.safetensors").read_bytes()


def test_registered_model_pins_what_its_code_imports_at_load(pipeline, monkeypatch):
    """The champion's requirements.txt, read back from the registry, pins each module its code loads."""
    import mlflow

    from source_imports import check_pinned, imported_at_load

    uri = f"sqlite:///{pipeline.root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/ddae-classifier@champion")).read_text()
    pins = [line.strip() for line in requirements.splitlines() if line.strip() and not line.startswith("#")]
    check_pinned(pins, imported_at_load())
    assert any(line.startswith("torch==") for line in pins) and any(line.startswith("tqdm==") for line in pins)


def test_experiment_registers_a_version_and_leaves_champion(pipeline, tmp_path):
    """`dvc exp run -S register.min_improvement=-1` on a copy: a new, better version; no alias moves.

    The copy's champion is a deliberately worse model (the probe zeroed), so the gate, run outside the
    experiment afterwards, promotes the experiment's version: the experiment alone would have too.
    """
    from mlflow import MlflowClient

    root = tmp_path / "project"
    shutil.copytree(pipeline.root, root, symlinks=True)
    for store in ("mlflow.db", "mlartifacts"):  # a fresh registry, so the copy never writes into the original
        path = root / store
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    probe_file = root / "outputs/probe/probe.safetensors"
    good_probe = probe_file.read_bytes()
    _replace_file(probe_file, _zeroed_probe(probe_file, tmp_path))
    worse = h.stage_python(root, "register", timeout=300)
    assert worse.returncode == 0, worse.stdout[-3000:]
    _replace_file(probe_file, good_probe)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "ddae-classifier"
    champion = str(client.get_model_version_by_alias(name, "champion").version)

    exp = h.dvc(root, "exp", "run", "-n", "gate-check", "-S", "register.min_improvement=-1", timeout=600)
    assert exp.returncode == 0, exp.stdout[-4000:]
    assert h.ran_stages(exp.stdout) == {"register"}, exp.stdout[-3000:]
    assert "inside the DVC experiment 'gate-check'" in exp.stdout, exp.stdout[-3000:]
    decision = json.loads((root / "metrics/register.json").read_text())
    assert decision["experiment"]["name"] == "gate-check" and decision["promoted"] is False, decision
    assert "experiments move no alias" in decision["reason"]
    new = str(decision["version"])
    assert new != champion and decision["champion_version"] == int(champion)
    assert decision["test_acc"] > decision["champion_test_acc"]  # outside an experiment it would win
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert aliases == {"champion": champion, "challenger": champion}, aliases
    tags = client.get_model_version(name, new).tags
    assert tags["ddae.gate.experiment"] == "gate-check" and tags["ddae.gate.promoted"] == "False"
    assert tags["ddae.experiment"] == "gate-check" and tags["ddae.experiment_baseline"]
    assert "ddae.gate.experiment" not in client.get_model_version(name, champion).tags

    # Outside the experiment the same model meets the gate: registered once, now promoted.
    gate = h.dvc(root, "repro", "--force", "--single-item", "register", timeout=300)
    assert gate.returncode == 0, gate.stdout[-3000:]
    after = json.loads((root / "metrics/register.json").read_text())
    assert after["version"] == int(new) and after["promoted"] is True and after["experiment"] is None, after
    assert str(client.get_model_version_by_alias(name, "champion").version) == new


# ---------------------------------------------------------------------------------------------
# 1 (continued). A params change reruns only the stages that read it


def test_probe_params_change_reruns_only_probe_and_register(pipeline):
    root = pipeline.root
    upstream = ("data", "outputs/pretrain", "outputs/features")
    before = h.tree_snapshot(root, *upstream)
    # An L2 the first run did not try: the probe (so register's input) must change. No extension, so
    # the one value is the choice.
    h.set_params(root, {"probe.l2_grid": [0.05], "probe.l2_extend": 0})
    result = h.dvc(root, "repro")
    assert result.returncode == 0, result.stdout[-3000:]
    assert h.ran_stages(result.stdout) == {"probe", "finetune", "evaluate", "register"}, result.stdout[-3000:]
    assert h.skipped_stages(result.stdout) == {"prepare", "pretrain", "extract"}
    assert h.tree_snapshot(root, *upstream) == before
    assert json.loads((root / "metrics/probe.json").read_text())["best"]["l2"] == 0.05
    status = h.dvc(root, "status")  # the snapshot stage always runs (it checksums the source)
    assert status.returncode == 0 and status.stdout.split() == ["snapshot:", "always", "changed"], status.stdout


# ---------------------------------------------------------------------------------------------
# 4. Invalid params fail before any work, naming the key


INVALID = {
    "unknown-key": ({"data.colour": "red"}, "data.colour"),
    "wrong-type": ({"pretrain.train.steps": "abc"}, "pretrain.train.steps"),
    "negative-count": ({"pretrain.samples.count": -4}, "pretrain.samples.count"),
    "unknown-tap": ({"extract.taps": ["mid.res1", "dec.99x99.res7"]}, "extract.taps[1]"),
    "unknown-network": ({"pretrain.network.name": "ddpm-huge"}, "pretrain.network.name"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_params_fail_before_any_work(case, tmp_path):
    change, key = INVALID[case]
    root = h.copy_project(tmp_path / "project", {**h.TINY_PARAMS, **change})
    stage = h.stage_python(root, "prepare", timeout=120)
    assert stage.returncode == 2, stage.stdout[-3000:]
    assert key in stage.stdout, stage.stdout[-3000:]
    repro = h.dvc(root, "repro", timeout=120)
    assert repro.returncode != 0, repro.stdout[-3000:]
    assert key in repro.stdout and "exited with 2" in repro.stdout, repro.stdout[-3000:]
    for made in ("data", "outputs", "metrics", "plots", "mlflow.db", "mlartifacts", "dvc.lock"):
        assert not (root / made).exists(), f"{made} appeared after a params error"


def test_ddae_run_rejects_bad_override_and_keeps_params(tmp_path):
    root = h.copy_project(tmp_path / "project", h.TINY_PARAMS)
    original = (root / "params.yaml").read_bytes()
    result = h.run([h.tool("ddae"), "run", "--set", "pretrain.train.steps=-1"], root, timeout=180)
    assert result.returncode == 2, result.stdout[-3000:]
    assert "pretrain.train.steps" in result.stdout, result.stdout[-3000:]
    assert (root / "params.yaml").read_bytes() == original
    for made in ("data", "outputs", "metrics", "dvc.lock"):
        assert not (root / made).exists(), f"{made} appeared after a params error"


# ---------------------------------------------------------------------------------------------
# 5. Image folders and archives through the prepare stage; corrupt files fail or are skipped


@pytest.mark.parametrize("form", ["folder", "zip"])
def test_imagefolder_corrupt_file_fails_prepare(form, image_tree, tmp_path):
    source = image_tree["broken"] if form == "folder" else image_tree["broken_zip"]
    root = h.copy_project(tmp_path / "project", imagefolder_params(source, **{"data.on_corrupt": "fail"}))
    result = h.stage_python(root, "prepare", timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "disc/broken.png" in result.stdout, result.stdout[-3000:]
    assert not (root / "data/prepared").exists()
    leftovers = [p.name for p in (root / "data").iterdir()] if (root / "data").exists() else []
    assert leftovers == [], f"half-written prepare output left behind: {leftovers}"


def test_imagefolder_zip_prepare_skips_corrupt_file(image_tree, tmp_path):
    """A generated archive through prepare, one corrupt file skipped (the stages after prepare read the
    prepared arrays, not the archive: test_operations_e2e.py runs them all on an image folder)."""
    root = h.copy_project(tmp_path / "project", imagefolder_params(image_tree["broken_zip"],
                                                                   **{"data.on_corrupt": "skip"}))
    result = h.dvc(root, "repro", "prepare", timeout=600)
    assert result.returncode == 0, result.stdout[-6000:]
    assert h.ran_stages(result.stdout) == {"prepare"}
    manifest = json.loads((root / "data/prepared/manifest.json").read_text())
    assert manifest["dataset"] == "imagefolder"
    assert manifest["class_names"] == list(h.CLASSES)
    assert [entry["path"] for entry in manifest["skipped"]] == ["disc/broken.png"]
    assert manifest["skipped"][0]["error"]
    assert sum(manifest["splits"].values()) == 3 * 40
    assert manifest["shape"] == [32, 32, 3]


# ---------------------------------------------------------------------------------------------
# 6. A DVC remote and the run-cache: a second machine reuses what the first one computed


def test_second_clone_with_the_remote_and_run_cache_skips_every_stage(pipeline, tmp_path):
    remote, clone = tmp_path / "dvc-remote", tmp_path / "clone"
    assert h.dvc(pipeline.root, "remote", "add", "--local", "shared", str(remote)).returncode == 0
    push = h.dvc(pipeline.root, "push", "--run-cache", "-r", "shared")
    assert push.returncode == 0, push.stdout[-3000:]

    h.git(tmp_path, "clone", "-q", str(pipeline.root), str(clone))  # code only: no dvc.lock, no outputs
    shutil.copy2(pipeline.root / "params.yaml", clone / "params.yaml")  # the params the outputs were made with
    assert not (clone / "dvc.lock").exists() and not (clone / "outputs").exists()
    assert h.dvc(clone, "remote", "add", "--local", "--default", "shared", str(remote)).returncode == 0
    repro = h.dvc(clone, "repro", "--pull", timeout=300)
    assert repro.returncode == 0, repro.stdout[-4000:]
    assert not h.ran_stages(repro.stdout), repro.stdout[-4000:]  # nothing recomputed
    restored = {s for s in h.STAGES if f"Stage '{s}' is cached - skipping run" in repro.stdout}
    assert restored == set(h.STAGES), repro.stdout[-4000:]
    for output in ("metrics/probe.json", "outputs/pretrain/network/network.safetensors"):
        assert (clone / output).read_bytes() == (pipeline.root / output).read_bytes(), output

    # A machine sharing the first one's DVC cache, driven stage by stage as `ddae run` and the flows
    # do: each stage's report says DVC restored it from the run-cache (only the snapshot checksum ran).
    from tasks.services.runner.dvc_stage import STAGES, reproduce

    other = tmp_path / "other"
    h.git(tmp_path, "clone", "-q", str(pipeline.root), str(other))
    shutil.copy2(pipeline.root / "params.yaml", other / "params.yaml")
    shared = h.dvc(other, "cache", "dir", "--local", str(pipeline.root / ".dvc" / "cache"))
    assert shared.returncode == 0, shared.stdout
    statuses = {stage: reproduce(stage, other, env=h.project_env(other), log_line=lambda _: None).status
                for stage in STAGES}
    assert statuses == {"snapshot": "ran", **{stage: "restored" for stage in h.STAGES}}, statuses
    assert (other / "metrics/probe.json").read_bytes() == (pipeline.root / "metrics/probe.json").read_bytes()

    # a profile written into params.yaml (another dataset and network): DVC sees each value it changed
    from tasks.services.params.editing import flatten

    before = flatten(yaml.safe_load((clone / "params.yaml").read_text()))
    applied = h.run([h.tool("ddae"), "profile", "cifar10-ddpm"], clone, timeout=120)
    assert applied.returncode == 0, applied.stdout[-3000:]
    after = flatten(yaml.safe_load((clone / "params.yaml").read_text()))
    changed = {key for key in {*before, *after} if before.get(key) != after.get(key)}
    status = h.dvc(clone, "status", "--json")
    assert status.returncode == 0, status.stdout[-3000:]
    stale = set(json.loads(status.stdout[status.stdout.index("{"):]))
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
    reading = {name for name, stage in stages.items()  # (finetune and register rerun after them, on new inputs)
               if any(k == p or k.startswith(f"{p}.") for p in stage.get("params", []) if isinstance(p, str)
                      for k in changed)}
    assert stale == reading | {"snapshot"}, stale  # snapshot is always changed
    assert {"prepare", "pretrain", "extract", "probe"} <= stale

