"""Does the diffusion model's own denoising error flag anomalies? Measured on the projects
``bench/one_class.py`` leaves behind (``--work``/class-N), nothing trained anew.

The score of an image: the mean squared error of the predicted noise at step t, averaged over
``--draws`` noise draws (the eps-prediction loss the network was trained on); a network that saw only
normal images should denoise anomalies worse. Its test AUROC per level goes through the same
``auroc`` as the novelty score, beside that score's AUROC read from the project's metrics.

    python bench/denoising_error.py --work /tmp/ddae-one-class --markdown denoise.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ddae_core.checkpoint import load_network  # noqa: E402
from ddae_core.data import to_model_input  # noqa: E402
from ddae_core.data.prepared import PreparedSplit, normal_classes, read_manifest  # noqa: E402
from ddae_core.heads.anomaly import auroc  # noqa: E402


def denoising_error(denoiser: torch.nn.Module, images: np.ndarray, t: int, draws: int, seed: int,
                    batch_size: int = 500) -> np.ndarray:
    """Per-image mean squared eps error at step ``t``, averaged over ``draws`` seeded noise draws."""
    generator = torch.Generator().manual_seed(seed)
    errors = np.zeros(len(images), np.float64)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x0 = to_model_input(np.array(images[start:start + batch_size]))
            steps = torch.full((len(x0),), t, dtype=torch.long)
            for _ in range(draws):
                noise = torch.randn(x0.shape, generator=generator)
                eps_hat = denoiser(denoiser.add_noise(x0, steps, noise), steps)
                errors[start:start + len(x0)] += ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3)).double().numpy()
    return errors / draws


def measure(project: Path, levels: list[int], draws: int) -> dict:
    """One class's row: the novelty AUROC from its metrics, the denoising-error AUROC at each level."""
    prepared = project / "data/prepared"
    manifest = read_manifest(prepared)
    test = PreparedSplit(prepared, "test", manifest)
    normal = {manifest["class_names"].index(name) for name in normal_classes(manifest)}
    anomalous = ~np.isin(test.labels, sorted(normal))
    denoiser = load_network(project / "outputs/pretrain/network").eval()
    probe = json.loads((project / "metrics/probe.json").read_text())
    row = {"class": ",".join(normal_classes(manifest)), "novelty_auroc": probe["test_auroc"],
           "raw_pixels_auroc": probe.get("raw_pixels_test_auroc")}
    start = time.monotonic()
    for t in levels:
        row[f"denoise_t{t}_auroc"] = auroc(denoising_error(denoiser, test.images, t, draws, seed=t), anomalous)
    row["wall_s"] = round(time.monotonic() - start, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddae-one-class"))
    parser.add_argument("--levels", type=int, nargs="+", default=[11, 50, 200], help="DDPM steps t")
    parser.add_argument("--draws", type=int, default=2, help="noise draws per image and level")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    projects = sorted(args.work.glob("class-*"), key=lambda p: int(p.name.split("-")[1]))
    projects = [p for p in projects if (p / "metrics/probe.json").is_file()]
    if not projects:
        parser.error(f"--work {args.work}: no finished class-N project (run bench/one_class.py first)")
    torch.set_grad_enabled(False)
    rows = []
    for project in projects:
        rows.append({"index": int(project.name.split("-")[1]), **measure(project, args.levels, args.draws)})
        print(json.dumps(rows[-1]), flush=True)
    keys = ["novelty_auroc", "raw_pixels_auroc", *(f"denoise_t{t}_auroc" for t in args.levels)]
    lines = ["| normal class | novelty (DDAE) | raw pixels | "
             + " | ".join(f"denoising error t={t}" for t in args.levels) + " |",
             "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {r['index']} {r['class']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |" for r in rows]
    lines.append(f"| **mean of {len(rows)}** | " + " | ".join(f"{np.mean([r[k] for r in rows]):.4f}" for k in keys)
                 + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
