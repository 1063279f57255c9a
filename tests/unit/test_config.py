"""params.yaml validation: every error names the key, and the sections must fit together."""

import copy
from pathlib import Path

import pytest
import yaml

from ddae_core.config import ConfigError, PipelineConfig
from ddae_core.validation import validate_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def check(data: dict) -> PipelineConfig:
    config = PipelineConfig.from_dict(data)
    validate_pipeline(config)
    return config


def test_shipped_params_are_valid(params):
    config = check(params)
    assert config.data.dataset == "fashion-mnist"
    assert config.extract.taps == tuple(params["extract"]["taps"])


def test_defaults_alone_are_valid():
    assert check({}).pretrain.train.ema_decay == 0.999  # params.yaml's (tests/unit/test_defaults.py: all of them)


@pytest.mark.parametrize(
    "mutate, key, fragment",
    [
        (lambda p: p["pretrain"]["train"].update(stepz=3), "pretrain.train.stepz", "unknown key"),
        (lambda p: p.update(extra={}), "extra", "unknown key"),
        (lambda p: p["pretrain"]["train"].update(steps="abc"), "pretrain.train.steps", "expected an integer"),
        (lambda p: p["pretrain"]["train"].update(steps=-5), "pretrain.train.steps", "must be >= 0"),
        (lambda p: p["pretrain"]["train"].update(lr=True), "pretrain.train.lr", "expected a number"),
        (lambda p: p["data"].update(dataset="mnist"), "data.dataset", "is not one of"),
        (lambda p: p["data"].update(val_fraction=1.5), "data.val_fraction", "(0, 1)"),
        (lambda p: p["extract"].update(taps="mid.res1"), "extract.taps", "expected a list"),
        (lambda p: p["extract"].update(pools=[1, 0]), "extract.pools[1]", "must be >= 1"),
        (lambda p: p["extract"].update(levels=[11, 2000]), "extract.levels[1]", "1..1000"),
        (lambda p: p["extract"].update(taps=["mid.res9"]), "extract.taps[0]", "unknown tap 'mid.res9'"),
        (lambda p: p["probe"].update(concat=[["mid.res1", "nope"]]), "probe.concat[0][1]", "unknown tap"),
        (lambda p: p["probe"].update(l2_extend=-1), "probe.l2_extend", "must be >= 0"),
        (lambda p: p["probe"].update(l2_bounds=[1.0, 0.1]), "probe.l2_bounds", "0 <= floor <= ceiling"),
        (lambda p: p["probe"].update(l2_bounds=[1e-8]), "probe.l2_bounds", "[floor, ceiling]"),
        (lambda p: p["pretrain"]["network"].update(name="resnet"), "pretrain.network.name", "unknown network"),
        (lambda p: p["register"].update(min_improvement=-1.5), "register.min_improvement", "must be in [-1, 1]"),
        (lambda p: p["register"].update(min_improvement=1.01), "register.min_improvement", "must be in [-1, 1]"),
        (lambda p: p["finetune"].update(enabled="yes"), "finetune.enabled", "expected true/false"),
        (lambda p: p["finetune"].update(backbone_lr_scale=-1), "finetune.backbone_lr_scale", "must be >= 0"),
        (lambda p: p["finetune"].update(patience=0), "finetune.patience", "must be >= 1"),
        (lambda p: p["label_efficiency"].update(fractions=[0.01, 1.5]), "label_efficiency.fractions[1]", "(0, 1]"),
        (lambda p: p["label_efficiency"].update(fractions=[0.1, 0.1]), "label_efficiency.fractions", "repeats"),
        (lambda p: p["predict"].update(novelty_false_alarm=0.0), "predict.novelty_false_alarm", "(0, 1)"),
        (lambda p: p["predict"].update(novelty_false_alarm=1), "predict.novelty_false_alarm", "(0, 1)"),
        (lambda p: p["diagnostics"].update(pairs=1), "diagnostics.pairs", "0 or >= 2"),
        (lambda p: p["diagnostics"].update(pool=3), "diagnostics.pool", "not in extract.pools"),
        (lambda p: p["pretrain"]["diffusion"].update(noise_label="index"), "pretrain.diffusion.noise_label",
         "is not one of"),
        (lambda p: p["pretrain"]["diffusion"].update(framework="edm", noise_label="fraction"),
         "pretrain.diffusion.noise_label", "applies to framework 'ddpm' only"),
        (lambda p: p["pretrain"]["samples"].update(variance="large"), "pretrain.samples.variance",
         "ancestral sampler only"),
        (lambda p: p["pretrain"]["samples"].update(variance="huge", sampler="ddpm"), "pretrain.samples.variance",
         "is not one of"),
        (lambda p: p["pretrain"]["samples"].update(sampler="edm"), "pretrain.samples.sampler",
         "does not sample framework 'ddpm'"),
        (lambda p: (p["pretrain"]["diffusion"].update(framework="edm"), p["pretrain"]["samples"].update(
            sampler="ddim")), "pretrain.samples.sampler", "does not sample framework 'edm'"),
    ],
)
def test_bad_values_name_the_key(params, mutate, key, fragment):
    bad = copy.deepcopy(params)
    mutate(bad)
    with pytest.raises(ConfigError) as info:
        check(bad)
    message = str(info.value)
    assert message.startswith("params.yaml: "), message
    assert key in message and fragment in message, message


def test_a_negative_gate_margin_is_valid(params):
    """A margin is a difference of accuracies: -1 promotes any challenger (outside experiments)."""
    params["register"]["min_improvement"] = -1
    assert check(params).register.min_improvement == -1


def test_paper_alias_is_a_valid_tap(params):
    params["extract"]["taps"] = ["out_1", "mid.res1"]
    params["probe"]["concat"] = [["out_1", "mid.res1"]]
    check(params)


def test_concat_tap_must_be_extracted(params):
    params["extract"]["taps"] = ["mid.res1"]
    params["probe"]["concat"] = [["mid.res1", "mid.res0"]]
    with pytest.raises(ConfigError, match=r"probe.concat\[0\]: tap 'mid.res0' is not in extract.taps"):
        check(params)


def test_sigma_indices_need_edm(params):
    params["extract"]["sigma_indices"] = [4]
    with pytest.raises(ConfigError, match="sigma_indices"):
        check(params)
    params["pretrain"]["diffusion"] = {"framework": "edm"}
    params["extract"]["levels"] = []
    check(params)


def test_finetune_is_off_in_the_shipped_cpu_profile(params):
    assert check(params).finetune.enabled is False
