"""The working shape (channels, square size) of a dataset, when params.yaml leaves it to ``auto``.

The rule, in full (also in the README's "Your own images"):
- a known dataset keeps its own shape (Fashion-MNIST 1x28x28, CIFAR-10 3x32x32);
- an image folder is judged on up to ``SAMPLE`` train images spread evenly over its sorted files:
  - channels: 3 if any of them holds colour (a pixel whose R, G and B differ by more than
    ``GRAY_TOLERANCE``, on a small thumbnail), else 1; so grayscale photos saved as RGB JPEGs stay 1;
  - size: the median shorter side, capped at ``data.max_image_size`` and rounded down to a multiple
    of what the network's down-sampling needs (e.g. 4 for three levels), never below 8 (rounded up).
An explicit ``data.channels`` or ``data.image_size`` always wins; with an imported model
(``pretrain.init``) ``auto`` takes the shape that model reads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from ddae_core.config import DataConfig
from ddae_core.data.errors import DatasetLayoutError
from ddae_core.data.sources import NATIVE_SHAPES, RawSplit, Source

log = logging.getLogger(__name__)

SAMPLE = 256  # images looked at: enough for a stable median, cheap on a million-image folder
GRAY_TOLERANCE = 8  # max |R-G|, |G-B| (of 255) still counted as gray: JPEG chroma noise on gray photos
THUMBNAIL = 64  # side the colour test looks at
MIN_SIZE = 8
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def declared_shape(config: DataConfig) -> tuple[int, int] | None:
    """(channels, size) known without looking at files: explicit settings, else a known dataset's own
    (``NATIVE_SHAPES``); None for an image folder with anything left to ``auto``."""
    native = NATIVE_SHAPES.get(config.dataset)
    channels = config.channels if config.channels != "auto" else (native[0] if native else None)
    size = config.image_size if config.image_size != "auto" else (native[1] if native else None)
    return None if channels is None or size is None else (int(channels), int(size))


@dataclass(frozen=True)
class WorkingShape:
    """What prepare resizes every image to, and why (logged and kept in the manifest)."""

    channels: int
    image_size: int
    reason: str

    def to_dict(self) -> dict:
        return {"channels": self.channels, "image_size": self.image_size, "reason": self.reason}


def _sample_indices(n: int, count: int = SAMPLE) -> np.ndarray:
    """``count`` indices spread evenly over ``range(n)`` (all of them when n <= count): deterministic."""
    return np.unique(np.linspace(0, n - 1, num=min(n, count)).round().astype(np.int64)) if n else np.zeros(0, np.int64)


def has_colour(img: Image.Image) -> bool:
    """Whether an image shows colour: a colour mode with some pixel whose channels differ noticeably."""
    if img.mode in _GRAY_MODES:
        return False
    thumb = img.convert("RGB")
    thumb.thumbnail((THUMBNAIL, THUMBNAIL))
    rgb = np.asarray(thumb, dtype=np.int16)
    spread = np.abs(rgb[..., 0] - rgb[..., 1]).max(initial=0), np.abs(rgb[..., 1] - rgb[..., 2]).max(initial=0)
    return max(spread) > GRAY_TOLERANCE


def fit_size(side: float, cap: int, multiple: int) -> int:
    """``side`` capped at ``cap``, rounded down to a multiple of ``multiple`` and at least MIN_SIZE (rounded up)."""
    size = int(min(side, cap)) // multiple * multiple
    floor = -(-MIN_SIZE // multiple) * multiple
    return max(size, floor)


def _look(split: RawSplit) -> tuple[list[int], bool]:
    """Shorter sides and whether any sampled image holds colour; unreadable files are skipped here
    (prepare reports them, under ``data.on_corrupt``)."""
    sides, colour = [], False
    for i in _sample_indices(len(split)):
        try:
            img = ImageOps.exif_transpose(split.load(int(i)))
        except Exception:  # noqa: BLE001 - a broken file is prepare's to report, not the shape rule's
            continue
        sides.append(min(img.size))
        colour = colour or has_colour(img)
    return sides, colour


def working_shape(source: Source, config: DataConfig, multiple: int,
                  model_shape: tuple[int, int] | None = None) -> WorkingShape:
    """The (channels, size) prepare writes: explicit settings, else an imported model's input
    (``model_shape``: it reads one shape), else the source's own, else the rule above."""
    channels, size = config.channels, config.image_size
    if channels != "auto" and size != "auto":
        return WorkingShape(int(channels), int(size), "set in data.channels and data.image_size")
    if model_shape is not None:
        channels = model_shape[0] if channels == "auto" else channels
        size = model_shape[1] if size == "auto" else size
        shape = WorkingShape(int(channels), int(size), f"the imported model's input, "
                             f"{model_shape[0]}x{model_shape[1]}x{model_shape[1]} (pretrain.init)")
        log.info("working shape %dx%dx%d (%s)", shape.channels, shape.image_size, shape.image_size, shape.reason)
        return shape
    reasons = []
    if source.native_shape is not None:
        native_channels, native_size = source.native_shape
        colour = native_channels == 3
        reasons.append(f"{source.dataset}'s own shape")
        if size == "auto":  # its images are padded or resized as they are, so round up, never crop
            size = -(-native_size // multiple) * multiple
            if size != native_size:
                reasons.append(f"size {native_size} rounded up to {size}, a multiple of {multiple}")
    else:
        sides, colour = _look(source.train)
        if not sides:
            raise DatasetLayoutError(f"{source.location}: none of the {len(_sample_indices(len(source.train)))} "
                                     "sampled train images could be read to infer data.channels and "
                                     "data.image_size; set them, or fix the files")
        median = float(np.median(sides))
        reasons.append(f"{len(sides)} sampled train images: median shorter side {median:g} px, "
                       f"{'colour' if colour else 'all gray'}")
        if size == "auto":
            size = fit_size(median, config.max_image_size, multiple)
            reasons.append(f"size {size}: that median, at most data.max_image_size={config.max_image_size}, "
                           f"a multiple of {multiple}")
    if channels == "auto":
        channels = 3 if colour else 1
    else:
        reasons.append("channels set in data.channels")
    if config.image_size != "auto":
        reasons.append("size set in data.image_size")
    shape = WorkingShape(int(channels), int(size), "; ".join(reasons))
    log.info("working shape %dx%dx%d (%s)", shape.channels, shape.image_size, shape.image_size, shape.reason)
    return shape
