"""Scale-out back-ends end to end: the pretrain stage on two processes, logging to an MLflow server.

The server keeps runs in its own SQLite store and artifacts in a separate artifact store (as in
production, where the store is S3/GCS); the stage knows only ``MLFLOW_TRACKING_URI``. Loopback only.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest

import e2e_helpers as h

pytestmark = pytest.mark.slow


def _pretrain_runs(url: str) -> list[dict]:
    """The server's pretrain runs, oldest first, through its REST API."""
    experiment = h.api(url, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=ddae")["experiment"]
    found = h.api(url, "/api/2.0/mlflow/runs/search", {
        "experiment_ids": [experiment["experiment_id"]], "filter": "tags.`ddae.stage` = 'pretrain'",
        "order_by": ["attributes.start_time ASC"],
    })  # fmt: skip
    return found.get("runs", [])


def test_two_process_pretrain_logs_once_to_an_mlflow_server_and_one_process_resumes(tmp_path):
    tree = h.make_image_tree(tmp_path / "images", per_class=20)
    params = {**h.TINY_PARAMS, "data.dataset": "imagefolder", "data.source": str(tree), "data.channels": 3,
              "data.max_train": 0, "data.max_test": 0, "pretrain.train.steps": 6, "pretrain.train.batch_size": 8,
              "pretrain.train.checkpoint_every": 3, "pretrain.train.log_every": 3,
              "pretrain.monitor.every": 3}  # fmt: skip  # scored at the checkpoints: the main process scores
    root = h.copy_project(tmp_path / "project", params)
    port = h.free_port()
    url = f"http://127.0.0.1:{port}"
    artifact_store = tmp_path / "artifact-store"
    server = h.Service([h.tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                        "--artifacts-destination", str(artifact_store)],
                       cwd=tmp_path, env=h.project_env(root), log=tmp_path / "mlflow-server.log")  # fmt: skip
    try:
        # CPU DDP over gloo: `--cpu` alone would start one process, so --multi_gpu with ACCELERATE_USE_CPU
        env = h.project_env(root, MLFLOW_TRACKING_URI=url, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
        local = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'prepare.db'}"}
        prepare = h.run([sys.executable, "-m", "tasks.prepare"], root, env=local)  # while the server starts
        assert prepare.returncode == 0, prepare.stdout[-3000:]
        h.wait_healthy(url, server)
        two = h.run([h.tool("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
                     "-m", "tasks.pretrain"], root, env=env)  # fmt: skip
        assert two.returncode == 0, two.stdout[-5000:]
        assert json.loads((root / "metrics" / "pretrain.json").read_text())["steps"] == 6
        (fingerprint,) = (root / "outputs" / "checkpoints").iterdir()
        run_dir = fingerprint / "checkpoints"
        assert sorted(p.name for p in run_dir.iterdir()) == ["step-00000003", "step-00000006"]
        assert json.loads((run_dir / "step-00000006" / "state.json").read_text())["num_processes"] == 2

        shutil.rmtree(run_dir / "step-00000006")  # as if the machine died after step 3
        one = h.run([sys.executable, "-m", "tasks.pretrain"], root, env=env)  # one process, same global batch
        assert one.returncode == 0, one.stdout[-5000:]
        assert "(step 3)" in one.stdout and "resuming from" in one.stdout, one.stdout[-3000:]
        assert json.loads((run_dir / "step-00000006" / "state.json").read_text())["num_processes"] == 1
        points = json.loads((fingerprint / "monitor.json").read_text())["points"]
        assert [p["step"] for p in points] == [3, 6]  # step 3's point kept from the two-process run, 6 rescored
        assert "monitor at step 3" not in one.stdout and "monitor at step 6" in one.stdout

        runs = _pretrain_runs(url)
        processes = [{p["key"]: p["value"] for p in r["data"]["params"]}["processes"] for r in runs]
        assert processes == ["2", "1"]  # one run per launch: only the main process logs
        assert all(r["info"]["artifact_uri"].startswith("mlflow-artifacts:") for r in runs)  # proxied by the server
        logged = sorted(p.name for p in artifact_store.rglob("*.png"))
        assert logged == ["loss.png", "loss.png", "monitor.png", "monitor.png", "samples.png", "samples.png"]
        in_project = sorted(p.relative_to(root).as_posix() for p in root.rglob("loss.png"))
        assert in_project == ["outputs/pretrain/loss.png"]  # the logged copies went to the store only
        assert not (root / "mlflow.db").exists()
    finally:
        server.stop()
