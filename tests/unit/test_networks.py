"""Tests for the networks: parameter counts of the paper's UNets, shapes, tap names, aliases, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from ddae_core.nn import NETWORKS, UNet, UNetConfig, build_unet, count_parameters, network_config, paper_aliases
from ddae_core.nn.layers import group_norm, sinusoidal_embedding
from flows.cli import main


def _meta_unet(name: str, **kwargs: object) -> UNet:
    with torch.device("meta"):
        return build_unet(name, **kwargs)


def test_ddpm_35m_has_the_official_parameter_count() -> None:
    net = build_unet("ddpm-35m", 3, 32)
    assert count_parameters(net) == 35_746_307


@pytest.mark.parametrize(("name", "size"), [("ddpm-35m", 32), ("ddpmpp-56m", 32), ("ddpmpp-64", 64)])
def test_official_networks_normalise_the_head_with_8_groups_at_the_same_parameter_count(name: str, size: int) -> None:
    """The official DDAE UNet: GroupNorm(8) before the last conv, GroupNorm(32) everywhere else."""
    net = _meta_unet(name, in_channels=3, resolution=size)
    head = net.head[0]
    assert isinstance(head, torch.nn.GroupNorm) and head.num_groups == 8
    body = {m.num_groups for m in net.modules() if isinstance(m, torch.nn.GroupNorm) and m is not head}
    assert body == {32}
    same_body_head = _meta_unet(name, in_channels=3, resolution=size, head_norm_groups=None)
    assert same_body_head.head[0].num_groups == 32
    assert count_parameters(net) == count_parameters(same_body_head)


@pytest.mark.parametrize("name", ["ddpm-35m", "ddpmpp-56m", "ddpmpp-64"])
def test_official_networks_embed_the_label_with_the_official_frequencies(name: str) -> None:
    """The official TimeEmbedding: frequencies 10000 ** (-i / (half - 1)), i < half = 64, then [sin, cos]."""
    config = network_config(name)
    label = torch.tensor([11 / 1000, 1.0, -0.7])  # t/T as the official DDPM feeds it; an EDM ln(sigma)/4
    half = config.base_channels // 2
    freqs = torch.tensor([10_000.0 ** (-i / (half - 1)) for i in range(half)])
    expected = torch.cat([torch.sin(label[:, None] * freqs), torch.cos(label[:, None] * freqs)], dim=1)
    ours = sinusoidal_embedding(label, config.base_channels, freq_shift=config.freq_shift,
                                flip_sin_to_cos=config.flip_sin_to_cos)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert not torch.allclose(sinusoidal_embedding(label, config.base_channels), expected, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm-small", "ddpm-cpu", "ddpm-tiny"])
def test_our_own_networks_keep_the_bodys_groups_in_the_head(name: str) -> None:
    net = _meta_unet(name)
    assert net.config.head_norm_groups is None
    assert net.head[0].num_groups == group_norm(net.head[0].num_channels).num_groups


def test_ddpmpp_56m_is_within_half_a_percent_of_56_5m() -> None:
    count = count_parameters(_meta_unet("ddpmpp-56m", in_channels=3, resolution=32))
    assert abs(count - 56_500_000) / 56_500_000 < 0.005


def test_small_nets_stay_small() -> None:
    assert 1_400_000 < count_parameters(_meta_unet("ddpm-small", in_channels=1, resolution=32)) < 1_800_000
    assert count_parameters(_meta_unet("ddpm-tiny")) < 300_000


@pytest.mark.parametrize(
    ("name", "channels", "resolution", "overrides"),
    [
        ("ddpm-tiny", 1, 28, {}),
        ("ddpm-tiny", 3, 64, {}),
        ("ddpm-tiny", 3, 32, {"resample": "biggan", "attn_resolutions": (16,), "mid_attn": True}),
        ("ddpm-small", 1, 28, {}),
        ("ddpm-small", 3, 32, {"num_heads": 2, "dropout": 0.0}),
    ],
)
def test_forward_preserves_shape(name: str, channels: int, resolution: int, overrides: dict) -> None:
    torch.manual_seed(0)
    net = build_unet(name, channels, resolution, zero_init_output=False, **overrides).eval()
    x = torch.randn(2, channels, resolution, resolution)
    out = net(x, torch.tensor([3.0, -0.7]))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_out_channels_override_changes_only_the_channel_dimension() -> None:
    net = build_unet("ddpm-tiny", 1, 16, out_channels=2)
    assert net(torch.randn(3, 1, 16, 16), torch.zeros(3)).shape == (3, 2, 16, 16)


@pytest.mark.parametrize("overrides", [{}, {"resample": "biggan", "attn_resolutions": (8,)}])
def test_taps_resolve_run_in_forward_order_and_match_their_declared_shapes(overrides: dict) -> None:
    net = build_unet("ddpm-small", 1, 16, **overrides).eval()
    names = net.tap_names()
    assert len(names) == len(set(names))
    seen: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name in names:
        module = net.get_submodule(name)

        def hook(_module: torch.nn.Module, _inputs: object, output: torch.Tensor, name: str = name) -> None:
            seen.append(name)
            shapes[name] = tuple(output.shape)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            net(torch.randn(2, 1, 16, 16), torch.tensor([1.0, 500.0]))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == names
    for name, (channels, resolution) in net.tap_channels().items():
        assert shapes[name] == (2, channels, resolution, resolution), name
    assert names[:3] == ["enc.16x16.res0", "enc.16x16.res1", "enc.16x16.down"]
    assert ["mid.res0", "mid.attn", "mid.res1"] == [n for n in names if n.startswith("mid.")]
    assert names[-1] == "dec.16x16.res2"


def test_attention_lives_inside_its_res_block() -> None:
    net = _meta_unet("ddpm-35m")
    assert net.get_submodule("dec.16x16.res1").attn is not None
    assert net.get_submodule("dec.8x8.res1").attn is None


def test_paper_aliases_count_decoder_res_blocks_deepest_first() -> None:
    config = network_config("ddpm-35m", 3, 32)
    aliases = paper_aliases(config)
    assert list(aliases) == [f"out_{k}" for k in range(1, 13)]  # 4 levels x (2 + 1) res blocks
    assert aliases["out_1"] == "dec.4x4.res0"
    assert aliases["out_6"] == "dec.8x8.res2"  # the paper's DDPM choice
    assert aliases["out_12"] == "dec.32x32.res2"
    net = _meta_unet("ddpm-35m")
    for ours in aliases.values():
        net.get_submodule(ours)
    plus = paper_aliases(network_config("ddpmpp-56m", 3, 32))
    assert len(plus) == 15  # 3 levels x (4 + 1); up-samplers are not counted
    assert plus["out_7"] == "dec.16x16.res1"  # the paper's EDM choice
    assert set(plus.values()) <= set(_meta_unet("ddpmpp-56m").tap_names())


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"resolution": 30}, "resolution"),
        ({"attn_resolutions": (5,)}, "attn_resolutions"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_heads": 3}, "num_heads"),
        ({"base_channels": 15}, "base_channels"),
        ({"channel_mults": ()}, "channel_mults"),
        ({"num_res_blocks": 0}, "num_res_blocks"),
        ({"resample": "pixelshuffle"}, "resample"),
        ({"out_channels": 0}, "out_channels"),
    ],
)
def test_invalid_configs_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UNetConfig(**changes)


def test_config_round_trips_through_json_and_rejects_unknown_keys() -> None:
    config = network_config("ddpmpp-56m", 1, 64, dropout=0.13)
    data = json.loads(json.dumps(config.to_dict()))
    assert isinstance(data["channel_mults"], list)
    assert UNetConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="channel_mults"):
        UNetConfig.from_dict({**data, "channel_mults": "1,2"})


def test_unknown_network_and_override_are_reported_by_name() -> None:
    with pytest.raises(ValueError, match="ddpm-35m"):
        build_unet("resnet50", 3, 32)
    with pytest.raises(ValueError, match="widht"):
        network_config("ddpm-tiny", widht=3)


def test_factories_place_attention_on_the_level_nearest_16_at_any_resolution() -> None:
    """DDPM's choice (16x16 at 32x32 and at 256x256 input): a photo folder read at 64x64 does not pay
    for attention over 32x32 = 1024 positions."""
    for name in ("ddpm-35m", "ddpmpp-56m", "ddpm-small", "ddpm-cpu", "ddpmpp-64"):
        assert NETWORKS[name](in_channels=3, resolution=32).attn_resolutions == (16,)
        assert NETWORKS[name](in_channels=3, resolution=64).attn_resolutions == (16,)
    assert NETWORKS["ddpm-small"](resolution=28).attn_resolutions == (14,)  # the default run, as before
    assert NETWORKS["ddpm-cpu"](resolution=48).attn_resolutions == (12,)  # 12 is nearer 16 than 24
    assert NETWORKS["ddpm-cpu"](resolution=40).attn_resolutions == (20,)


def test_zero_init_output_gives_zeros_and_random_init_does_not() -> None:
    x, label = torch.randn(2, 1, 16, 16), torch.tensor([10.0, 20.0])
    torch.manual_seed(0)
    default = build_unet("ddpm-tiny", 1, 16).eval()
    assert torch.count_nonzero(default(x, label)) == 0
    torch.manual_seed(0)
    random = build_unet("ddpm-tiny", 1, 16, zero_init_output=False).eval()
    assert random(x, label).abs().mean() > 1e-4
    convs = [m for m in random.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.count_nonzero(conv.weight) > 0 for conv in convs)


def test_noise_label_conditions_the_output_and_every_parameter_gets_a_gradient() -> None:
    torch.manual_seed(0)
    net = build_unet("ddpm-tiny", 1, 16, zero_init_output=False).eval()
    x = torch.randn(1, 1, 16, 16).repeat(2, 1, 1, 1)
    out = net(x, torch.tensor([1.0, 900.0]))
    assert (out[0] - out[1]).abs().max() > 1e-4
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_sinusoidal_embedding_separates_labels_including_negative_ones() -> None:
    labels = torch.tensor([-2.0, -1.9, 0.0, 1.0, 2.0, 999.0])
    emb = sinusoidal_embedding(labels, 64)
    assert emb.shape == (6, 64)
    assert emb.abs().max() <= 1.0
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 0.05


def test_group_norm_falls_back_to_fewer_groups_of_at_least_four_channels() -> None:
    assert group_norm(256).num_groups == 32
    assert group_norm(128).num_groups == 32
    assert group_norm(32).num_groups == 8
    assert group_norm(48).num_groups == 12
    assert group_norm(3).num_groups == 1


def test_cli_networks_lists_exact_counts_and_taps(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["networks"]) == 0
    table = capsys.readouterr().out
    for name in NETWORKS:
        assert name in table
    assert "35746307" in table.split("ddpm-35m", 1)[1].splitlines()[0]
    assert main(["networks", "--taps", "--in-channels", "1", "--resolution", "28"]) == 0
    detailed = capsys.readouterr().out
    assert "invalid" in detailed.split("ddpm-35m", 1)[1].splitlines()[0]  # 28 is not a multiple of 8
    assert "1x28x28" in detailed
    assert any("dec.14x14.res2" in line and "out_6" in line for line in detailed.splitlines())
