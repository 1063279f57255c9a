"""Write a dataset ddae reads natively as a plain image folder (``train/`` and ``test/`` of class folders,
one PNG per image at its own size), so ``--dataset imagefolder`` can be checked against the native run.

    python bench/export_image_folder.py fashion-mnist /tmp/fashion-mnist-png
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", choices=["fashion-mnist", "cifar10"])
    parser.add_argument("out", type=Path, help="an empty or new folder")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty")
    print(f"wrote {export(args.dataset, args.out)} images to {args.out}")


if __name__ == "__main__":
    main()
