"""Every stage and serving entry point asks ``ddae_core.devices`` for its device and logs it once.

No GPU is needed: ``pick_device`` is replaced by a spy that records each call and answers the CPU,
and ``describe_device`` names a fake GPU, so the log line reads as it would on a GPU machine while
the computation stays on the CPU. A stage that stops asking (or stops logging) fails here.
"""

from __future__ import annotations

import io
import json
import logging
import types

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file

import ddae_core.devices as devices
from ddae_core.config import PipelineConfig
from ddae_core.features import extract_all
from ddae_core.heads.probe import LinearProbe
from ddae_core.readout import Readout, Selection
from tasks import evaluate as evaluate_stage
from tasks import extract as extract_stage
from tasks import finetune as finetune_stage
from tasks import pretrain as pretrain_stage
from tasks import probe as probe_stage
from tasks.services.outputs.paths import Paths
from tasks.services.tracking import model_source
from tasks.services.tracking import score_model as score_model_module
from tasks.services.tracking.pyfunc_model import DDAEClassifierModel

from feature_store_builder import save_tiny_network, write_feature_store

FAKE = "cuda:0 (NVIDIA Fake GPU)"
READOUT = Readout(("mid.res1",), 11.0, 1, 5)
CLASSES = ("a", "b", "c")


class Stop(Exception):
    """Raised by a patched step right after the device was asked for: the rest of the stage is not the point."""


@pytest.fixture
def spy(monkeypatch, caplog):
    """Replace the one device picker; returns the list of devices it handed out."""
    handed: list[torch.device] = []

    def pick() -> torch.device:
        handed.append(torch.device("cpu"))
        return handed[-1]

    monkeypatch.setattr(devices, "pick_device", pick)
    monkeypatch.setattr(devices, "describe_device", lambda device: FAKE)
    caplog.set_level(logging.INFO, logger="ddae")
    return handed


def device_lines(caplog, label: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage() == f"{label}: device {FAKE}"]


def stop(*_args, **_kwargs):
    raise Stop


@pytest.mark.parametrize("stage, module, name, first_step", [
    ("finetune", finetune_stage, "load_selection", stop),
    ("evaluate", evaluate_stage, "FeatureIndex", types.SimpleNamespace(load=stop)),
])
def test_a_stage_asks_for_its_device_before_any_work(stage, module, name, first_step, spy, caplog, monkeypatch,
                                                     tmp_path):
    monkeypatch.setattr(module, name, first_step)
    settings = PipelineConfig.from_dict({"finetune": {"enabled": True}})
    with pytest.raises(Stop):
        module.run(settings, Paths(tmp_path))
    assert len(spy) == 1 and len(device_lines(caplog, stage)) == 1


def test_extract_asks_and_hands_the_answer_to_accelerate(spy, caplog, monkeypatch, tmp_path):
    import accelerate

    seen = {}

    def state(cpu: bool):
        seen["cpu"] = cpu
        raise Stop

    monkeypatch.setattr(accelerate, "PartialState", state)
    with pytest.raises(Stop):
        extract_stage.run(PipelineConfig(), Paths(tmp_path))
    assert len(spy) == 1 and seen == {"cpu": True} and len(device_lines(caplog, "extract")) == 1


def test_pretrain_asks_and_hands_the_answer_to_accelerate(spy, caplog, monkeypatch, tmp_path):
    import accelerate

    paths = Paths(tmp_path)
    paths.prepared.mkdir(parents=True)
    (paths.prepared / "manifest.json").write_text("{}")
    manifest = {"preprocess": {"channels": 1, "image_size": 32}, "splits": {"train": 8}, "checksum": "x"}
    train = types.SimpleNamespace(images=np.zeros((8, 32, 32, 1), np.uint8))
    monkeypatch.setattr(pretrain_stage, "load_prepared", lambda _folder: (manifest, {"train": train}))
    seen = {}

    def accelerator(mixed_precision, cpu: bool):
        seen["cpu"] = cpu
        raise Stop

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    settings = PipelineConfig.from_dict({"pretrain": {"network": {"name": "ddpm-tiny"}}})
    with pytest.raises(Stop):
        pretrain_stage.run(settings, paths)
    assert len(spy) == 1 and seen == {"cpu": True} and len(device_lines(caplog, "pretrain")) == 1


# ---------------------------------------------------------------------------------------------
# The probe stage end to end, and the served model (pyfunc, register's scorer, predict, embed)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny network, its feature store, and a probe directory the served model loads."""
    paths = Paths(tmp_path_factory.mktemp("devices"))
    denoiser = save_tiny_network(paths, resolution=32)
    rng = np.random.default_rng(0)
    ids, labels, images, features, start = {}, {}, {}, {}, 0
    for split, n in {"train": 18, "val": 9, "test": 9}.items():
        labels[split] = np.arange(n) % len(CLASSES)
        images[split] = np.clip(rng.normal(60 + 60 * labels[split][:, None, None, None], 30, (n, 32, 32, 1)),
                                0, 255).astype(np.uint8)
        ids[split] = np.arange(start, start + n)
        start += n
        features[split] = extract_all(denoiser, images[split], ids[split], taps=READOUT.taps, levels=[READOUT.level],
                                      pools=[READOUT.pool], seed=READOUT.seed, progress=False)
    metadata = write_feature_store(paths, [READOUT], ids, labels, features, CLASSES)
    dim = features["train"][READOUT.feature_keys[0]].shape[1]
    probe = LinearProbe(weight=rng.normal(size=(3, dim)).astype(np.float32), bias=np.zeros(3, np.float32),
                        mean=np.zeros(dim, np.float32), std=np.ones(dim, np.float32))
    served = paths.root / "served-probe"
    served.mkdir()
    save_file(probe.state_dict(), str(served / "probe.safetensors"))
    selection = Selection(readout=READOUT, class_names=CLASSES, level_kind="t", test_acc=0.5,
                          network_hash=metadata["network_hash"], data_checksum="data-1")
    (served / "selection.json").write_text(json.dumps(selection.to_json()))
    (paths.root / "preprocess.json").write_text(json.dumps({"channels": 1, "image_size": 32, "fit": "pad"}))
    (paths.root / "params.yaml").write_text("predict:\n  batch_size: 4\n")
    return paths, images["test"], labels["test"]


def test_the_probe_stage_fits_on_the_device_it_asked_for(project, spy, caplog, monkeypatch):
    paths, _images, _labels = project
    monkeypatch.setattr(probe_stage, "track", lambda *args: None)  # no MLflow here
    used = []
    real = probe_stage.screen_and_select
    monkeypatch.setattr(probe_stage, "screen_and_select",
                        lambda *a, **k: used.append(k["device"]) or real(*a, **k))
    settings = PipelineConfig.from_dict({"probe": {"concat": [], "raw_pixels": False, "max_iter": 20,
                                                   "l2_grid": [1e-3], "screen_train": 0}})
    probe_stage.run(settings, paths)
    assert len(spy) == 1 and used == spy and used[0] is spy[0]
    assert len(device_lines(caplog, "probe")) == 1


def loaded_model(paths: Paths) -> DDAEClassifierModel:
    """The pyfunc model as MLflow loads it: ``load_context`` with the artifacts' paths."""
    model = DDAEClassifierModel()
    artifacts = {"network": str(paths.network), "probe": str(paths.root / "served-probe"),
                 "preprocess": str(paths.root / "preprocess.json")}
    model.load_context(types.SimpleNamespace(artifacts=artifacts))
    return model


class FakePyfunc:
    """What ``mlflow.pyfunc.load_model`` returns, around the real python model."""

    def __init__(self, model: DDAEClassifierModel) -> None:
        self.model = model

    def unwrap_python_model(self) -> DDAEClassifierModel:
        return self.model

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.model.predict(None, frame)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_served_model_loads_its_network_on_the_picked_device(project, spy, caplog):
    paths, _images, _labels = project
    model = loaded_model(paths)
    assert len(spy) == 1 and model.classifier.device == spy[0]
    assert len(device_lines(caplog, "model")) == 1


def test_registers_scorer_reports_the_device_the_model_ran_on(project, spy, caplog, monkeypatch, tmp_path, capsys):
    import mlflow

    paths, images, labels = project
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: FakePyfunc(loaded_model(paths)))
    frame = tmp_path / "test.parquet"
    pd.DataFrame({"image": [png(i) for i in images], "label": labels}).to_parquet(frame)
    assert score_model_module.main(["models:/m/1", str(frame)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(spy) == 1 and report["device"] == str(spy[0]) and report["images"] == len(labels)
    assert len(device_lines(caplog, "model")) == 1


@pytest.mark.parametrize("job", ["predict", "embed"])
def test_predict_and_embed_run_the_model_on_the_picked_device(job, project, spy, caplog, monkeypatch, tmp_path):
    from tasks.services.serving import embed, predict

    paths, images, _labels = project
    module = predict if job == "predict" else embed
    monkeypatch.setattr(module, "load_model",
                        lambda root, uri: model_source.LoadedModel(uri, "1", FakePyfunc(loaded_model(paths))))
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images[:5]):
        (folder / f"{i}.png").write_bytes(png(image))
    if job == "predict":
        summary = predict.run_predict(paths.root, str(folder), str(tmp_path / "out.parquet"), progress=False)
        device, count = summary.device, summary.images
    else:
        summary = embed.run_embed(paths.root, str(folder), str(tmp_path / "out.parquet"), progress=False)
        device, count = summary["device"], summary["images"]
    assert len(spy) == 1 and device == str(spy[0]) and count == 5
    assert len(device_lines(caplog, "model")) == 1


def cpu_bf16(monkeypatch, native: bool) -> None:
    """Pretend this CPU has (or lacks) AVX512-BF16; no AMX either way."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)


def test_pretraining_says_why_it_runs_in_fp32_when_auto_found_no_native_bf16_on_the_cpu(monkeypatch):
    words = pretrain_stage.precision_words
    cpu_bf16(monkeypatch, native=True)
    assert words("bf16", "auto", torch.device("cpu")) == "bf16 autocast"
    assert words("bf16", "bf16", torch.device("cpu")) == "bf16 autocast"
    cpu_bf16(monkeypatch, native=False)
    assert "no native bf16" in words("no", "auto", torch.device("cpu"))
    assert words("no", "no", torch.device("cpu")) == "fp32"  # asked for: nothing to explain
    assert words("no", "auto", torch.device("cuda")) == "fp32"


def test_bf16_asked_of_a_cpu_that_emulates_it_says_so_and_how_to_avoid_it(monkeypatch):
    cpu_bf16(monkeypatch, native=False)
    words = pretrain_stage.precision_words("bf16", "bf16", torch.device("cpu"))
    assert "emulated" in words and "mixed_precision: auto" in words
