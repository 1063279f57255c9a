"""The evaluate stage's logic without DVC, on a tiny project whose answers are known.

Images are pure noise (raw pixels cannot tell the classes apart), while the stored features of a few
readouts carry the class (the rest are noise too), written through the real feature-store writer.
So a wrong readout, wrong rows or a wrong split shows up as an accuracy near chance, and the files
the stage writes can be checked cell by cell. MLflow tracks into a SQLite file under tmp.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from ddae_core.atomic import write_json_atomic
from ddae_core.checkpoint import load_network, network_hash
from ddae_core.config import DataConfig, PipelineConfig
from ddae_core.data import DatasetError, load_prepared
from ddae_core.data.prepared import prepare_dataset
from ddae_core.features import extract_all
from ddae_core.heads.diagnostics import alignment, uniformity
from ddae_core.readout import Readout, Selection
from ddae_core.sampling import label_subsets, nested_subset, subset_size
from tasks import evaluate
from tasks.services.outputs.feature_store import FeatureIndex, FeatureStoreError, part_path, read_readout
from tasks.services.outputs.paths import Paths
from tasks.services.runner.stage_main import StageError

from feature_store_builder import save_tiny_network, write_feature_store

RES, SEED = 16, 7
TAPS = ("mid.res1", "dec.8x8.res0")
LEVELS, POOLS = (11.0, 50.0), (1, 2)
CLASSES = ("a", "b", "c")
DIM = 4
FRACTIONS = (0.05, 0.25, 1.0)
KNN_QUERIES = 30
# the readouts whose stored features know the class; every other one is noise
INFORMATIVE = {("dec.8x8.res0", 11.0, 1), ("mid.res1", 11.0, 2), ("mid.res1", 50.0, 2)}
# what the probe stage chose: a concatenation whose second block alone is informative
CHOSEN = Readout(TAPS, 11.0, 1, SEED)
# the probe stage's own 100% cells, deliberately unlike anything this toy would measure
PROBE_TEST_ACC, PROBE_VAL_ACC, PIXELS_TEST_ACC, PIXELS_VAL_ACC = 0.8125, 0.75, 0.0625, 0.125


def config(**sections) -> PipelineConfig:
    """Tiny settings: a short L2 grid, the three fractions, a capped kNN, no alignment pairs unless asked."""
    data = {"data": {"dataset": "imagefolder", "image_size": RES},
            "probe": {"l2_grid": [1e-3, 1e-1], "max_iter": 40},
            "extract": {"taps": list(TAPS), "levels": list(LEVELS), "pools": list(POOLS), "batch_size": 8,
                        "seed": SEED},
            "label_efficiency": {"fractions": list(FRACTIONS), "seed": 3},
            "diagnostics": {"pairs": 0, "pool": 1, "knn_k": 5, "knn_queries": KNN_QUERIES, "seed": 1}}
    for name, values in sections.items():
        data[name] = {**data[name], **values}
    return PipelineConfig.from_dict(data)


def prepare_noise_images(paths: Paths, tmp: Path) -> dict:
    """An image folder of uniform noise (100 train and 20 test images per class), prepared by the prepare code."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 100), ("test", 20)):
        for name in CLASSES:
            folder = tmp / "source" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (RES, RES), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
    prepare_dataset(DataConfig(dataset="imagefolder", source=str(tmp / "source"), image_size=RES, channels=1,
                               val_fraction=0.2), paths.prepared, progress=False)
    return load_prepared(paths.prepared)[1]


def toy_features(key: tuple[str, float, int], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, DIM) float32: noise (std 0.5), plus three times the one-hot class for the ``INFORMATIVE`` readouts."""
    noise = rng.normal(scale=0.5, size=(len(labels), DIM))
    if key in INFORMATIVE:
        noise[:, :len(CLASSES)] += 3.0 * np.eye(len(CLASSES))[labels]
    return noise.astype(np.float32)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Network, prepared noise images, the feature store, and the probe stage's selection.json and probe.json."""
    tmp = tmp_path_factory.mktemp("evaluate-stage")
    paths = Paths(tmp / "repo")
    save_tiny_network(paths, resolution=RES)
    splits = prepare_noise_images(paths, tmp)
    singles = [Readout((tap,), level, pool, SEED) for tap in TAPS for level in LEVELS for pool in POOLS]
    rng = np.random.default_rng(1)
    ids = {s: np.asarray(splits[s].sample_ids) for s in splits}
    labels = {s: np.asarray(splits[s].labels) for s in splits}
    features = {s: {r.feature_keys[0]: toy_features(r.feature_keys[0], labels[s], rng) for r in singles}
                for s in splits}
    metadata = write_feature_store(paths, singles, ids, labels, features, CLASSES, data_checksum="data-7")
    selection = Selection(readout=CHOSEN, class_names=CLASSES, level_kind="t", test_acc=PROBE_TEST_ACC,
                          network_hash=metadata["network_hash"], data_checksum="data-7", l2=1e-3,
                          val_acc=PROBE_VAL_ACC)
    write_json_atomic(paths.probe / "selection.json", selection.to_json())
    write_json_atomic(paths.metrics / "probe.json", {"test_acc": PROBE_TEST_ACC, "val_acc": PROBE_VAL_ACC,
                                                     "raw_pixels_test_acc": PIXELS_TEST_ACC,
                                                     "raw_pixels_val_acc": PIXELS_VAL_ACC})
    return paths, labels


def copy_of(project, tmp_path) -> Paths:
    """A private copy of the project, for tests that add or remove inputs."""
    paths, _labels = project
    shutil.copytree(paths.root, tmp_path / "repo")
    return Paths(tmp_path / "repo")


@pytest.fixture(scope="module")
def evaluated(project, tmp_path_factory):
    """``evaluate.run`` on a copy of the project, with alignment pairs, tracked in the copy's own mlflow.db."""
    paths = copy_of(project, tmp_path_factory.mktemp("evaluate-run"))
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DDAE_PIPELINE_RUN_ID", raising=False)
        summary = evaluate.run(config(diagnostics={"pairs": 4}), paths)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{paths.root / 'mlflow.db'}")
    yield paths, summary, client
    mlflow.set_tracking_uri(before[0])
    mlflow.set_registry_uri(before[1])


def by_method(rows: list[dict], _skipped: dict | None = None) -> dict[tuple[str, float], dict]:
    cells = {(r["method"], r["fraction"]): r for r in rows}
    assert len(cells) == len(rows), "one row per (method, fraction)"
    return cells


def test_each_fraction_probes_the_same_nested_class_balanced_rows_for_every_method(project, monkeypatch):
    paths, labels = project
    probed, voted = [], []
    real_probe, real_knn = evaluate.probe_accuracy, evaluate.knn_accuracy
    monkeypatch.setattr(evaluate, "probe_accuracy", lambda x, y, rows, *a: probed.append(
        (x["train"].shape[1], rows)) or real_probe(x, y, rows, *a))
    monkeypatch.setattr(evaluate, "knn_accuracy", lambda train, y_train, *a, **k: voted.append(
        (train, y_train)) or real_knn(train, y_train, *a, **k))
    rows, skipped = evaluate.label_efficiency(config(), paths, network_hash(paths.network))
    assert skipped == {}

    y = labels["train"]
    subsets = label_subsets(y, FRACTIONS, 3)  # the rows fine-tuning gets too
    small, medium, full = (subsets[f] for f in FRACTIONS)
    assert len(small) == subset_size(len(y), 0.05, 3) == 12 and len(medium) == 60 and len(full) == len(y) == 240
    assert set(small) <= set(medium)  # nested: the 5% rows are among the 25% rows
    for rows_ in (small, medium):
        assert np.bincount(y[rows_]).max() - np.bincount(y[rows_]).min() <= 1  # class-balanced
    assert not np.array_equal(label_subsets(y, FRACTIONS, 4)[0.25], medium)  # label_efficiency.seed picks them

    # below 100%: the DDAE readout (both blocks) and raw pixels each fitted on exactly these rows;
    # at 100% neither is refitted (the probe stage's own cells)
    assert [(dim, list(r)) for dim, r in probed] == [(2 * DIM, list(small)), (RES * RES, list(small)),
                                                     (2 * DIM, list(medium)), (RES * RES, list(medium))]
    chosen, _ = read_readout(paths.features, CHOSEN, "train", network_hash(paths.network))
    for (train, y_train), rows_ in zip(voted, (small, medium, full)):  # kNN votes come from the same rows
        np.testing.assert_array_equal(train, chosen[rows_])
        np.testing.assert_array_equal(y_train, y[rows_])
    cells = by_method(rows)
    assert {(m, f): c["labels"] for (m, f), c in cells.items()} == {
        (m, f): len(subsets[f]) for m in ("ddae_probe", "raw_pixels", "ddae_knn") for f in FRACTIONS}


def test_the_chosen_readout_beats_raw_pixels_and_the_100pct_cells_are_the_probe_stages(project):
    paths, labels = project
    cells = by_method(*evaluate.label_efficiency(config(), paths, network_hash(paths.network)))
    for fraction in FRACTIONS[:-1]:  # the features know the class, the noise pixels do not
        assert cells["ddae_probe", fraction]["test_acc"] >= 0.9, cells["ddae_probe", fraction]
        assert cells["ddae_knn", fraction]["test_acc"] >= 0.9, cells["ddae_knn", fraction]
        assert cells["raw_pixels", fraction]["test_acc"] <= 0.6, cells["raw_pixels", fraction]
        assert 0.0 <= cells["ddae_probe", fraction]["val_acc"] <= 1.0
    assert cells["ddae_probe", 1.0] == {"fraction": 1.0, "labels": len(labels["train"]), "method": "ddae_probe",
                                       "test_images": 60, "val_acc": PROBE_VAL_ACC, "test_acc": PROBE_TEST_ACC}
    assert (cells["raw_pixels", 1.0]["val_acc"], cells["raw_pixels", 1.0]["test_acc"]) == (PIXELS_VAL_ACC,
                                                                                         PIXELS_TEST_ACC)
    assert {c["test_images"] for (m, _f), c in cells.items() if m == "ddae_knn"} == {KNN_QUERIES}
    assert {c["test_images"] for (m, _f), c in cells.items() if m != "ddae_knn"} == {60}


def test_raw_pixels_are_left_out_when_off_and_refitted_at_100pct_when_the_probe_did_not_score_them(
        project, tmp_path):
    paths, _labels = project
    cells = by_method(*evaluate.label_efficiency(config(label_efficiency={"raw_pixels": False}), paths,
                                                network_hash(paths.network)))
    assert {m for m, _f in cells} == {"ddae_probe", "ddae_knn"}
    paths = copy_of(project, tmp_path)
    write_json_atomic(paths.metrics / "probe.json", {"test_acc": PROBE_TEST_ACC, "val_acc": PROBE_VAL_ACC})
    cells = by_method(*evaluate.label_efficiency(config(), paths, network_hash(paths.network)))
    assert cells["raw_pixels", 1.0]["test_acc"] != PIXELS_TEST_ACC and cells["raw_pixels", 1.0]["test_acc"] <= 0.6


def test_label_efficiency_probes_walk_the_probe_stages_l2_path_and_flag_an_edge(project, caplog):
    paths, _labels = project
    with caplog.at_level("WARNING", logger="ddae_core.heads.probe"):
        cells = by_method(*evaluate.label_efficiency(config(probe={"l2_grid": [0.1], "l2_extend": 0}), paths,
                                                    network_hash(paths.network)))
    refitted = [cells[m, f] for m in ("ddae_probe", "raw_pixels") for f in FRACTIONS[:-1]]
    assert all(c["l2"] == 0.1 and c["l2_at_edge"] is True for c in refitted)  # one value: nothing beyond it
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 4
    assert sum(CHOSEN.label in m for m in warned) == 2 and sum("probe pixels" in m for m in warned) == 2
    # with the path on, every refit tries past the one value: it moves, or 0.1 is no longer an edge
    cells = by_method(*evaluate.label_efficiency(config(probe={"l2_grid": [0.1], "l2_extend": 2}), paths,
                                                network_hash(paths.network)))
    refitted = [cells[m, f] for m in ("ddae_probe", "raw_pixels") for f in FRACTIONS[:-1]]
    assert not any(c["l2"] == 0.1 and c["l2_at_edge"] for c in refitted)


def test_fine_tune_cells_join_the_rows_and_the_table(project, tmp_path):
    paths = copy_of(project, tmp_path)
    finetune = {"enabled": True, "test_images": 45, "cells": [
        {"model": model, "fraction": fraction, "labels": labels, "val_acc": 0.5, "test_acc": acc}
        for model, acc in (("ddae_finetune", 0.9), ("scratch_finetune", 0.4))
        for fraction, labels in ((0.05, 12), (1.0, 240))]}
    write_json_atomic(paths.metrics / "finetune.json", finetune)
    rows, _skipped = evaluate.label_efficiency(config(label_efficiency={"raw_pixels": False}), paths,
                                     network_hash(paths.network))
    cells = by_method(rows)
    assert cells["ddae_finetune", 0.05] == {"method": "ddae_finetune", "fraction": 0.05, "labels": 12,
                                            "val_acc": 0.5, "test_acc": 0.9, "test_images": 45}
    assert cells["scratch_finetune", 1.0]["test_acc"] == 0.4
    table = evaluate.markdown_table(rows)
    assert "| DDAE, fine-tuned | 90.00% |  | 90.00% |" in table
    assert "| same network from scratch | 40.00% |  | 40.00% |" in table
    assert "DDAE, fine-tuned 45" in table and "DDAE, kNN 30" in table and "DDAE, linear probe 60" in table


def test_diagnostics_score_knn_per_tap_and_level_at_the_configured_pool(project):
    paths, _labels = project
    index = FeatureIndex.load(paths.features)
    checkpoint = network_hash(paths.network)
    for pool in POOLS:
        rows = evaluate.diagnostics(config(diagnostics={"pool": pool}), paths, index, checkpoint)
        assert [(r["tap"], r["level"], r["pool"]) for r in rows] == [(t, lv, pool) for t in TAPS for lv in LEVELS]
        for row in rows:
            assert set(row) == {"tap", "level", "pool", "knn_test_acc"}  # pairs: 0 -> no alignment/uniformity
            informative = (row["tap"], row["level"], pool) in INFORMATIVE
            assert (row["knn_test_acc"] >= 0.9) if informative else (row["knn_test_acc"] <= 0.6), row
    with pytest.raises(StageError, match=r"params.yaml: diagnostics.pool: 3 is not in extract.pools \(\[1, 2\]\)"):
        evaluate.diagnostics(config(diagnostics={"pool": 3}), paths, index, checkpoint)


def test_alignment_and_uniformity_compare_augmented_copies_1_and_2_of_the_pair_images(evaluated):
    paths, *_ = evaluated
    with open(paths.plots / "evaluate" / "diagnostics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["tap", "level", "pool", "knn_test_acc", "alignment", "uniformity"]
    train = load_prepared(paths.prepared)[1]["train"]
    pairs = nested_subset(train.labels, 4, 1)
    denoiser = load_network(paths.network).eval()
    views = [extract_all(denoiser, np.asarray(train.images[pairs]), np.asarray(train.sample_ids)[pairs], taps=TAPS,
                         levels=LEVELS, pools=[1], seed=SEED, copy=copy, progress=False) for copy in (1, 2)]
    for row in rows:
        key = (row["tap"], float(row["level"]), 1)
        first, second = views[0][key], views[1][key]
        assert float(row["alignment"]) == pytest.approx(alignment(first, second), rel=1e-6)
        assert float(row["alignment"]) > 0.0  # two different views, not one view twice
        assert float(row["uniformity"]) == pytest.approx((uniformity(first) + uniformity(second)) / 2, rel=1e-6)


def test_run_writes_the_efficiency_table_markdown_and_metrics_it_promises(evaluated, project):
    paths, summary, _client = evaluated
    _paths, labels = project
    folder = paths.plots / "evaluate"
    assert sorted(p.name for p in folder.iterdir()) == ["diagnostics.csv", "label_efficiency.csv",
                                                        "label_efficiency.md", "label_efficiency.png"]
    with open(folder / "label_efficiency.csv", newline="") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == evaluate.EFFICIENCY_COLUMNS == ("method", "fraction", "labels", "test_acc")
    sizes = {"5%": 12, "25%": 60, "100%": len(labels["train"])}
    assert [row[:3] for row in table[1:]] == [[m, f, str(n)] for m in ("ddae_probe", "ddae_knn", "raw_pixels")
                                              for f, n in sizes.items()]  # METHODS order, then fraction

    metrics = json.loads((paths.metrics / "evaluate.json").read_text())
    assert set(metrics) == {"label_efficiency", "labels", "diagnostics", "skipped_fractions"}
    assert metrics["skipped_fractions"] == {}  # 5% of 240 labels is 12, four per class
    assert metrics["labels"] == sizes
    assert {(m, f): f"{acc:.4f}" for m, cells in metrics["label_efficiency"].items() for f, acc in cells.items()} == \
        {(m, f): acc for m, f, _n, acc in table[1:]}
    assert metrics["label_efficiency"]["ddae_probe"]["100%"] == PROBE_TEST_ACC
    assert metrics["label_efficiency"]["raw_pixels"]["100%"] == PIXELS_TEST_ACC
    assert set(metrics["diagnostics"]) == {"mid.res1@11/p1", "mid.res1@50/p1", "dec.8x8.res0@11/p1",
                                           "dec.8x8.res0@50/p1"}
    assert all(set(d) == {"knn_test_acc", "alignment", "uniformity"} for d in metrics["diagnostics"].values())

    markdown = (folder / "label_efficiency.md").read_text()
    lines = markdown.splitlines()
    assert lines[:2] == ["| test accuracy | 5% labels | 25% labels | 100% labels |", "|---|---|---|---|"]
    assert [line.split(" | ")[0] for line in lines[2:5]] == ["| DDAE, linear probe", "| DDAE, kNN",
                                                             "| raw pixels, linear probe"]
    assert lines[2].endswith(f"| {100 * PROBE_TEST_ACC:.2f}% |")
    assert lines[-1] == ("Test images scored: DDAE, kNN 30; DDAE, linear probe 60; "
                         "raw pixels, linear probe 60.")
    assert (folder / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary == {"label_efficiency": markdown, "diagnostics": 4}


def test_run_logs_one_mlflow_run_with_the_cells_and_the_plots(evaluated):
    paths, _summary, client = evaluated
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "evaluate" and run.data.tags["ddae.stage"] == "evaluate"
    assert run.data.tags["ddae.network_hash"] == network_hash(paths.network)
    assert run.data.tags["ddae.data_checksum"] == "data-7"
    metrics = run.data.metrics
    assert {k for k in metrics if not k.startswith("knn.")} == {
        f"{m}.{f}pct.test_acc" for m in ("ddae_probe", "ddae_knn", "raw_pixels") for f in ("5", "25", "100")}
    assert metrics["ddae_probe.100pct.test_acc"] == PROBE_TEST_ACC
    assert {k for k in metrics if k.startswith("knn.")} == {
        f"knn.{t}.level{lv:g}.test_acc" for t in TAPS for lv in LEVELS}
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == [
        "diagnostics.csv", "label_efficiency.csv", "label_efficiency.md", "label_efficiency.png"]


def _drop_selection(paths: Paths) -> Path:
    (paths.probe / "selection.json").unlink()
    return paths.probe / "selection.json"


def _drop_index(paths: Paths) -> Path:
    (paths.features / "index.json").unlink()
    return paths.features / "index.json"


def _drop_part(paths: Paths) -> Path:
    part = part_path(paths.features, CHOSEN.members[1], "val", 0)
    part.unlink()
    return part


def _drop_probe_metrics(paths: Paths) -> Path:
    (paths.metrics / "probe.json").unlink()
    return paths.metrics / "probe.json"


def _drop_prepared(paths: Paths) -> Path:
    shutil.rmtree(paths.prepared)
    return paths.prepared / "manifest.json"


def _other_checkpoint(paths: Paths) -> Path:
    save_tiny_network(paths, resolution=RES, seed=1)  # features now come from another network
    return part_path(paths.features, CHOSEN.members[0], "train", 0)


@pytest.mark.parametrize("damage, error, message", [
    (_drop_selection, StageError, "not found: run the probe stage first"),
    (_drop_index, StageError, "not found: run the extract stage first"),
    (_drop_part, FeatureStoreError, "feature part not found; rerun the extract stage"),
    (_drop_probe_metrics, StageError, "not found: run the probe stage first"),
    (_drop_prepared, DatasetError, "not found"),
    (_other_checkpoint, FeatureStoreError, "computed from checkpoint .* rerun the extract stage"),
], ids=["no-selection", "no-index", "no-feature-part", "no-probe-metrics", "no-prepared-data", "other-checkpoint"])
def test_a_missing_or_stale_input_fails_cleanly_before_any_output_naming_the_file(project, tmp_path, damage, error,
                                                                                  message):
    """Errors of these kinds are what ``stage_main`` reports as one line (no traceback), exit code 1."""
    paths = copy_of(project, tmp_path)
    named = damage(paths)
    with pytest.raises(error, match=message) as caught:
        evaluate.run(config(), paths)
    assert str(named) in str(caught.value)
    assert not (paths.plots / "evaluate").exists() and not (paths.metrics / "evaluate.json").exists()


def test_a_fraction_under_one_label_per_class_is_skipped_and_recorded(project, caplog):
    paths, labels = project
    tiny = config(label_efficiency={"fractions": [0.005, 0.05, 1.0]})  # 0.005 x 240 = 1 label, 3 classes
    with caplog.at_level("WARNING", logger="ddae"):
        rows, skipped = evaluate.label_efficiency(tiny, paths, network_hash(paths.network))
    assert skipped == {0.005: 1}
    assert {r["fraction"] for r in rows} == {0.05, 1.0}
    assert any("skipping 0.5%: 1 labels for 3 classes" in r.getMessage() for r in caplog.records)
    assert evaluate.summary_metrics(rows, [], skipped)["skipped_fractions"] == {"0.5%": 1}
    table = evaluate.markdown_table(rows, skipped).splitlines()
    assert table[0] == "| test accuracy | 5% labels | 100% labels |"  # no empty column for it
    assert table[-1] == "Skipped, under one label per class: 0.5% (1 labels)."
    assert "Skipped" not in evaluate.markdown_table(rows, {})
