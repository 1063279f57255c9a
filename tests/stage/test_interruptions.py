"""Interruptions lose nothing: SIGKILL at seeded random points, then a rerun ends where an
uninterrupted run ends (pretrain: EMA weights; extract: every row once, same content); SIGTERM stops
cleanly; extraction split over processes equals one process row for row."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from ddae_core.checkpoint import save_network
from ddae_core.config import PipelineConfig
from ddae_core.data import load_prepared, prepare_dataset
from ddae_core.diffusion import build_denoiser, build_loss
from ddae_core.nn import build_unet
from ddae_core.training.loop import train
from tasks.extract import build_features, parts_root, plan_units
from tasks.services.outputs.feature_store import read_unit
from tasks.services.outputs.paths import Paths
from tasks.services.params.loading import load_params

import e2e_helpers as h
from toy_training import DIFFUSION, _fresh_accelerate_state, make_denoiser, make_images, resume_config  # noqa: F401

TESTS = Path(__file__).resolve().parents[1]  # toy_training.py's folder


@pytest.fixture(autouse=True)
def _one_thread():
    """In-process references and the subprocesses (OMP_NUM_THREADS=1) compute with the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kill_when(process: subprocess.Popen, ready, delay_s: float, sig: int = signal.SIGKILL,
              timeout: float = 120.0) -> None:
    """Wait until ``ready()`` holds, ``delay_s`` more, then send ``sig``; the process must still be running."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"finished before the kill point:\n{process.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    time.sleep(delay_s)
    assert process.poll() is None, "finished before the kill point"
    process.send_signal(sig)
    process.wait(timeout=60)


def kill_offsets(seed: int, most: int) -> list[int]:
    """Three seeded kill points, each as how much further (1..most) a run gets than where it started."""
    rng = random.Random(seed)
    return [rng.randint(1, most) for _ in range(3)]


# ----------------------------------------------------------------------------- pretrain

_TRAIN_SCRIPT = """
import dataclasses, json, sys
import numpy as np
sys.path.insert(0, {tests!r})
import toy_training as T
from ddae_core.diffusion import build_loss
from ddae_core.pretrained.importer import import_network
from ddae_core.training.loop import train
config = dataclasses.replace(T.resume_config({steps}), checkpoint_every=1, keep_last=2, log_every=1)
denoiser = import_network({source!r}).denoiser if {source!r} else T.make_denoiser()
result = train(denoiser, build_loss(T.DIFFUSION), np.load({images!r}, mmap_mode="r"), config,
               out_dir={out!r}, progress=False)
print("trained steps", json.dumps([h["step"] for h in result.history]))
"""


def assert_checkpoint_loads(path: Path) -> None:
    """Every file of a final-named checkpoint reads back completely."""
    for name in ("model.safetensors", "ema.safetensors"):
        assert load_file(str(path / name)), f"{path / name} is empty"
    states = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    assert {"optimizer", "lr_scheduler"} <= set(states)
    assert json.loads((path / "state.json").read_text())["step"] == int(path.name.split("-")[1])


def test_pretrain_sigkilled_three_times_resumes_to_the_uninterrupted_weights(tmp_path):
    straight, ckpt, steps = kill_three_times_and_resume(tmp_path, make_denoiser, source="")
    assert_resumed_equals(ckpt, steps, straight)


def test_adapting_an_imported_network_resumes_exactly_after_sigkills(tmp_path):
    """pretrain.init.mode: adapt trains on from a diffusers UNet2DModel: the same loop, so the same exactness."""
    from ddae_core.pretrained.importer import import_network
    from diffusers_models import save_unet, tiny_unet

    source = save_unet(tmp_path / "imported", tiny_unet(size=16, channels=1))
    straight, ckpt, steps = kill_three_times_and_resume(
        tmp_path, lambda: import_network(source).denoiser, source=str(source))
    assert "diffusers-unet" == straight.ema_denoiser.spec()["kind"]
    assert_resumed_equals(ckpt, steps, straight)


def kill_three_times_and_resume(tmp_path: Path, make, source: str, steps: int = 16):
    """Train ``make()`` straight in-process; then in subprocesses SIGKILLed at three seeded points and resumed.
    Returns the straight result, the killed run's checkpoint folder and the step count."""
    config = dataclasses.replace(resume_config(steps), checkpoint_every=1, keep_last=2, log_every=1)
    images = make_images(64)
    np.save(tmp_path / "images.npy", images)
    straight = train(make(), build_loss(DIFFUSION), images, config, out_dir=tmp_path / "straight", progress=False)

    out = tmp_path / "killed"
    ckpt = out / "checkpoints"
    script = _TRAIN_SCRIPT.format(tests=str(TESTS), steps=steps, images=str(tmp_path / "images.npy"), out=str(out),
                                  source=source)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(h.REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}

    def newest_step() -> int:
        done = [int(p.name[5:]) for p in ckpt.glob("step-*") if p.name[5:].isdigit()] if ckpt.is_dir() else []
        return max(done, default=0)

    rng = random.Random(7)
    for offset in kill_offsets(seed=7, most=3):  # killed 1-3 steps after its start, anywhere in a step
        mark = newest_step() + offset
        process = subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        kill_when(process, lambda: newest_step() >= mark, delay_s=rng.uniform(0.0, 0.2))
        assert process.returncode == -signal.SIGKILL
        finished = [p for p in ckpt.iterdir() if ".tmp-" not in p.name]
        assert finished, "no checkpoint survived the kill"
        for path in finished:  # a kill during a save leaves a temp name, never a broken final one
            assert_checkpoint_loads(path)

    resume_at = newest_step()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = json.loads(proc.stdout.split("trained steps ")[1])
    assert 1 < resume_at < steps and trained == list(range(resume_at + 1, steps + 1))  # resumed, not restarted
    final = sorted(p.name for p in ckpt.iterdir())
    assert final == [f"step-{steps - 1:08d}", f"step-{steps:08d}"]  # temp dirs of the killed runs are gone
    for name in final:
        assert_checkpoint_loads(ckpt / name)
    return straight, ckpt, steps


def assert_resumed_equals(ckpt: Path, steps: int, straight) -> None:
    """The killed-and-resumed run's final EMA equals the uninterrupted run's."""
    resumed = load_file(str(ckpt / f"step-{steps:08d}" / "ema.safetensors"))
    expected = straight.ema_denoiser.state_dict()
    assert resumed.keys() == expected.keys()
    for key in expected:
        assert torch.allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6), key


# ----------------------------------------------------------------------------- extract


@pytest.fixture()
def extract_project(tmp_path) -> Paths:
    """A tiny project with prepared images and a (randomly initialised) network: ready to extract."""
    tree = h.make_image_tree(tmp_path / "images", per_class=120)
    root = h.copy_project(tmp_path / "project", {
        **h.TINY_PARAMS, "data.dataset": "imagefolder", "data.source": str(tree), "data.channels": 3,
        "data.max_train": 0, "data.max_test": 0, "extract.part_rows": 6, "extract.batch_size": 6,
    })
    paths = Paths(root)
    config = load_params(paths.params)
    prepare_dataset(config.data, paths.prepared, progress=False)
    torch.manual_seed(0)
    unet = build_unet(config.pretrain.network.name, in_channels=3, resolution=32)
    save_network(paths.network, build_denoiser(config.pretrain.diffusion, unet), {"diffusion": config.pretrain.diffusion})
    return paths


def single_process_reference(paths: Paths, dest: Path) -> tuple[PipelineConfig, dict]:
    """Extract in one uninterrupted process and move the result to ``dest``: what every variant must equal."""
    config = load_params(paths.params)
    summary = build_features(config, paths)
    shutil.move(paths.features, dest)
    return config, summary


def done_summaries(log: str) -> list[dict]:
    """The summary dicts a stage logs as ``extract done: {...}`` (one per process)."""
    return [json.loads(line.split("extract done: ", 1)[1]) for line in log.splitlines() if "extract done: " in line]


def feature_files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_features(actual: Path, expected: Path) -> None:
    """Same files; per Parquet part the same ids, labels and columns in order, features allclose."""
    files, reference = feature_files(actual), feature_files(expected)
    assert files.keys() == reference.keys()
    assert json.loads(files["index.json"].read_text()) == json.loads(reference["index.json"].read_text())
    for name, path in reference.items():
        if name.endswith(".parquet"):
            got, want = pq.read_table(files[name]), pq.read_table(path)
            assert got.schema.equals(want.schema, check_metadata=True), name
            for column in ("sample_id", "label", "split", "tap", "level", "pool", "copy"):
                assert got.column(column).equals(want.column(column)), (name, column)
            a = np.stack(got.column("feature").to_numpy(zero_copy_only=False))
            b = np.stack(want.column("feature").to_numpy(zero_copy_only=False))
            assert a.shape == b.shape and np.allclose(a, b, rtol=1e-5, atol=1e-6), name


def test_extract_sigkilled_three_times_and_sigtermed_ends_with_every_row_once(extract_project, tmp_path):
    paths = extract_project
    _, reference = single_process_reference(paths, tmp_path / "reference")
    assert reference["units_reused"] == 0 and reference["units_done"] == reference["units"]
    units = reference["units"]

    def finished_units() -> list[Path]:
        return sorted(parts_root(paths).glob("*/*.parquet"))  # final names only: temp names end in .tmp-<pid>

    env = h.project_env(paths.root, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "tasks.extract"]
    rng = random.Random(11)
    for offset in kill_offsets(seed=11, most=4):  # killed 1-4 units after its start, anywhere in a unit
        mark = len(finished_units()) + offset
        process = subprocess.Popen(command, cwd=paths.root, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        kill_when(process, lambda: len(finished_units()) >= mark, delay_s=rng.uniform(0.0, 0.1))
        assert process.returncode == -signal.SIGKILL
        assert not paths.features.exists()  # nothing assembled from a partial set of units
        for path in finished_units():  # every finished unit is whole
            part = read_unit(path, key_index=3)
            start, stop = (int(x) for x in path.stem.split("-rows")[1].split("-"))
            assert len(part.sample_ids) == stop - start and part.features.shape[0] == stop - start

    process = subprocess.Popen(command, cwd=paths.root, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    mark = len(finished_units()) + 2
    kill_when(process, lambda: len(finished_units()) >= mark, delay_s=0.0, sig=signal.SIGTERM)
    log = process.stdout.read()
    assert process.returncode == 130, log[-3000:]
    assert "extract: interrupted; completed checkpoints and outputs are kept" in log
    assert not list(parts_root(paths).rglob(f"*.tmp-{process.pid}")), "SIGTERM left a temporary file or folder"
    assert not (paths.features.parent / f"features.tmp-{process.pid}").exists(), "SIGTERM left the staging folder"
    kept = len(finished_units())
    assert mark <= kept < units

    result = h.run(command, paths.root, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    summary = done_summaries(result.stdout)[0]
    assert summary["units_reused"] == kept and summary["units_done"] == units - kept
    assert summary["rows"] == reference["rows"]
    assert not parts_root(paths).exists() or not any(parts_root(paths).iterdir())
    assert not [p for p in paths.features.rglob(".*")], "temporary files in the final features"
    assert_same_features(paths.features, tmp_path / "reference")


def test_two_shards_equal_one_process_row_for_row(extract_project, tmp_path):
    paths = extract_project
    config, _ = single_process_reference(paths, tmp_path / "single")

    second = build_features(config, paths, process_index=1, num_processes=2)
    assert not paths.features.exists()  # only the main process assembles
    _, splits = load_prepared(paths.prepared)
    units = plan_units({s: len(splits[s]) for s in ("train", "val", "test")}, {"train": 1, "val": 1, "test": 1},
                       config.extract.part_rows)
    assert sorted(p.name for p in parts_root(paths).glob("*/*.parquet")) == sorted(u.file_name for u in units[1::2])
    assert second["units_done"] == len(units[1::2])
    first = build_features(config, paths, process_index=0, num_processes=2)
    assert first["units_done"] == len(units[0::2]) and first["units_reused"] == 0
    assert_same_features(paths.features, tmp_path / "single")


def test_two_processes_under_accelerate_launch_equal_one_process(extract_project, tmp_path):
    paths = extract_project
    single_process_reference(paths, tmp_path / "single")
    env = h.project_env(paths.root, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = h.run([h.tool("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tasks.extract"],
                   paths.root, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:]
    summaries = done_summaries(result.stdout)
    assert len(summaries) == 2, result.stdout[-4000:]  # both processes extracted ...
    main = [s for s in summaries if "rows" in s]
    assert len(main) == 1  # ... and one assembled
    assert sorted(s["units_done"] for s in summaries) == sorted([len(range(0, main[0]["units"], 2)),
                                                                 len(range(1, main[0]["units"], 2))])
    assert_same_features(paths.features, tmp_path / "single")
