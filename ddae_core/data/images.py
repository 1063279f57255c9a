"""One image path for everything: decode, convert, fit to a square, and scale for the network.

``preprocess_image`` is used by ``prepare_dataset`` and by the deployed model on raw uploaded bytes, so
a served image goes through exactly the pixels-to-array path the model was trained on.
``to_model_input`` / ``to_uint8_images`` are the only places where ``[0, 255]`` and ``[-1, 1]`` meet.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ddae_core.atomic import atomic_file

Fit = Literal["pad", "resize"]
_FITS = ("pad", "resize")


@dataclass(frozen=True)
class PreprocessSpec:
    """How any image becomes a ``uint8 (image_size, image_size, channels)`` array.

    ``fit="pad"`` keeps pixels as they are and centres them on a black canvas (Fashion-MNIST 28 -> 32);
    ``fit="resize"`` centre-crops to a square and resamples (photos of any size, CIFAR-10).
    """

    channels: int  # 1 = grayscale (L), 3 = RGB
    image_size: int  # output height = width, pixels
    fit: Fit = "resize"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"PreprocessSpec.channels must be 1 or 3, got {self.channels!r}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"PreprocessSpec.image_size must be a positive integer, got {self.image_size!r}")
        if self.fit not in _FITS:
            raise ValueError(f"PreprocessSpec.fit must be one of {_FITS}, got {self.fit!r}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The output array shape ``(H, W, C)``."""
        return (self.image_size, self.image_size, self.channels)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, stored in the prepared manifest and next to deployed models."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessSpec":
        """Inverse of ``to_dict``; unknown or missing keys are errors, naming them."""
        if not isinstance(data, dict):
            raise ValueError(f"preprocess spec must be a mapping, got {type(data).__name__}")
        expected = {"channels", "image_size", "fit"}
        unknown, missing = sorted(set(data) - expected), sorted(expected - set(data))
        if unknown or missing:
            raise ValueError(f"preprocess spec: unknown keys {unknown}, missing keys {missing}")
        return cls(channels=data["channels"], image_size=data["image_size"], fit=data["fit"])


def open_image(data: bytes) -> Image.Image:
    """Decode encoded image bytes fully (truncated or non-image data raise here, not later)."""
    if not data:
        raise UnidentifiedImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise UnidentifiedImageError(f"not an image Pillow can decode (file starts with {data[:8]!r})") from None
    img.load()
    return img


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float grayscale -> ``L``; integers are read as 16-bit (0..65535)."""
    arr = np.asarray(img)
    if img.mode == "F":
        # Float images have no agreed range; values are taken as 0..255 and clipped.
        out = np.clip(np.rint(arr.astype(np.float64)), 0, 255)
    else:
        out = np.rint(np.clip(arr.astype(np.float64), 0, 65535) / 257.0)
    return Image.fromarray(out.astype(np.uint8), mode="L")


def _convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """Any Pillow mode -> ``L`` (channels=1) or ``RGB`` (channels=3).

    Transparent pixels are composited on black (``rgb * alpha``): black matches the padding colour, so a
    transparent margin and a padded margin look the same to the model. Grayscale uses ITU-R 601 luma.
    """
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_bit_depth_to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)  # (H, W, 4) in [0, 255]
        rgb = np.rint(rgba[..., :3] * (rgba[..., 3:4] / 255.0)).astype(np.uint8)
        img = Image.fromarray(rgb, mode="RGB")
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # CMYK, YCbCr, P, 1, ... go through RGB first
    return img.convert(target)


def _fit_pad(img: Image.Image, size: int) -> Image.Image:
    """Centre on a black ``size x size`` canvas; an image larger than ``size`` is first shrunk to fit."""
    w, h = img.size
    if max(w, h) > size:
        scale = size / max(w, h)
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((w, h), Image.Resampling.LANCZOS)
    if (w, h) == (size, size):
        return img
    canvas = Image.new(img.mode, (size, size), 0)
    canvas.paste(img, ((size - w) // 2, (size - h) // 2))
    return canvas


def _fit_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre-crop to a square, then resample to ``size`` (LANCZOS down, BICUBIC up; no-op if equal)."""
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side == size:
        return img
    resample = Image.Resampling.LANCZOS if side > size else Image.Resampling.BICUBIC
    return img.resize((size, size), resample)


def preprocess_image(img: Image.Image | bytes, spec: PreprocessSpec) -> np.ndarray:
    """Image or encoded bytes -> ``uint8 (image_size, image_size, channels)``.

    Steps: decode (bytes), apply EXIF orientation, convert the mode (see ``_convert_mode``: alpha is
    composited on black, 16-bit is scaled to 8-bit), then fit (``spec.fit``).
    """
    if isinstance(img, (bytes, bytearray, memoryview)):
        img = open_image(bytes(img))
    img = ImageOps.exif_transpose(img)
    img = _convert_mode(img, spec.channels)
    img = _fit_pad(img, spec.image_size) if spec.fit == "pad" else _fit_resize(img, spec.image_size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr)  # (H, W, C) uint8


def to_model_input(images: np.ndarray) -> torch.Tensor:
    """``uint8 (N, H, W, C)`` in [0, 255] -> ``float32 (N, C, H, W)`` in [-1, 1] (x / 127.5 - 1)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"to_model_input expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return x.to(torch.float32).div_(127.5).sub_(1.0).contiguous()


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """``float (N, C, H, W)`` in [-1, 1] -> ``uint8 (N, H, W, C)``; values outside are clipped."""
    if x.ndim != 4:
        raise ValueError(f"to_uint8_images expects (N, C, H, W), got shape {tuple(x.shape)}")
    y = ((x.detach().to(torch.float32).cpu().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return y.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def image_grid(images: np.ndarray, nrow: int = 8, padding: int = 2) -> np.ndarray:
    """``uint8 (N, H, W, C)`` -> one ``uint8 (rows*(H+p)+p, nrow*(W+p)+p, C)`` mosaic on black."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"image_grid expects a non-empty uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_image_grid(images: np.ndarray, path: str | os.PathLike[str], nrow: int = 8) -> Path:
    """Write ``uint8 (N, H, W, C)`` images as one PNG grid, via a temporary file and a rename."""
    grid = image_grid(images, nrow=nrow)
    pil = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        pil.save(f, format="PNG")
    return path
