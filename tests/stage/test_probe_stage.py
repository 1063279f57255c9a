"""The probe stage's logic without DVC or MLflow, on a tiny feature store the real feature path wrote.

A ddpm-tiny network's features (two taps, one level, two pools) are written in the extract stage's
layout; the stage then runs as DVC would run it, except for its MLflow run. This pins the readout's
journey: paper aliases in ``probe.concat``, the candidates and their order, ``selection.json`` (its
bytes) and the registered model's ``Classifier.load`` reading the same features back.
"""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from ddae_core.atomic import write_json_atomic
from ddae_core.classifier import Classifier
from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.features import extract_all
from ddae_core.heads.probe import LinearProbe
from ddae_core.readout import Readout, Selection
from tasks import probe as probe_stage
from tasks.services.outputs.feature_store import FeatureIndex, load_candidates, read_readout
from tasks.services.outputs.paths import Paths

from feature_store_builder import save_tiny_network, write_feature_store

TAPS = ("mid.res1", "dec.16x16.res0")  # out_1 is dec.16x16.res0 in ddpm-tiny at 32x32
LEVEL, POOLS, SEED = 11.0, (1, 2), 5
SIZES = {"train": 24, "val": 12, "test": 12}
CLASSES = ("a", "b", "c")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A network, its images, and the extract stage's feature store and index for them."""
    paths = Paths(tmp_path_factory.mktemp("probe-stage"))
    denoiser = save_tiny_network(paths, resolution=32)
    rng = np.random.default_rng(0)
    images, labels, ids, start = {}, {}, {}, 0
    for split, n in SIZES.items():
        labels[split] = np.arange(n) % len(CLASSES)
        # class-dependent brightness, so the probe has something to find
        images[split] = np.clip(rng.normal(60 + 60 * labels[split][:, None, None, None], 30, (n, 32, 32, 1)),
                                0, 255).astype(np.uint8)
        ids[split] = np.arange(start, start + n)
        start += n
    singles = [Readout((tap,), LEVEL, pool, SEED) for tap in TAPS for pool in POOLS]
    features = {split: extract_all(denoiser, images[split], ids[split], taps=TAPS, levels=[LEVEL], pools=POOLS,
                                   seed=SEED, progress=False) for split in SIZES}
    write_feature_store(paths, singles, ids, labels, features, CLASSES)
    return paths, images, ids, features


def config(concat) -> PipelineConfig:
    return PipelineConfig.from_dict({"probe": {"concat": concat, "raw_pixels": False, "max_iter": 30,
                                               "l2_grid": [1e-3, 1e-2], "screen_train": 0, "finalists": 2}})


def test_the_index_reads_back_with_the_networks_selectors(store):
    paths, *_ = store
    index = FeatureIndex.load(paths.features)
    assert [r.label for r in index.readouts] == [
        "mid.res1@11/p1", "mid.res1@11/p2", "dec.16x16.res0@11/p1", "dec.16x16.res0@11/p2"]
    assert {r.seed for r in index.readouts} == {SEED}
    assert index.selectors["out_1"] == ("dec.16x16.res0",)
    assert index.selectors["mid"] == ("mid.res1",) and index.selectors["dec1"][0] == "dec.16x16.res0"
    assert (index.class_names, index.splits, index.train_copies) == (CLASSES, SIZES, 1)
    with pytest.raises(Exception, match="index.json not found: run the extract stage first"):
        FeatureIndex.load(paths.root / "nowhere")


def test_candidates_resolve_aliases_and_concatenate_the_stored_blocks(store):
    paths, _images, _ids, features = store
    index = FeatureIndex.load(paths.features)
    found, labels = load_candidates(paths.features, index, [["mid.res1", "out_1"]], index.network_hash)
    # singles in index order, then the group at each level, then each pool (the tie-break order)
    assert [c.readout.label for c in found] == [r.label for r in index.readouts] + [
        "mid.res1+dec.16x16.res0@11/p1", "mid.res1+dec.16x16.res0@11/p2"]
    group = found[-2]
    assert group.readout.taps == TAPS  # block names, never the alias
    for split in SIZES:
        expected = np.concatenate([features[split][(tap, LEVEL, 1)] for tap in TAPS], axis=1)
        np.testing.assert_array_equal(group.features[split], expected)
        np.testing.assert_array_equal(labels[split], np.arange(SIZES[split]) % len(CLASSES))
        x, _y = read_readout(paths.features, group.readout, split, index.network_hash)
        np.testing.assert_array_equal(x, expected)
        # joined on demand: the rows asked for only, the whole matrix through np.asarray, nothing kept
        lazy = group.features[split]
        assert lazy.shape == expected.shape and len(lazy) == len(expected)
        rows = np.array([2, 0])
        np.testing.assert_array_equal(lazy[rows], expected[rows])
        np.testing.assert_array_equal(lazy[1:3], expected[1:3])
        assert np.asarray(lazy) is not np.asarray(lazy)


def test_an_unextracted_concat_member_is_a_config_error_naming_it(store):
    paths, *_ = store
    index = FeatureIndex.load(paths.features)
    with pytest.raises(ConfigError, match=r"params.yaml: probe.concat\[0\]\[1\]: tap 'out_2' "
                                          r"\(block 'dec.16x16.res1'\) was not extracted"):
        load_candidates(paths.features, index, [["mid.res1", "out_2"]], index.network_hash)


def test_the_stage_selects_writes_selection_json_and_the_model_reads_it_back(store, monkeypatch):
    paths, images, ids, features = store
    tracked = []
    monkeypatch.setattr(probe_stage, "track", lambda *args: tracked.append(args))  # no MLflow here
    metrics = probe_stage.run(config([["mid.res1", "out_1"]]), paths)

    best = metrics["best"]
    assert set(best) == {"name", "taps", "level", "pool", "l2", "l2_at_edge"}
    assert metrics["candidates"] == 6 and len(tracked) == 1
    table = (paths.plots / "probe" / "table.csv").read_text().splitlines()
    assert "mid.res1+dec.16x16.res0@11/p1,mid.res1+dec.16x16.res0,11,1" in "\n".join(table)
    # per-class results on test: one confusion row per test image, the matrix as a PNG
    confusion = (paths.plots / "probe" / "confusion.csv").read_text().splitlines()
    assert confusion[0] == "actual,predicted" and "per_class" not in metrics  # the table, not metric columns
    pairs = [line.split(",") for line in confusion[1:]]
    assert {a for a, _ in pairs} <= set(CLASSES) and {b for _, b in pairs} <= set(CLASSES)
    assert sum(a == b for a, b in pairs) / len(pairs) == pytest.approx(metrics["test_acc"])
    assert (paths.plots / "probe" / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    selection = Selection.read(paths.probe)
    assert selection.readout == Readout(tuple(best["taps"]), best["level"], best["pool"], SEED)
    assert selection.readout.label == best["name"]
    assert (selection.l2, selection.test_acc, selection.val_acc) == (best["l2"], metrics["test_acc"],
                                                                     metrics["val_acc"])
    # the bytes the stage has always written: these keys, flat, through the one JSON writer
    index = json.loads((paths.features / "index.json").read_text())
    legacy = paths.root / "legacy.json"
    write_json_atomic(legacy, {
        "taps": best["taps"], "level": best["level"], "level_kind": index["level_kind"], "pool": best["pool"],
        "l2": best["l2"], "val_acc": metrics["val_acc"], "test_acc": metrics["test_acc"],
        "class_names": index["class_names"], "network_hash": index["network_hash"], "seed": index["seed"],
        "data_checksum": index["data_checksum"]})
    assert (paths.probe / "selection.json").read_bytes() == legacy.read_bytes()

    classifier = Classifier.load(paths.network, paths.probe, {"channels": 1, "image_size": 32, "fit": "pad"})
    assert classifier.readout == selection.readout and classifier.class_names == list(CLASSES)
    served = classifier.features(images["test"], ids["test"])
    stored, _y = read_readout(paths.features, selection.readout, "test", selection.network_hash)
    np.testing.assert_allclose(served, stored, rtol=1e-5, atol=1e-6)  # serving reads what probing read


def test_a_chosen_l2_left_at_the_edge_is_in_the_metrics_and_warned(store, monkeypatch, caplog):
    paths, *_ = store
    monkeypatch.setattr(probe_stage, "track", lambda *args: None)  # no MLflow here
    one_value = PipelineConfig.from_dict({"probe": {"concat": [], "raw_pixels": False, "max_iter": 30,
                                                    "l2_grid": [1e-2], "l2_extend": 0, "screen_train": 0}})
    with caplog.at_level("WARNING", logger="ddae_core.heads.probe"):
        metrics = probe_stage.run(one_value, paths)
    assert metrics["best"]["l2"] == 1e-2 and metrics["best"]["l2_at_edge"] is True  # one value: nothing beyond
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and metrics["best"]["name"] in warned[0]
    assert json.loads((paths.metrics / "probe.json").read_text())["best"]["l2_at_edge"] is True


def test_the_per_class_table_and_confusion_rows_are_the_saved_probes_test_predictions(store, monkeypatch):
    paths, *_ = store
    tracked = []
    monkeypatch.setattr(probe_stage, "track", lambda *args: tracked.append(args))  # no MLflow here
    metrics = probe_stage.run(config([]), paths)

    selection = Selection.read(paths.probe)
    probe = LinearProbe.from_state_dict(load_file(str(paths.probe / "probe.safetensors")))
    x_test, y_test = read_readout(paths.features, selection.readout, "test", selection.network_hash)
    predicted = probe.predict(x_test)
    folder = paths.plots / "probe"
    with open(folder / "confusion.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == [[CLASSES[t], CLASSES[p]] for t, p in zip(y_test, predicted)]
    with open(folder / "per_class.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == list(CLASSES)
    for c, row in enumerate(rows):
        images, hits = int((y_test == c).sum()), int(((y_test == c) & (predicted == c)).sum())
        assert int(row["test_images"]) == images
        assert float(row["recall"]) == pytest.approx(hits / images, abs=1e-4)
    assert metrics["test_balanced_acc"] == pytest.approx(np.mean([float(r["recall"]) for r in rows]), abs=1e-4)
    assert {"confusion.png", "confusion.csv", "per_class.csv"} <= set(tracked[0][-1])  # logged to MLflow


def test_the_novelty_model_is_calibrated_on_val_saved_and_served(store, monkeypatch):
    paths, images, ids, _features = store
    monkeypatch.setattr(probe_stage, "track", lambda *args: None)  # no MLflow here
    rate = 0.25
    cfg = PipelineConfig.from_dict({"probe": {"concat": [], "raw_pixels": False, "max_iter": 30,
                                              "l2_grid": [1e-2], "screen_train": 0},
                                    "predict": {"novelty_false_alarm": rate}})
    metrics = probe_stage.run(cfg, paths)
    novelty = metrics["novelty"]
    assert (novelty["method"], novelty["false_alarm"], novelty["chosen_on"]) == ("mahalanobis", rate, "val")
    assert novelty["train_rows"] == SIZES["train"]  # copy 0 of train
    assert json.loads((paths.metrics / "probe.json").read_text())["novelty"] == novelty
    # the calibration: the share of validation images above the threshold, never above the rate
    selection = Selection.read(paths.probe)
    x_val, _ = read_readout(paths.features, selection.readout, "val", selection.network_hash)
    classifier = Classifier.load(paths.network, paths.probe, {"channels": 1, "image_size": 32, "fit": "pad"})
    assert classifier.novelty is not None and classifier.novelty_threshold() == novelty["threshold"]
    val_scores = classifier.novelty.score(x_val)
    assert novelty["val_false_alarm"] == pytest.approx(np.mean(val_scores > novelty["threshold"]))
    assert rate - 1 / SIZES["val"] <= novelty["val_false_alarm"] <= rate
    # served images get the score of their stored features
    x_test, _ = read_readout(paths.features, selection.readout, "test", selection.network_hash)
    served = classifier.novelty_of(classifier.features(images["test"], ids["test"]))
    np.testing.assert_allclose(served, classifier.novelty.score(x_test), rtol=1e-3)


def test_a_class_left_out_of_the_novelty_fit_scores_as_novel(store):
    """The acceptance check without training anything new: fit on two of the three classes' train
    features, calibrate on their validation images; the third class's images are the novel ones."""
    paths, *_ = store
    index = FeatureIndex.load(paths.features)
    found, labels = load_candidates(paths.features, index, [], index.network_hash)
    best = found[0]
    keep = {split: labels[split] != 2 for split in SIZES}
    known = probe_stage.Candidate(best.readout, {s: best.features[s][keep[s]] for s in SIZES})
    known_labels = {s: labels[s][keep[s]] for s in SIZES}
    smaller = dataclasses.replace(index, splits={s: int(keep[s].sum()) for s in SIZES})
    model, metrics = probe_stage.novelty_model(PipelineConfig(), smaller, known, known_labels)
    unseen = np.concatenate([best.features[s][~keep[s]] for s in ("val", "test")])
    novel_scores, known_scores = model.score(unseen), model.score(best.features["test"][keep["test"]])
    assert novel_scores.mean() > known_scores.mean()
    assert model.is_novel(novel_scores).mean() > 0.5 and metrics["threshold"] == model.threshold
