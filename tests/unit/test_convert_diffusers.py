"""Diffusers' UNet2DModel converted into our UNet: same parameters, same function, and refusals by key.

Models are built with diffusers' own constructors and random weights (nothing is downloaded).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest
import torch

from ddae_core.nn import UNet, UNetConfig, count_parameters, network_config, paper_aliases
from ddae_core.pretrained.diffusers_unet import (
    DIFFUSERS_DEFAULTS,
    convert_unet_state,
    matching_network,
    unet_config_from_diffusers,
    unet_from_diffusers,
)
from ddae_core.pretrained.errors import ImportSourceError

# DDPM's CIFAR-10 UNet in google's values (google/ddpm-cifar10-32; attention_head_dim as the brief's null)
CIFAR10_DDPM: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": None,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
    "freq_shift": 1,
    "flip_sin_to_cos": False,
    "downsample_padding": 0,
}
# the same shape, small: two levels 32-64, attention on the 8x8 level and in the middle
TINY: dict[str, Any] = {
    **CIFAR10_DDPM,
    "sample_size": 16,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}


def _diffusers_unet(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A randomly initialised diffusers UNet2DModel (output conv included: diffusers does not zero it)."""
    import diffusers
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(**config).eval()


def _outputs(theirs: torch.nn.Module, ours: UNet, timesteps: list[int], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Both networks on the same batch of 2 (one timestep each), fp32."""
    c, r = ours.config.in_channels, ours.config.resolution
    x = torch.randn(2, c, r, r, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor(timesteps)
    with torch.no_grad():
        return theirs(x, t).sample, ours(x, t.float())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to fp32 rounding: 1e-4 of the output's scale."""
    return torch.allclose(a, b, rtol=0.0, atol=1e-4 * max(1.0, a.abs().max().item()))


@pytest.fixture(scope="module")
def cifar_pair() -> tuple[torch.nn.Module, UNet]:
    theirs = _diffusers_unet(CIFAR10_DDPM)
    return theirs, unet_from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()


def test_cifar10_ddpm_converts_to_ddpm_35m_with_every_parameter(cifar_pair) -> None:
    theirs, ours = cifar_pair
    converted = convert_unet_state(theirs.state_dict(), dict(theirs.config))
    assert set(converted) == set(ours.state_dict())
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in theirs.state_dict().values())
    assert count_parameters(ours) == count_parameters(theirs) == 35_746_307
    assert count_parameters(UNet(network_config("ddpm-35m", 3, 32))) == 35_746_307
    assert matching_network(ours.config) == "ddpm-35m"
    assert paper_aliases(ours.config)["out_6"] == "dec.8x8.res2"
    assert ours.config.norm_groups == 32 and ours.config.norm_eps == 1e-6
    assert ours.head[0].num_groups == 32  # conv_norm_out has the body's groups, though ddpm-35m's head has 8
    assert network_config("ddpm-35m", 3, 32).head_norm_groups == 8
    assert (ours.config.freq_shift, ours.config.flip_sin_to_cos, ours.config.down_padding) == (1.0, False, "tf_same")


@pytest.mark.parametrize("timesteps", [[0, 999], [17, 500]])
def test_cifar10_ddpm_computes_what_diffusers_computes(cifar_pair, timesteps: list[int]) -> None:
    theirs, ours = cifar_pair
    a, b = _outputs(theirs, ours, timesteps)
    assert a.abs().max() > 0.1  # a real output, not the zero of an untrained head
    assert _close(a, b), f"max abs diff {(a - b).abs().max().item():.3g}"


VARIANTS = {
    "ddpm": {},
    "padding-1": {"downsample_padding": 1},
    "cos-sin-shift-0": {"flip_sin_to_cos": True, "freq_shift": 0},
    "four-heads": {"attention_head_dim": 16},
    "top-attention-no-mid": {
        "down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D"),
        "add_attention": False,
        "in_channels": 1,
        "out_channels": 2,
        "layers_per_block": 1,
        "dropout": 0.1,
    },
    # only what shapes the model: every other key at diffusers' default (8-channel heads, [cos, sin], ...)
    "diffusers-defaults": {k: TINY[k] for k in ("sample_size", "block_out_channels", "down_block_types",
                                                "up_block_types", "norm_num_groups")},
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_variants_compute_what_diffusers_computes(name: str) -> None:
    config = {**TINY, **VARIANTS[name]} if name != "diffusers-defaults" else VARIANTS[name]
    theirs = _diffusers_unet(config)
    ours = unet_from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()
    assert count_parameters(ours) == count_parameters(theirs)
    heads = {m.heads for m in theirs.modules() if type(m).__name__ == "Attention"}
    assert heads in (set(), {ours.config.num_heads})
    for timesteps in ([0, 999], [250, 3]):
        a, b = _outputs(theirs, ours, timesteps)
        assert _close(a, b), f"{name} at {timesteps}: max abs diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize(
    ("field", "ours"),
    [("down_padding", "symmetric"), ("freq_shift", 0.0), ("flip_sin_to_cos", True), ("num_heads", 4),
     ("norm_groups", None)],
)
def test_each_option_is_needed_for_the_equality(field: str, ours: Any) -> None:
    """With one option back at our own value the same weights compute something else."""
    theirs = _diffusers_unet(TINY)
    state = convert_unet_state(theirs.state_dict(), dict(theirs.config))
    changed = UNet(dataclasses.replace(unet_config_from_diffusers(TINY), **{field: ours})).eval()
    changed.load_state_dict(state, strict=True)
    a, b = _outputs(theirs, changed, [10, 900])
    assert not _close(a, b)


def test_the_head_keeps_the_norm_groups_diffusers_gives_it() -> None:
    """diffusers' conv_norm_out takes norm_num_groups: a converted head with other groups computes something else."""
    theirs = _diffusers_unet(TINY)
    config = unet_config_from_diffusers(TINY)
    ours = unet_from_diffusers(theirs.state_dict(), dict(theirs.config)).eval()
    assert config.head_norm_groups is None and ours.head[0].num_groups == config.norm_groups == 8
    changed = UNet(dataclasses.replace(config, head_norm_groups=4)).eval()
    changed.load_state_dict(ours.state_dict(), strict=True)  # same parameters: groups change none
    assert changed.head[0].num_groups == 4
    assert _close(*_outputs(theirs, ours, [10, 900]))
    assert not _close(*_outputs(theirs, changed, [10, 900]))


def test_every_group_norm_takes_the_configured_groups_and_eps() -> None:
    def norms(net: torch.nn.Module) -> list[tuple[int, int, float]]:
        return sorted((m.num_channels, m.num_groups, m.eps) for m in net.modules() if isinstance(m, torch.nn.GroupNorm))

    ours = norms(UNet(unet_config_from_diffusers(TINY)))
    assert ours == norms(_diffusers_unet(TINY))
    assert {(groups, eps) for _, groups, eps in ours} == {(8, 1e-6)}


def test_our_defaults_are_unchanged_and_old_network_json_loads() -> None:
    config = network_config("ddpm-35m", 3, 32)
    new_fields = ("norm_groups", "head_norm_groups", "norm_eps", "freq_shift", "flip_sin_to_cos", "down_padding")
    old = {k: v for k, v in config.to_dict().items() if k not in new_fields}
    # a network.json from before head_norm_groups reloads as it was saved: its head with the body's groups
    # (and its sinusoid as it was trained: shift 0)
    assert UNetConfig.from_dict(old) == dataclasses.replace(config, head_norm_groups=None, freq_shift=0.0)
    assert UNetConfig.from_dict(config.to_dict()) == config
    assert (config.norm_groups, config.norm_eps, config.flip_sin_to_cos, config.down_padding) == \
        (None, 1e-5, False, "symmetric")
    assert (config.head_norm_groups, config.freq_shift) == (8, 1.0)  # the official code's head and sinusoid
    assert network_config("ddpm-cpu").freq_shift == 0.0 and network_config("ddpm-cpu").head_norm_groups is None


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"norm_groups": 48}, "norm_groups"), ({"head_norm_groups": 48}, "head_norm_groups"),
     ({"head_norm_groups": 0}, "head_norm_groups"), ({"freq_shift": 64.0}, "freq_shift"),
     ({"down_padding": "tf_same", "resample": "biggan"}, "down_padding"), ({"norm_eps": 0.0}, "norm_eps")],
)
def test_invalid_new_fields_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(network_config("ddpm-35m", 3, 32), **changes)


def test_defaults_table_is_diffusers_own() -> None:
    import diffusers
    params = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k != "self"}
    assert dict(DIFFUSERS_DEFAULTS) == theirs


def test_a_config_without_attention_head_dim_gets_diffusers_8_channel_heads() -> None:
    """google/ddpm-* config files leave attention_head_dim out: diffusers then builds 256 / 8 = 32 heads."""
    import diffusers
    config = {k: v for k, v in CIFAR10_DDPM.items() if k != "attention_head_dim"}
    ours = unet_config_from_diffusers(config)
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel.from_config(config)
    assert {m.heads for m in theirs.modules() if type(m).__name__ == "Attention"} == {ours.num_heads} == {32}
    assert matching_network(ours) == "ddpm-35m"  # heads change no parameter and no name


def test_matching_network_names_only_a_layout_in_networks() -> None:
    assert matching_network(unet_config_from_diffusers(TINY)) is None
    assert matching_network(dataclasses.replace(network_config("ddpm-small", 1, 28), dropout=0.0)) == "ddpm-small"
    assert matching_network(dataclasses.replace(network_config("ddpm-35m", 3, 32), num_res_blocks=3)) is None
    # head groups are numerics: either head matches the paper network's name, and nothing else does
    assert matching_network(dataclasses.replace(network_config("ddpm-35m", 3, 32), head_norm_groups=None)) == "ddpm-35m"
    assert matching_network(dataclasses.replace(network_config("ddpmpp-56m", 3, 32), head_norm_groups=32)) == "ddpmpp-56m"


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type"),
        ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"num_class_embeds": 10}, "num_class_embeds"),
        ({"act_fn": "gelu"}, "act_fn"),
        ({"center_input_sample": True}, "center_input_sample"),
        ({"mid_block_scale_factor": 2}, "mid_block_scale_factor"),
        ({"mid_block_type": None}, "mid_block_type"),
        ({"downsample_type": "resnet"}, "downsample_type"),
        ({"upsample_type": "resnet"}, "upsample_type"),
        ({"downsample_padding": 2}, "downsample_padding"),
        ({"time_embedding_dim": 64}, "time_embedding_dim"),
        ({"attn_norm_num_groups": 4}, "attn_norm_num_groups"),
        ({"down_block_types": ("DownBlock2D", "SkipDownBlock2D")}, r"down_block_types\[1\]"),
        ({"up_block_types": ("UpBlock2D", "UpBlock2D")}, r"up_block_types\[0\]"),
        ({"block_out_channels": (32, 48)}, r"block_out_channels\[1\]"),
        ({"attention_head_dim": 24}, "attention_head_dim"),
        ({"down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D"),
          "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D"), "attention_head_dim": 16}, "attention_head_dim"),
        ({"sample_size": None}, "sample_size"),
        ({"sample_size": 17}, "resolution"),
        ({"bogus_option": 1}, "bogus_option"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
    ],
)
def test_unrepresentable_configs_raise_naming_the_key(changes: dict, key: str) -> None:
    with pytest.raises(ImportSourceError, match=key):
        unet_config_from_diffusers({**TINY, **changes})


def test_a_state_dict_with_an_extra_missing_or_misshapen_key_raises_naming_it() -> None:
    theirs = _diffusers_unet(TINY)
    state, config = theirs.state_dict(), dict(theirs.config)
    with pytest.raises(ImportSourceError, match=r"extra\.weight"):
        convert_unet_state({**state, "extra.weight": torch.zeros(1)}, config)
    missing = {k: v for k, v in state.items() if k != "up_blocks.0.attentions.1.to_k.bias"}
    with pytest.raises(ImportSourceError, match=r"up_blocks\.0\.attentions\.1\.to_k\.bias missing"):
        convert_unet_state(missing, config)
    wrong = {**state, "conv_in.weight": torch.zeros(32, 3, 5, 5)}
    with pytest.raises(ImportSourceError, match=r"conv_in\.weight has shape"):
        convert_unet_state(wrong, config)


def test_pre_0_14_attention_names_convert_like_current_ones() -> None:
    """Old diffusers files name the attention weights query/key/value/proj_attn; diffusers renames on load."""
    theirs = _diffusers_unet(TINY)
    state, config = theirs.state_dict(), dict(theirs.config)
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, value in state.items():
        for new, old in legacy_names.items():
            key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert legacy.keys() != state.keys()
    converted, again = convert_unet_state(state, config), convert_unet_state(legacy, config)
    assert converted.keys() == again.keys() and all(torch.equal(converted[k], again[k]) for k in converted)
    twice = {**state, "mid_block.attentions.0.query.weight": state["mid_block.attentions.0.to_q.weight"]}
    with pytest.raises(ImportSourceError, match="two names"):
        convert_unet_state(twice, config)


def test_an_imported_save_pretrained_folder_is_converted_and_denoises_as_the_wrapped_model(tmp_path) -> None:
    """Through the importer: a UNet2DModel folder (safetensors, as save_pretrained writes it) is converted,
    and the converted denoiser equals the wrapped diffusers one."""
    import diffusers
    from ddae_core.pretrained.importer import import_network

    _diffusers_unet(TINY).save_pretrained(tmp_path)
    diffusers.DDPMScheduler(num_train_timesteps=1000).save_pretrained(tmp_path)
    converted, wrapped = import_network(tmp_path), import_network(tmp_path, convert=False)
    assert "converted into our UNet" in converted.form and "wrapped" in wrapped.form
    assert isinstance(converted.denoiser.unet, UNet)
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([1, 1000])
    with torch.no_grad():
        ours, theirs = converted.denoiser(x_t, t), wrapped.denoiser(x_t, t)
    assert _close(theirs, ours), f"max abs diff {(theirs - ours).abs().max().item():.3g}"


def test_a_published_google_ddpm_config_converts_with_one_attention_head_at_16x16():
    """google/ddpm-cat-256's config.json as published (keys and values), no weights: the 6-level DDPM UNet."""
    published = {
        "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
        "block_out_channels": [128, 128, 256, 256, 512, 512], "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                             "DownBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 256,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
    }
    config = unet_config_from_diffusers(published)
    assert config.channel_mults == (1, 1, 2, 2, 4, 4) and config.attn_resolutions == (16,)
    assert config.num_heads == 1 and config.resolution == 256 and config.norm_eps == 1e-6
