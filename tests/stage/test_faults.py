"""Rows of the fault table in docs/reliability.md that no other test covers: each asserts the message
the user sees and that no output was lost or corrupted."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ddae_core.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    load_network,
    load_training_state,
    network_hash,
    save_network,
    save_training_state,
)
from ddae_core.config import DiffusionConfig
from ddae_core.diffusion import build_denoiser
from ddae_core.nn import build_unet
from ddae_core.readout import Readout
from ddae_core.training.ema import EMA
from tasks.services.outputs.feature_store import FeatureStoreError, part_path, read_split, write_part
from tasks.services.tracking.runs import TrackingUnavailable, configure

import e2e_helpers as h

REPO = Path(__file__).resolve().parents[2]


def training_objects(width: int = 128, seed: int = 0):
    """A model, its EMA, optimizer and scheduler after one step (big enough to hit a small size limit)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, width), nn.Linear(width, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(2, width)).sum().backward()
    optimizer.step()
    scheduler.step()
    return dict(model=model, ema=EMA(model), optimizer=optimizer, lr_scheduler=scheduler)


@contextlib.contextmanager
def disk_full_after(nbytes: int):
    """Writes past ``nbytes`` into any file fail with an OSError, as on a disk that fills mid-file."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_while_writing_a_checkpoint_keeps_the_earlier_ones(tmp_path):
    state = training_objects()
    save_training_state(tmp_path, 10, meta={}, keep_last=1, **state)
    with disk_full_after(16_000), pytest.raises(CheckpointError) as info:
        save_training_state(tmp_path, 20, meta={}, keep_last=1, **state)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'step-00000020'}: cannot write the checkpoint (")
    assert message.endswith("earlier checkpoints are kept, free space and rerun")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000010"]  # no temp dir, nothing rotated away
    fresh = training_objects(seed=1)
    assert load_training_state(latest_checkpoint(tmp_path), **fresh)["step"] == 10
    assert torch.equal(fresh["model"][0].weight, state["model"][0].weight)


def test_disk_full_while_saving_the_network_keeps_the_previous_network(tmp_path):
    diffusion = DiffusionConfig()
    old = build_denoiser(diffusion, build_unet("ddpm-tiny", in_channels=1, resolution=16))
    save_network(tmp_path / "network", old, {"diffusion": diffusion})
    before = network_hash(tmp_path / "network")
    new = build_denoiser(diffusion, build_unet("ddpm-tiny", in_channels=1, resolution=16))
    with disk_full_after(100_000), pytest.raises(CheckpointError, match="cannot write the network .*the previous one is kept"):
        save_network(tmp_path / "network", new, {"diffusion": diffusion})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["network"]
    assert network_hash(tmp_path / "network") == before
    load_network(tmp_path / "network")


def test_checkpoint_of_another_network_config_is_refused_naming_the_file(tmp_path):
    save_training_state(tmp_path, 5, meta={}, keep_last=1, **training_objects(width=128))
    other = training_objects(width=64)
    with pytest.raises(CheckpointError) as info:
        load_training_state(tmp_path / "step-00000005", **other)
    assert str(info.value).startswith(f"{tmp_path / 'step-00000005' / 'model.safetensors'}: weights do not fit the network")
    assert "size mismatch" in str(info.value)


class _Payload:
    """Unpickling this runs code: what a hostile optimizer.pt would carry."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_code_payload_in_a_checkpoint_is_never_executed(tmp_path):
    state = training_objects()
    save_training_state(tmp_path, 1, meta={}, keep_last=5, **state)
    save_training_state(tmp_path, 2, meta={}, keep_last=5, **state)
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(str(marker)), "lr_scheduler": {}}, tmp_path / "step-00000002" / "optimizer.pt")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"  # the tampered one is skipped
    with pytest.raises(CheckpointError, match=r"step-00000002/optimizer.pt: cannot read \(Weights only load failed"):
        load_training_state(tmp_path / "step-00000002", **training_objects())
    assert not marker.exists()


def test_sources_load_nothing_with_pickle():
    """torch.load only with weights_only=True; no pickle, no np.load(allow_pickle=True) in the package."""
    offenders = []
    for path in sorted(p for d in ("ddae_core", "tasks", "flows") for p in (REPO / d).rglob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        if re.search(r"^\s*(import pickle|from pickle|import cloudpickle|import joblib)", text, re.M):
            offenders.append(f"{path.name}: imports a pickle module")
        if "allow_pickle=True" in text:
            offenders.append(f"{path.name}: allow_pickle=True")
    assert offenders == []
    assert "torch.load(" in (REPO / "ddae_core" / "checkpoint.py").read_text()  # the scan sees the real call


def test_servers_in_the_readme_bind_to_loopback():
    """Local servers listen on loopback only; the shared tracking server on a private address, never all."""
    lines = [line for line in (REPO / "README.md").read_text().splitlines()
             if re.search(r"(prefect server start|mlflow (ui|server)|mlflow models serve)", line)]
    assert lines, "the README no longer starts any server"
    for line in lines:
        host = re.search(r"--host (\S+)", line)
        assert host, f"no --host (the default may be all interfaces): {line}"
        if "mlflow server" in line:
            assert re.fullmatch(r"127\.0\.0\.1|10(\.\d+){3}|192\.168(\.\d+){2}", host.group(1)), line
        else:
            assert host.group(1) == "127.0.0.1", line


def test_feature_file_of_another_checkpoint_is_refused_and_kept(tmp_path):
    key = Readout(("mid.res1",), 11.0, 1, seed=0)
    path = part_path(tmp_path, key, "train", 0)
    write_part(path, key, "train", 0, np.arange(4), np.zeros(4, int), np.ones((4, 3), np.float32),
               {"network_hash": "a" * 64})
    before = path.read_bytes()
    with pytest.raises(FeatureStoreError) as info:
        read_split(tmp_path, key, "train", expected_hash="b" * 64)
    assert str(info.value) == (f"{path}: computed from checkpoint {'a' * 64}, expected {'b' * 64}; "
                               "rerun the extract stage")
    assert path.read_bytes() == before
    assert read_split(tmp_path, key, "train", expected_hash="a" * 64).features.shape == (4, 3)


def test_unreachable_tracking_server_fails_after_bounded_retries(tmp_path, monkeypatch):
    uri = f"http://127.0.0.1:{h.free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with pytest.raises(TrackingUnavailable) as info:
        configure(tmp_path)
    assert str(info.value).startswith(f"MLflow tracking server {uri} unreachable after 3 attempts (")
    assert str(info.value).endswith(f"unset MLFLOW_TRACKING_URI to track in {tmp_path / 'mlflow.db'}")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"  # MLflow's own retries are bounded too
    assert list(tmp_path.iterdir()) == []


def test_register_with_unreachable_tracking_server_exits_75_and_registers_nothing(tmp_path):
    root = h.copy_project(tmp_path / "project", h.TINY_PARAMS)
    uri = f"http://127.0.0.1:{h.free_port()}"
    result = h.run([sys.executable, "-m", "tasks.register"], root,
                   env=h.project_env(root, MLFLOW_TRACKING_URI=uri), timeout=120)
    assert result.returncode == 75, result.stdout[-3000:]
    assert (f"register failed on I/O (retrying may help): MLflow tracking server {uri} unreachable after "
            "3 attempts") in result.stdout, result.stdout[-3000:]
    for made in ("metrics", "mlflow.db", "mlartifacts", "outputs"):
        assert not (root / made).exists()


def test_second_pipeline_run_on_a_locked_repo_fails_clearly_and_leaves_it_intact(tmp_path):
    """While one DVC command holds the repository lock, `dvc repro` and the flow's stage runner refuse."""
    from tasks.services.runner.dvc_stage import StageFailed, reproduce

    root = h.copy_project(tmp_path / "project", h.TINY_PARAMS)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dvc.repo import Repo\nrepo = Repo(sys.argv[1])\n"
         "with repo.lock:\n    print('locked', flush=True)\n    time.sleep(120)\n", str(root)],
        cwd=root, env=h.project_env(root), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = h.dvc(root, "repro", timeout=120)
        assert result.returncode != 0
        assert "Unable to acquire lock. Most likely another DVC process is running" in result.stdout, result.stdout
        with pytest.raises(StageFailed) as info:
            reproduce("prepare", root, env=h.project_env(root), log_line=lambda line: None)
        assert str(info.value) == ("stage 'prepare' failed with exit code 255: another DVC command holds this "
                                   "repository's lock (a second pipeline run?); wait for it to finish and rerun")
        waiter = subprocess.Popen([h.tool("dvc"), "--wait-for-lock", "status"], cwd=root, env=h.project_env(root),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(timeout=3)  # queued behind the lock rather than failing
    finally:
        holder.kill()  # like kill -9 of a running `dvc repro`
        holder.wait()
    # the killed holder's lock is released by the OS: the queued command goes on, nothing stale remains
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0 and "Unable to acquire lock" not in out, out
    for made in ("data", "outputs", "metrics", "dvc.lock", "mlflow.db"):
        assert not (root / made).exists(), f"{made} appeared while the repository was locked"


def test_each_unreadable_file_is_listed_with_its_reason_and_nothing_is_written(tmp_path):
    """Corrupt, truncated, zero-byte and non-image files in a class folder: one line each, no output."""
    from ddae_core.data import CorruptImagesError, prepare_dataset

    from image_trees import LAYOUT_FLAT, img_config, make_tree, write_bad_files

    make_tree(tmp_path / "src", LAYOUT_FLAT)
    write_bad_files(tmp_path / "src" / "dog")
    with pytest.raises(CorruptImagesError) as info:
        prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    lines = str(info.value).splitlines()
    assert lines[0] == "4 unreadable image file(s) (set data.on_corrupt: skip to leave them out):"
    assert sorted(lines[1:]) == sorted([
        "  dog/corrupt.png: UnidentifiedImageError: not an image Pillow can decode (file starts with "
        "b'\\x89PNG\\r\\n\\x1a\\n')",
        "  dog/truncated.png: OSError: image file is truncated (0 bytes not processed)",
        "  dog/empty.jpg: UnidentifiedImageError: empty file (0 bytes)",
        "  dog/notes.jpeg: UnidentifiedImageError: not an image Pillow can decode (file starts with b'this is ')",
    ])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_retried_registration_registers_nothing_twice(tmp_path, monkeypatch):
    """The register stage failed after registering (server dropped); its retry reuses that version."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.services.tracking.runs import content_key, register_once

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    (model / "probe.safetensors").write_bytes(b"weights v1")
    key = content_key([model])
    first = register_once(model.as_uri(), "m", {"ddae.kind": "probe"}, key)
    retried = register_once(model.as_uri(), "m", {"ddae.kind": "probe"}, content_key([model]))
    assert retried.version == first.version
    (model / "probe.safetensors").write_bytes(b"weights v2")  # other content: a new version
    changed = register_once(model.as_uri(), "m", {"ddae.kind": "probe"}, content_key([model]))
    assert int(changed.version) == int(first.version) + 1
    versions = MlflowClient().search_model_versions("name='m'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert MlflowClient().get_model_version("m", first.version).tags["ddae.content_key"] == key


def _metrics(path: Path) -> None:
    from ddae_core.atomic import write_json_atomic

    write_json_atomic(path, {"values": list(range(20_000))})


def _plot(path: Path) -> None:
    from ddae_core.data import save_image_grid

    save_image_grid(np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), path)


def _parquet(path: Path) -> None:
    features = np.random.default_rng(0).random((2000, 64), dtype=np.float32)
    write_part(path, Readout(("mid.res1",), 11.0, 1, seed=0), "train", 0, np.arange(2000), np.zeros(2000, int), features, {})


@pytest.mark.parametrize("write", [_metrics, _plot, _parquet], ids=["metrics-json", "png-plot", "parquet-part"])
def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path, write):
    """Disk full while replacing an output: the old file stays as it was and no temporary file remains."""
    path = tmp_path / "out" / "file"
    path.parent.mkdir()
    path.write_bytes(b"previous complete file")
    with disk_full_after(20_000), pytest.raises(OSError):
        write(path)
    assert path.read_bytes() == b"previous complete file"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file"]
    write(path)  # with space again it is replaced in one piece
    assert path.stat().st_size > 20_000
