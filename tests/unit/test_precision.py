"""`mixed_precision: auto` picks bf16 only where the hardware has it; explicit choices pass through, and
bf16 asked of a CPU that only emulates it is recognised."""

import pytest
import torch

from ddae_core.config import ConfigError, ExtractConfig, TrainConfig, section_from_dict
from ddae_core.precision import emulated_bf16, native_bf16, resolve_feature_precision, resolve_mixed_precision


@pytest.mark.parametrize("requested", ["no", "bf16", "fp16"])
def test_explicit_precision_is_kept(requested):
    assert resolve_mixed_precision(requested, "cpu") == requested


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "no"),
])
def test_auto_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16("cpu") is (expected == "bf16")
    assert resolve_mixed_precision("auto", "cpu") == expected


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_emulated_only_when_asked_of_a_cpu_without_it(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert emulated_bf16("bf16", "cpu") is (not native)
    assert not emulated_bf16(resolve_mixed_precision("auto", "cpu"), "cpu")  # auto never asks for it
    assert not emulated_bf16("no", "cpu") and not emulated_bf16("fp32", "cpu")
    assert not emulated_bf16("bf16", "cuda")


@pytest.mark.parametrize(("bf16_card", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_prefers_bf16_then_fp16(monkeypatch, bf16_card, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_card)
    assert resolve_mixed_precision("auto", "cuda") == expected


def test_train_config_accepts_auto_and_names_a_bad_value():
    assert TrainConfig(mixed_precision="auto").mixed_precision == "auto"
    with pytest.raises(ConfigError, match="pretrain.train.mixed_precision"):
        section_from_dict(TrainConfig, {"mixed_precision": "bf17"}, "pretrain.train")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_feature_precision_auto_is_bf16_only_where_native_and_explicit_choices_pass(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert resolve_feature_precision("auto", "cpu") == expected
    assert [resolve_feature_precision(p, "cpu") for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    with pytest.raises(ValueError, match="'no'"):
        resolve_feature_precision("no", "cpu")  # mixed_precision's word for fp32 is not a feature precision
    with pytest.raises(ConfigError, match="extract.precision"):
        section_from_dict(ExtractConfig, {"precision": "fp16"}, "extract")
