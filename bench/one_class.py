"""The standard one-class protocol on Fashion-MNIST: each class in turn is normal (train and val hold only
it), the other nine are the anomalies of the test split; AUROC per class and their mean, DDAE's novelty
score beside raw pixels through the same scoring (``data.normal_classes``, README "Anomaly detection").

Each class runs in a copy of the project of its own (``--work``/class-N), through ``dvc repro probe``
(prepare, pretrain, extract, probe: nothing is registered). Not a test: about half an hour for all ten with
defaults on two cores; ``--classes 0 --steps 20 --network ddpm-tiny --max-train 300 --max-test 500``
checks it end to end in minutes.

    python bench/one_class.py --markdown one_class.md               # the ten classes, CPU-sized
    python bench/one_class.py --classes 0 3 --steps 200 --markdown /tmp/two.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import e2e_helpers as project  # noqa: E402  (one copy-a-project helper, shared with the end-to-end tests)

FASHION_MNIST = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot")


def run_class(index: int, args: argparse.Namespace) -> dict:
    """One class normal: ``dvc repro probe`` in its own copy; the row of the table."""
    name = FASHION_MNIST[index]
    params = {"data.normal_classes": [name], "data.max_train": args.max_train, "data.max_test": args.max_test,
              "pretrain.network.name": args.network, "pretrain.train.steps": args.steps,
              "pretrain.samples.count": 0, "probe.raw_pixels": True}
    dest = args.work / f"class-{index}"
    if dest.exists():
        shutil.rmtree(dest)
    root = project.copy_project(dest, params)
    start = time.monotonic()
    done = project.run([project.tool("dvc"), "repro", "probe"], root, timeout=None)
    if done.returncode != 0:
        raise SystemExit(f"class {index} ({name}): dvc repro failed ({done.returncode}):\n{done.stdout[-4000:]}")
    probe = json.loads((root / "metrics/probe.json").read_text())
    pretrain = json.loads((root / "metrics/pretrain.json").read_text())
    anomaly = probe["anomaly"]
    return {"class": index, "name": name, "test_auroc": probe["test_auroc"],
            "raw_pixels_test_auroc": probe.get("raw_pixels_test_auroc"),
            "false_alarm_at_recall": anomaly["false_alarm_at_recall"], "recall": anomaly["recall"],
            "readout": probe["best"]["name"], "train_images": probe["train_size"],
            "test_images": anomaly["test_normal"] + anomaly["test_anomalous"], "steps": pretrain.get("steps"),
            "wall_s": round(time.monotonic() - start, 1)}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The table: a row per class, then the mean AUROC over the classes that ran."""
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    recall = rows[0]["recall"] if rows else 0.95
    lines = [f"One-class Fashion-MNIST (`bench/one_class.py`: network `{args.network}`, {args.steps} pretraining "
             f"steps, max_train {args.max_train or 'all'}, max_test {args.max_test or 'all'})", "",
             f"| normal class | DDAE AUROC | raw pixels AUROC | false alarm at {recall:.0%} recall | readout "
             "| train images | test images | wall s |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['class']} {r['name']} | {cell(r['test_auroc'])} | {cell(r['raw_pixels_test_auroc'])} | "
              f"{cell(r['false_alarm_at_recall'])} | `{r['readout']}` | {r['train_images']} | {r['test_images']} | "
              f"{r['wall_s']} |" for r in rows]
    if rows:
        pixels = [r["raw_pixels_test_auroc"] for r in rows if r["raw_pixels_test_auroc"] is not None]
        lines.append(f"| **mean of {len(rows)}** | **{sum(r['test_auroc'] for r in rows) / len(rows):.4f}** | "
                     f"{sum(pixels) / len(pixels) if pixels else float('nan'):.4f} | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="normal classes (0-9)")
    parser.add_argument("--network", default="ddpm-cpu")
    parser.add_argument("--steps", type=int, default=400, help="pretraining steps per class")
    parser.add_argument("--max-train", type=int, default=0, help="normal train images (0 = all ~5,400)")
    parser.add_argument("--max-test", type=int, default=0, help="test images, all classes (0 = all 10,000)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ddae-one-class"), help="a project copy per class")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    if any(not 0 <= c < 10 for c in args.classes):
        parser.error(f"--classes: Fashion-MNIST classes are 0-9, got {args.classes}")
    rows = []
    for index in args.classes:
        rows.append(run_class(index, args))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, args)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
