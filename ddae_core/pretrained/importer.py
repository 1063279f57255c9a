"""Import a diffusion model trained elsewhere as a denoiser of ours: find it, read it safely, convert or wrap.

Sources (``pretrain.init.source``): a folder written by ``save_pretrained`` (a diffusers ``UNet2DModel``
beside its ``scheduler_config.json``, or a pipeline folder with ``model_index.json``: ``unet/`` +
``scheduler/``, or DiT's ``transformer/`` + ``vae/`` + ``scheduler/``), another ddae project's network
folder (``network.json`` + ``network.safetensors``), or a Hugging Face hub id (downloaded once, JSON and
weights only). A UNet2DModel whose architecture ours expresses exactly is converted into our UNet
(the paper's tap names and our fast CPU forms apply); any other is wrapped, its blocks kept as taps.
No code shipped with a model is run: configs are JSON, classes are ours, weights are safetensors or a
weights-only unpickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ddae_core.config import ConfigError, DiffusionConfig
from ddae_core.data.snapshot import files_checksum
from ddae_core.pretrained.configs import dit_image_size, unet_input_shape
from ddae_core.pretrained.errors import ImportSourceError
from ddae_core.pretrained.weights import read_weights, weight_files

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"[\w][\w.-]*/[\w][\w.-]*")  # owner/name
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
UNET_CLASS, DIT_CLASS, VAE_CLASS = "UNet2DModel", "DiTTransformer2DModel", "AutoencoderKL"
SCHEDULER_CONFIG = "scheduler_config.json"
NETWORK_FILES = ("network.json", "network.safetensors")


@dataclass(frozen=True)
class ImportedNetwork:
    """A denoiser read from a source (weights loaded, eval mode), its noise schedule, and how it was read."""

    denoiser: nn.Module
    diffusion: DiffusionConfig
    form: str  # e.g. "diffusers UNet2DModel converted into our UNet (ddpm-35m)"
    location: Path
    checksum: str  # sha256 over every config and weights file read (``checksum_of``): the weights' version


@dataclass(frozen=True)
class Layout:
    """What a source folder holds: its format and the folder of each component it needs."""

    form: str  # "ddae", "unet" (a diffusers UNet2DModel) or "dit" (DiT + VAE)
    components: dict[str, Path]  # "network" | "unet" | "transformer" | "vae" | "scheduler" -> folder

    def files(self) -> list[Path]:
        """Every file the import reads, in a fixed order."""
        found: list[Path] = []
        for name, folder in sorted(self.components.items()):
            if name == "network":
                found += [folder / f for f in NETWORK_FILES]
            elif name == "scheduler":
                found.append(folder / SCHEDULER_CONFIG)
            else:
                found += [folder / "config.json", *weight_files(folder, DIFFUSERS_WEIGHTS)]
        return found


def checksum_of(files: tuple[Path, ...] | list[Path]) -> str:
    """sha256 over ``files`` (paths relative to their common folder, and bytes): the weights' version."""
    base = Path(os.path.commonpath([str(path.parent) for path in files]))
    return files_checksum(base, list(files))


def source_checksum(folder: Path) -> str:
    """The checksum an import of ``folder`` would record, without building the model."""
    return checksum_of(layout(folder).files())


def input_shape_of(folder: Path) -> tuple[int, int]:
    """(channels, size) of the images the model in ``folder`` reads, from its JSON alone (prepare's ``auto``)."""
    found = layout(folder)
    if found.form == "ddae":
        meta = _read_json(folder / NETWORK_FILES[0])
        kind = meta.get("kind", "unet")
        if kind == "unet":
            return int(meta["unet"]["in_channels"]), int(meta["unet"]["resolution"])
        if kind == "latent-dit":
            return 3, int(meta["image_size"])
        config = meta["diffusers"]
    elif found.form == "unet":
        config = _read_json(found.components["unet"] / "config.json")
    else:
        transformer, vae = (_read_json(found.components[name] / "config.json") for name in ("transformer", "vae"))
        return 3, dit_image_size(transformer, vae)
    return unet_input_shape(config)


def locate(source: str) -> Path:
    """The local folder of ``source``: itself, or a hub id's downloaded snapshot (configs and weights only)."""
    if not source:
        raise ImportSourceError("pretrain.init.source is empty: name a folder or a Hugging Face hub id")
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not HUB_ID.fullmatch(source):
        raise ImportSourceError(f"{source}: no such file or folder (nor a Hugging Face hub id owner/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.rglob("*.safetensors")):  # an older repo: weights-only pickles are read safely
            folder = Path(snapshot_download(source, allow_patterns=["*.json", "*.bin"]))
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, gated: all one message
        raise ImportSourceError(f"{source}: not a local folder, and the Hugging Face hub could not provide "
                                f"it ({type(err).__name__}: {err})") from None
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ImportSourceError(f"{path}: cannot read ({err})") from None
    if not isinstance(data, dict):
        raise ImportSourceError(f"{path}: expected a JSON object")
    return data


def _scheduler_near(folder: Path) -> Path:
    for candidate in (folder, folder.parent / "scheduler"):
        if (candidate / SCHEDULER_CONFIG).is_file():
            return candidate
    raise ImportSourceError(f"{folder}: no {SCHEDULER_CONFIG} beside the model or in ../scheduler/: the noise "
                            "schedule it was trained with is needed (save the scheduler into the same folder)")


def layout(folder: Path) -> Layout:
    """Detect the format of ``folder``; anything else is an ``ImportSourceError`` saying what we read."""
    if folder.is_file():
        raise ImportSourceError(f"{folder}: a single file; give the folder it came in (a diffusers save_pretrained "
                                "folder or a ddae network folder), whose JSON says how to build the model")
    if (folder / NETWORK_FILES[0]).is_file():
        return Layout("ddae", {"network": folder})
    # a pipeline folder; old hub repos (google/ddpm-*) keep the UNet's files at the top instead, read below
    if (folder / "model_index.json").is_file() and not (folder / "config.json").is_file():
        index = _read_json(folder / "model_index.json")
        classes = {name: value[1] for name, value in index.items()
                   if isinstance(value, list) and len(value) == 2 and isinstance(value[1], str)}
        if classes.get("unet") == UNET_CLASS and "scheduler" in classes:
            return Layout("unet", {"unet": folder / "unet", "scheduler": folder / "scheduler"})
        if classes.get("transformer") == DIT_CLASS and classes.get("vae") == VAE_CLASS and "scheduler" in classes:
            return Layout("dit", {"transformer": folder / "transformer", "vae": folder / "vae",
                                  "scheduler": folder / "scheduler"})
        raise ImportSourceError(f"{folder / 'model_index.json'}: a pipeline of {classes or 'unknown parts'}; we read "
                                f"unet ({UNET_CLASS}) + scheduler, or transformer ({DIT_CLASS}) + vae + scheduler")
    if (folder / "config.json").is_file():
        name = _read_json(folder / "config.json").get("_class_name")
        if name == UNET_CLASS:
            return Layout("unet", {"unet": folder, "scheduler": _scheduler_near(folder)})
        if name == DIT_CLASS:
            parent = folder.parent
            if (parent / "vae" / "config.json").is_file():
                return Layout("dit", {"transformer": folder, "vae": parent / "vae",
                                      "scheduler": _scheduler_near(folder)})
            raise ImportSourceError(f"{folder}: a DiT needs its VAE: give the pipeline folder "
                                    "(transformer/, vae/, scheduler/)")
        raise ImportSourceError(f"{folder / 'config.json'}: model class {name!r} is not one we read "
                                f"({UNET_CLASS}, {DIT_CLASS} with its {VAE_CLASS})")
    raise ImportSourceError(f"{folder}: not a model folder we read: no network.json (a ddae network), "
                            "model_index.json (a diffusers pipeline) or config.json (a diffusers model)")


def diffusion_from_scheduler(folder: Path) -> DiffusionConfig:
    """Our DDPM settings for a diffusers scheduler config (linear betas, eps prediction), or an error naming the key."""
    path = folder / SCHEDULER_CONFIG
    config = _read_json(path)
    checks = {"beta_schedule": ("linear", config.get("beta_schedule", "linear")),
              "prediction_type": ("epsilon", config.get("prediction_type", "epsilon"))}
    for key, (wanted, value) in checks.items():
        if value != wanted:
            raise ImportSourceError(f"{path}: {key} {value!r} is not supported (we run {key} {wanted!r})")
    if config.get("trained_betas"):
        raise ImportSourceError(f"{path}: trained_betas are not supported (a linear beta schedule is)")
    try:
        return DiffusionConfig(framework="ddpm", timesteps=int(config.get("num_train_timesteps", 1000)),
                               beta_start=float(config.get("beta_start", 1e-4)),
                               beta_end=float(config.get("beta_end", 0.02)))
    except ConfigError as err:
        raise ImportSourceError(f"{path}: {err}") from None


def _strict(module: nn.Module, state: dict, where: Path) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ImportSourceError(f"{where}: weights do not fit its config: {err}") from None


def _unet(folder: Path, diffusion: DiffusionConfig, convert: bool) -> tuple[nn.Module, str]:
    """A diffusers UNet2DModel as our UNet when ours expresses it exactly (and ``convert``), else wrapped."""
    from ddae_core.diffusion import build_denoiser

    config = _read_json(folder / "config.json")
    state = read_weights(weight_files(folder, DIFFUSERS_WEIGHTS))
    if convert:
        from ddae_core.pretrained.diffusers_unet import (
            matching_network,
            unet_config_from_diffusers,
            unet_from_diffusers,
        )

        try:
            unet_config_from_diffusers(config)
        except ImportSourceError as err:  # an architecture ours does not express exactly: wrapped instead
            log.info("%s: wrapped, not converted: %s", folder, err)
        else:
            try:
                unet = unet_from_diffusers(state, config)
            except RuntimeError as err:
                raise ImportSourceError(f"{folder}: weights do not fit its config: {err}") from None
            name = matching_network(unet.config)
            form = f"{UNET_CLASS} converted into our UNet" + (f" ({name})" if name else "")
            return build_denoiser(diffusion, unet, noise_label="index"), form
    from ddae_core.pretrained.wrapped import DiffusersUNet

    unet = DiffusersUNet.from_config(config)
    _strict(unet, state, folder)
    return build_denoiser(diffusion, unet, noise_label="index"), f"{UNET_CLASS} wrapped (its blocks as taps)"


def _dit(found: Layout, diffusion: DiffusionConfig) -> nn.Module:
    from ddae_core.diffusion import DDPMSchedule
    from ddae_core.pretrained import dit

    transformer, vae = (found.components[name] for name in ("transformer", "vae"))
    spec = {"transformer": _read_json(transformer / "config.json"), "vae": _read_json(vae / "config.json")}
    spec["image_size"] = dit_image_size(spec["transformer"], spec["vae"])
    denoiser = dit.build(spec, DDPMSchedule(diffusion.timesteps, diffusion.beta_start, diffusion.beta_end))
    _strict(denoiser.unet, read_weights(weight_files(transformer, DIFFUSERS_WEIGHTS)), transformer)
    _strict(denoiser.vae, read_weights(weight_files(vae, DIFFUSERS_WEIGHTS)), vae)
    return denoiser


def import_network(folder: str | Path, *, convert: bool = True) -> ImportedNetwork:
    """Read the model in ``folder`` (see ``layout``) as one of our denoisers, in eval mode."""
    from ddae_core.checkpoint import CheckpointError, load_network, read_network_config

    folder = Path(folder)
    found = layout(folder)
    checksum = checksum_of(found.files())
    if found.form == "ddae":
        try:
            denoiser = load_network(folder)
            diffusion = DiffusionConfig(**read_network_config(folder)["diffusion"])
        except (CheckpointError, TypeError, ConfigError) as err:
            raise ImportSourceError(f"{folder}: cannot load this ddae network: {err}") from None
        form = f"ddae network ({read_network_config(folder).get('kind', 'unet')})"
    elif found.form == "unet":
        diffusion = diffusion_from_scheduler(found.components["scheduler"])
        denoiser, form = _unet(found.components["unet"], diffusion, convert)
    else:
        diffusion = diffusion_from_scheduler(found.components["scheduler"])
        denoiser, form = _dit(found, diffusion), f"latent {DIT_CLASS} + {VAE_CLASS}"
    log.info("imported %s from %s", form, folder)
    return ImportedNetwork(denoiser.eval(), diffusion, form, folder, checksum)
