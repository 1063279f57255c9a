"""Anomaly mode at prepare: train and val hold only the normal classes, test every class; names are checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddae_core.config import ConfigError, DataConfig, PipelineConfig
from ddae_core.data import load_prepared, normal_classes, prepare_dataset
from ddae_core.validation import validate_pipeline
from tests.image_trees import LAYOUT_FLAT, img_config, make_tree


def test_train_and_val_keep_only_the_normal_classes_and_test_keeps_all(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    manifest = prepare_dataset(img_config(tmp_path / "src", normal_classes=("dog",), val_fraction=0.25),
                               tmp_path / "out", progress=False)
    _, splits = load_prepared(tmp_path / "out")
    dog = manifest["class_names"].index("dog")
    assert normal_classes(manifest) == ["dog"] and manifest["config"]["normal_classes"] == ["dog"]
    assert set(splits["train"].labels.tolist()) == set(splits["val"].labels.tolist()) == {dog}
    assert len(splits["train"]) + len(splits["val"]) == 8  # dog's 10 less the 2 carved for test
    assert np.bincount(splits["test"].labels, minlength=3).tolist() == [2, 2, 2]
    # the other classes' absence from train and val is the mode, not something to warn about
    assert not any("no images of class" in w for w in manifest["warnings"])


def test_a_classifiers_manifest_does_not_mention_the_mode(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    manifest = prepare_dataset(img_config(tmp_path / "src"), tmp_path / "out", progress=False)
    assert "normal_classes" not in manifest and "normal_classes" not in manifest["config"]
    assert "normal_classes" not in json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert normal_classes(manifest) == []


def test_an_unknown_normal_class_is_named_with_the_key(tmp_path):
    make_tree(tmp_path / "src", LAYOUT_FLAT)
    with pytest.raises(ConfigError, match=r"data.normal_classes: 'wolf' is not a class of this dataset.*'cat'"):
        prepare_dataset(img_config(tmp_path / "src", normal_classes=("dog", "wolf")), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_the_config_rejects_repeats_empty_names_and_fine_tuning_in_anomaly_mode():
    with pytest.raises(ConfigError, match=r"data.normal_classes: repeats a class"):
        PipelineConfig.from_dict({"data": {"normal_classes": ["a", "a"]}})
    with pytest.raises(ConfigError, match=r"data.normal_classes\[0\]: must be a class name"):
        PipelineConfig.from_dict({"data": {"normal_classes": [""]}})
    with pytest.raises(ConfigError, match=r"probe.anomaly_recall: must be in \(0, 1\]"):
        PipelineConfig.from_dict({"probe": {"anomaly_recall": 0}})
    config = PipelineConfig.from_dict({"data": {"normal_classes": ["T-shirt/top"]}, "finetune": {"enabled": True}})
    assert config.data.anomaly and not DataConfig().anomaly
    with pytest.raises(ConfigError, match=r"finetune.enabled: true, but data.normal_classes"):
        validate_pipeline(config)
