"""Small image-folder datasets written by the tests: solid-colour PNG class folders, and unreadable files."""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image

from ddae_core.config import DataConfig

LAYOUT_FLAT = {"cat": 10, "dog": 10, "eel": 10}


def solid(size: tuple[int, int], value: int, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, (value,) * len(mode) if mode != "L" else value)


def make_tree(root: Path, layout: dict[str, dict[str, int]], size: int = 12) -> None:
    """``layout``: {relative class folder: {"count": n}}; PNGs with a distinct value per image."""
    k = 0
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            k += 1
            solid((size, size), (k * 7) % 256).save(root / folder / f"img{i:03d}.png")


def img_config(source: Path, **kwargs) -> DataConfig:
    base = dict(dataset="imagefolder", source=str(source), image_size=8, channels=3)
    base.update(kwargs)
    return DataConfig(**base)


def write_bad_files(folder: Path) -> list[str]:
    good = io.BytesIO()
    solid((16, 16), 200).save(good, format="PNG")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (folder / "truncated.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.jpeg").write_text("this is not an image")
    return ["corrupt.png", "truncated.png", "empty.jpg", "notes.jpeg"]
