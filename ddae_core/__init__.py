"""ddae_core: denoising diffusion autoencoders as self-supervised learners (the library).

Imports none of Prefect, MLflow or DVC; ``from ddae_core import ...`` is enough to train a diffusion
model, sample from it and read its features in a notebook.
"""

from ddae_core.checkpoint import load_network, save_network
from ddae_core.config import DiffusionConfig, PipelineConfig, TrainConfig
from ddae_core.data import load_prepared, prepare_dataset, to_model_input, to_uint8_images
from ddae_core.diffusion import SAMPLERS, build_denoiser, build_loss, feature_levels, sigma_from_index
from ddae_core.features import capture, extract, extract_all, extract_batch, pool
from ddae_core.nn import NETWORKS, UNet, UNetConfig, build_unet, count_parameters, paper_aliases
from ddae_core.probe import LinearProbe, fit_logistic, select_probe
from ddae_core.training import TrainResult, train

__all__ = [
    "DiffusionConfig", "LinearProbe", "NETWORKS", "PipelineConfig", "SAMPLERS", "TrainConfig",
    "TrainResult", "UNet", "UNetConfig", "build_denoiser", "build_loss", "build_unet", "capture",
    "count_parameters", "extract", "extract_all", "extract_batch", "feature_levels", "fit_logistic",
    "load_network", "load_prepared", "paper_aliases", "pool", "prepare_dataset", "save_network",
    "select_probe", "sigma_from_index", "to_model_input", "to_uint8_images", "train",
]
