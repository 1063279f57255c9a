"""Write a dataset ddae reads natively as a plain image folder (``train/`` and ``test/`` of class folders,
one PNG per image at its own size), so ``--dataset imagefolder`` can be checked against the native run;
or scikit-learn's handwritten digits (1,797 8x8 images, no split: bare class folders) for transfer runs.

    python bench/export_image_folder.py fashion-mnist /tmp/fashion-mnist-png
    python bench/export_image_folder.py digits /tmp/digits-png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddae_core.config import DataConfig  # noqa: E402
from ddae_core.data.sources import open_source  # noqa: E402


def export(dataset: str, out: Path) -> int:
    """Every train and test image of ``dataset`` as ``out/<split>/<class>/<id>.png``; returns the count."""
    written = 0
    with open_source(DataConfig(dataset=dataset)) as source:
        for split_name, split in (("train", source.train), ("test", source.test)):
            folders = [out / split_name / name.replace("/", "-") for name in source.class_names]
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            for i in tqdm(range(len(split)), desc=f"export {split_name}", unit="img"):
                split.load(i).save(folders[int(split.labels[i])] / f"{int(split.ids[i]):06d}.png")
                written += 1
    return written


def export_digits(out: Path) -> int:
    """scikit-learn's digits as ``out/<digit>/<index>.png``: 8x8 gray, its 17 levels spread over 0..255."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = out / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255 / 16).astype(np.uint8), mode="L").save(folder / f"{i:04d}.png")
    return len(digits.images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["fashion-mnist", "cifar10", "digits"])
    parser.add_argument("out", type=Path, help="an empty or new folder")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    count = export_digits(args.out) if args.dataset == "digits" else export(args.dataset, args.out)
    print(f"wrote {count} images to {args.out}")


if __name__ == "__main__":
    main()
