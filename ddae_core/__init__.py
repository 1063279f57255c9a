"""ddae_core: denoising diffusion autoencoders as self-supervised learners (the library).

Imports none of Prefect, MLflow or DVC; ``from ddae_core import ...`` is enough to train a diffusion
model, sample from it and read its features in a notebook.

The names below are imported on first use (PEP 562), so ``import ddae_core.<module>`` runs that
module alone: each pipeline stage then depends, in DVC's eyes, on the files it really runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {  # name -> the module that defines it
    **dict.fromkeys(["load_network", "save_network"], "ddae_core.checkpoint"),
    **dict.fromkeys(["DiffusionConfig", "PipelineConfig", "TrainConfig"], "ddae_core.config"),
    **dict.fromkeys(["load_prepared", "prepare_dataset", "to_model_input", "to_uint8_images"], "ddae_core.data"),
    **dict.fromkeys(["SAMPLERS", "build_denoiser", "build_loss", "feature_levels", "sigma_from_index"],
                    "ddae_core.diffusion"),
    **dict.fromkeys(["capture", "extract", "extract_all", "extract_batch", "pool"], "ddae_core.features"),
    **dict.fromkeys(["NETWORKS", "UNet", "UNetConfig", "build_unet", "count_parameters", "paper_aliases"],
                    "ddae_core.nn"),
    **dict.fromkeys(["LinearProbe", "fit_logistic", "select_probe"], "ddae_core.heads.probe"),
    **dict.fromkeys(["TrainResult", "train"], "ddae_core.training.loop"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``ddae_core.<name>`` for the exported names, imported from their module on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ddae_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
