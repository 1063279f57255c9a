"""Importing models trained elsewhere: wrapped diffusers UNets and latent DiTs compute exactly what diffusers
computes, taps are the diffusers blocks, the network round-trips through network.json, and bad sources fail
by name without running anything shipped inside them."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ddae_core.checkpoint import load_network, save_network
from ddae_core.config import ConfigError, InitConfig
from ddae_core.features import extract_batch, pool
from ddae_core.noise import sample_noise
from ddae_core.pretrained.describe import describe_imported
from ddae_core.pretrained.errors import ImportSourceError
from ddae_core.pretrained.importer import import_network, input_shape_of, locate, source_checksum

from diffusers_models import save_dit_pipeline, save_unet, tiny_unet


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    return save_unet(tmp_path_factory.mktemp("unet") / "model")


def test_a_wrapped_unet_predicts_the_eps_diffusers_computes_at_the_zero_based_step(unet_folder):
    imported = import_network(unet_folder)
    assert "wrapped" in imported.form  # scale-shift conditioning: our UNet cannot express it, so it is wrapped
    reference = tiny_unet().eval()  # the same seed: the same weights as the saved model
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 11, 700])
    with torch.no_grad():
        ours = imported.denoiser(x, t)
        theirs = reference(x, t - 1).sample  # diffusers counts steps from 0; our t counts from 1
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, reference(x, t).sample, atol=1e-5)  # the step offset is not a no-op


def test_a_wrapped_taps_features_equal_a_hook_on_the_diffusers_block(unet_folder):
    imported = import_network(unet_folder)
    reference = tiny_unet().eval()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    ids = [3, 1, 4, 1]
    tap = imported.denoiser.unet.tap_selectors()["out_2"][0]
    assert tap == "up_blocks.0.attentions.1"  # the paper's out_N counts an attention level's attention output
    features = extract_batch(imported.denoiser, x0, ids, taps=[tap], levels=[11.0], pools=[1, 2], seed=5)

    seen = {}
    handle = reference.get_submodule(tap).register_forward_hook(lambda m, i, out: seen.setdefault("out", out))
    noise = sample_noise(5, ids, 11.0, (1, 16, 16))
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[10].float()
    with torch.no_grad():
        reference(alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, torch.full((4,), 10.0))
    handle.remove()
    for grid in (1, 2):
        assert torch.allclose(torch.from_numpy(features[(tap, 11.0, grid)]), pool(seen["out"], grid), atol=1e-5)


def test_selectors_name_the_same_roles_as_on_our_unet(unet_folder):
    backbone = import_network(unet_folder).denoiser.unet
    selectors, names = backbone.tap_selectors(), backbone.tap_names()
    assert selectors["mid"] == ("mid_block",)
    assert selectors["decoder"] == selectors["dec1"] + selectors["dec2"]
    assert selectors["dec2"] == ("up_blocks.1.resnets.0", "up_blocks.1.resnets.1")
    assert all(block in names for blocks in selectors.values() for block in blocks)
    assert names.index("mid_block") < names.index("up_blocks.0.resnets.0")  # forward order: early stop is safe


def test_wrapped_and_latent_networks_round_trip_through_network_json(unet_folder, tmp_path):
    dit = import_network(save_dit_pipeline(tmp_path / "dit"))
    for imported, tap in ((import_network(unet_folder), "mid_block"), (dit, "transformer_blocks.1")):
        save_network(tmp_path / "net", imported.denoiser, {"diffusion": imported.diffusion})
        back = load_network(tmp_path / "net")
        assert json.loads((tmp_path / "net" / "network.json").read_text())["kind"] == imported.denoiser.spec()["kind"]
        channels, size = imported.denoiser.input_shape
        x0 = torch.rand(2, channels, size, size) * 2 - 1
        before = extract_batch(imported.denoiser, x0, [0, 1], taps=[tap], levels=[121.0], pools=[1], seed=0)
        after = extract_batch(back, x0, [0, 1], taps=[tap], levels=[121.0], pools=[1], seed=0)
        assert (before[(tap, 121.0, 1)] == after[(tap, 121.0, 1)]).all()


def test_a_dit_reads_vae_latents_with_the_null_class_and_mean_pools_its_tokens(tmp_path):
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    folder = save_dit_pipeline(tmp_path / "dit")
    imported = import_network(folder)
    assert imported.denoiser.input_shape == (3, 16) == input_shape_of(folder)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    tap = imported.denoiser.unet.tap_selectors()["mid"][0]
    assert tap == "transformer_blocks.1"
    features = extract_batch(imported.denoiser, x0, [7, 8], taps=[tap], levels=[121.0], pools=[1], seed=2)

    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    transformer = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    seen = {}
    transformer.get_submodule(tap).register_forward_hook(lambda m, i, out: seen.setdefault("out", out))
    with torch.no_grad():
        z0 = vae.encode(x0).latent_dist.mean * 0.18215
        alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[120].float()
        zt = alpha_bar.sqrt() * z0 + (1 - alpha_bar).sqrt() * sample_noise(2, [7, 8], 121.0, (4, 8, 8))
        transformer(zt, timestep=torch.full((2,), 120.0), class_labels=torch.full((2,), 10))  # 10 = the null class
    assert torch.allclose(torch.from_numpy(features[(tap, 121.0, 1)]), seen["out"].mean(dim=1), atol=1e-5)


def test_networks_from_lists_every_tap_with_its_width_output_and_roles(unet_folder):
    text = describe_imported(import_network(unet_folder))
    assert "wrapped" in text and "input 1x16x16" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.startswith(("up_", "mid_"))}
    assert rows["mid_block"][:2] == ["32", "8x8"] and "mid" in rows["mid_block"]
    assert rows["up_blocks.1.resnets.1"][:2] == ["16", "16x16"] and "out_4" in rows["up_blocks.1.resnets.1"]


def test_the_checksum_follows_the_weights_not_the_folder(unet_folder, tmp_path):
    copy = save_unet(tmp_path / "copy", tiny_unet())
    assert source_checksum(copy) == source_checksum(unet_folder)
    save_unet(tmp_path / "other", tiny_unet(seed=1))
    assert source_checksum(tmp_path / "other") != source_checksum(unet_folder)


# --- bad sources: named, and nothing inside them runs -------------------------------------------------


def test_unknown_and_missing_sources_are_named(tmp_path, unet_folder):
    with pytest.raises(ImportSourceError, match=r"no/such/place: no such file or folder"):
        locate(str(tmp_path / "no/such/place"))
    with pytest.raises(ImportSourceError, match=r"not a model folder we read"):
        import_network(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ImportSourceError, match=r"notes.txt: a single file"):
        import_network(tmp_path / "notes.txt")
    weights = unet_folder.parent / "no-weights"
    weights.mkdir()
    (weights / "config.json").write_text((unet_folder / "config.json").read_text())
    (weights / "scheduler_config.json").write_text((unet_folder / "scheduler_config.json").read_text())
    with pytest.raises(ImportSourceError, match=r"no-weights: no weights file diffusion_pytorch_model.safetensors"):
        import_network(weights)


def test_a_hub_id_that_cannot_be_fetched_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportSourceError, match=r"google/ddpm-nonexistent-0: not a local folder, and the Hugging Face"):
        locate("google/ddpm-nonexistent-0")


def test_formats_and_schedules_we_do_not_read_are_named(tmp_path, unet_folder):
    other = tmp_path / "vq"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(ImportSourceError, match=r"config.json: model class 'VQModel' is not one we read"):
        import_network(other)
    cosine = save_unet(tmp_path / "cosine")
    config = json.loads((cosine / "scheduler_config.json").read_text())
    (cosine / "scheduler_config.json").write_text(json.dumps({**config, "beta_schedule": "squaredcos_cap_v2"}))
    with pytest.raises(ImportSourceError, match=r"beta_schedule 'squaredcos_cap_v2' is not supported"):
        import_network(cosine)
    lone = tmp_path / "lone"
    tiny_unet().save_pretrained(lone)
    with pytest.raises(ImportSourceError, match=r"no scheduler_config.json"):
        import_network(lone)


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_is_read_weights_only_and_one_holding_code_is_refused_unrun(tmp_path, unet_folder):
    safe = save_unet(tmp_path / "bin")
    state = tiny_unet().state_dict()
    (safe / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, safe / "diffusion_pytorch_model.bin")  # plain tensors: read with weights_only
    assert "wrapped" in import_network(safe).form

    marker = tmp_path / "pwned"
    torch.save({**state, "payload": _Payload(str(marker))}, safe / "diffusion_pytorch_model.bin")
    with pytest.raises(ImportSourceError, match=r"diffusion_pytorch_model.bin: refused: this pickle holds more"):
        import_network(safe)
    assert not marker.exists()


def test_init_modes_need_a_source_and_scratch_refuses_one():
    with pytest.raises(ConfigError, match=r"source: mode 'import' needs a source"):
        InitConfig(mode="import")
    with pytest.raises(ConfigError, match=r"mode: is 'scratch' but source is 'x'"):
        InitConfig(source="x")
    assert InitConfig(mode="adapt", source="x").convert


def test_the_from_scratch_baseline_of_an_imported_network_is_its_architecture_with_fresh_weights(unet_folder,
                                                                                                  tmp_path):
    from tasks.finetune import random_denoiser

    imported = import_network(unet_folder)
    save_network(tmp_path / "net", imported.denoiser, {"diffusion": imported.diffusion})
    fresh, again = random_denoiser(tmp_path / "net", seed=1), random_denoiser(tmp_path / "net", seed=1)  # saved: seed 0
    trained, drawn = imported.denoiser.state_dict(), fresh.state_dict()
    assert type(fresh.unet) is type(imported.denoiser.unet) and drawn.keys() == trained.keys()
    assert any(not torch.equal(drawn[k], trained[k]) for k in trained)  # new weights ...
    assert all(torch.equal(drawn[k], again.state_dict()[k]) for k in drawn)  # ... drawn from the seed


def test_pipeline_folders_and_the_old_hub_layout_import_the_same_unet(tmp_path):
    pipeline = tmp_path / "pipeline"
    save_unet(pipeline / "unet")
    (pipeline / "scheduler").mkdir()
    (pipeline / "unet" / "scheduler_config.json").rename(pipeline / "scheduler" / "scheduler_config.json")
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}
    (pipeline / "model_index.json").write_text(json.dumps(index))
    flat = save_unet(tmp_path / "flat")  # as google/ddpm-cifar10-32: the UNet's files beside model_index.json
    (flat / "model_index.json").write_text(json.dumps(index))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 50])
    with torch.no_grad():
        outputs = [import_network(folder).denoiser(x, t) for folder in (pipeline, flat)]
    assert torch.equal(outputs[0], outputs[1])
    assert input_shape_of(pipeline) == input_shape_of(flat) == (1, 16)


def test_params_with_an_import_are_not_checked_against_the_named_network():
    from ddae_core.config import PipelineConfig
    from ddae_core.validation import validate_pipeline

    params = {"data": {"dataset": "imagefolder", "source": "x", "image_size": 30},  # ddpm-cpu needs a multiple of 4
              "extract": {"taps": ["transformer_blocks.3"]}, "probe": {"concat": []}}
    with pytest.raises(ConfigError, match=r"pretrain.network.name: 'ddpm-cpu' does not fit"):
        validate_pipeline(PipelineConfig.from_dict(params))
    imported = {**params, "pretrain": {"init": {"mode": "import", "source": "/models/dit"}}}
    validate_pipeline(PipelineConfig.from_dict(imported))  # the imported network's taps: checked by pretrain
