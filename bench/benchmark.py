"""The ddae benchmark: the default run against the one before it, the training step against diffusers, the
machine's matmul peak, which kernels run, and the probe grid's cost against the official protocol.

    python bench/benchmark.py --quick --out /tmp/bench.json      # ~3 min on 2 cores: checks the script
    python bench/benchmark.py --baseline a5b6e2b                   # ~1 h on 2 cores: the numbers of docs/

With ``--baseline REV`` the default run (``ddae run``, params.yaml as committed) runs twice, one after
the other on this machine: once in a copy of revision REV, once in a copy of the working tree; each
copy runs its own code in a fresh tracking store and DVC cache. Without it, ``--run-dir`` names a
finished default run and ``--default-run-wall-s`` / ``--baseline-run-wall-s`` its and the baseline's
wall times (``--baseline-run-dir`` the finished baseline run, for its accuracy). The grid part reads the (new) run's network and prepared data. The result goes to
``docs/benchmarks.json`` (``--out`` to change; nothing with ``--quick`` unless ``--out``); run it on a
quiet machine: every speed figure is only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT / "tests"))
import e2e_helpers as project  # noqa: E402  (the one copy-a-project helper, shared with the end-to-end tests)
import grid  # noqa: E402
import speed  # noqa: E402

from ddae_core.checkpoint import load_network  # noqa: E402
from ddae_core.config import PipelineConfig  # noqa: E402
from ddae_core.data import load_prepared  # noqa: E402
from ddae_core.data.shape import declared_shape  # noqa: E402
from ddae_core.precision import resolve_mixed_precision  # noqa: E402

log = logging.getLogger("bench")

# issue 18's bars (fractions in [0, 1], times in seconds)
BARS = {"test_acc": 0.92, "label_1pct_test_acc": 0.85, "unet_vs_diffusers": 1.3, "fraction_of_peak": 0.25,
        "grid_probe_wall_s": 120.0, "extract_over_forward": 1.2}


def machine() -> dict[str, Any]:
    """CPU model and flags that matter here, cores and threads, accelerator, library versions."""
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        model = platform.processor() or "unknown"
    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    return {
        "cpu": model, "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers_version,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "platform": platform.platform(),
    }


# ----------------------------------------------------------------------------- the default runs


def checkout(revision: str, dest: Path) -> Path:
    """The project files of ``revision`` in ``dest``, a new git repository (as ``copy_project`` makes)."""
    dest.mkdir(parents=True, exist_ok=True)
    listed = subprocess.run(["git", "ls-tree", "--name-only", revision], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout.split()
    items = [item for item in project.PROJECT_ITEMS if item in listed]
    archive = subprocess.run(["git", "archive", revision, *items], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    project.git(dest, "init", "-q")
    project.git(dest, "add", "-A")
    project.git(dest, "commit", "-q", "-m", f"benchmark copy of {revision}")
    return dest


def default_run(root: Path, label: str) -> dict[str, Any]:
    """``ddae run`` in ``root`` (its own code first on the path), timed; its metrics."""
    log.info("%s: ddae run in %s", label, root)
    started = time.perf_counter()
    done = project.run([project.tool("ddae"), "run"], root, timeout=None)
    wall = time.perf_counter() - started
    (root / "ddae-run.log").write_text(done.stdout)
    if done.returncode != 0:
        raise SystemExit(f"{label}: ddae run failed ({done.returncode}); log in {root / 'ddae-run.log'}")
    return {"root": str(root), "wall_s": wall, **run_metrics(root)}


def run_metrics(root: Path) -> dict[str, Any]:
    """Test accuracy, the 1%-label probe accuracy and the pretraining summary of a finished run."""
    probe = json.loads((root / "metrics" / "probe.json").read_text())
    evaluate = json.loads((root / "metrics" / "evaluate.json").read_text())
    pretrain = json.loads((root / "metrics" / "pretrain.json").read_text())
    one_pct = evaluate.get("label_efficiency", {}).get("ddae_probe", {}).get("1%")  # None: the share was skipped
    return {"test_acc": probe["test_acc"], "val_acc": probe["val_acc"], "readout": probe["best"]["name"],
            "raw_pixels_test_acc": probe.get("raw_pixels_test_acc"), "label_1pct_test_acc": one_pct,
            "pretrain": {k: pretrain.get(k) for k in ("steps", "images_per_s", "train_wall_s", "chosen_step",
                                                      "monitor_wall_s", "parameters")}}


# ----------------------------------------------------------------------------- the parts


def training_speed(config: PipelineConfig, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """Our UNet against diffusers' twin (interleaved), FLOPs, the matmul peak, and the kernel reports."""
    channels, size = declared_shape(config.data) or (3, config.data.max_image_size)
    shape = (channels, size, size)
    batch = 32 if args.quick else config.pretrain.train.batch_size
    precision = resolve_mixed_precision(config.pretrain.train.mixed_precision, device)
    network = config.pretrain.network.name
    log.info("training images/s: %s vs diffusers UNet2DModel, batch %d, %s", network, batch, precision)
    training = speed.compare_training(network, shape, batch=batch, precision=precision,
                                      rounds=2 if args.quick else args.rounds, steps=1 if args.quick else args.steps,
                                      device=device)
    peak = speed.matmul_peak(512 if args.quick else 2048, 5 if args.quick else 20, device=device)
    # an emulated bf16 computes in fp32 units: the fp32 peak is that machine's ceiling
    peak_key = "bf16_gflop_s" if precision == "bf16" and peak["bf16_gflop_s"] is not None else "fp32_gflop_s"
    achieved = training["ours_flops_per_step"] * training["ours_img_s"] / batch / 1e9
    out = {"training": training, "matmul_peak": peak,
           "achieved": {"gflop_s": achieved, "peak_used": peak_key, "fraction_of_peak": achieved / peak[peak_key],
                        "diffusers_gflop_s": training["diffusers_flops_per_step"] * training["diffusers_img_s"]
                        / batch / 1e9}}
    if device == "cpu":
        out["kernels"] = {"ops": speed.op_report(network, shape, batch=batch, precision=precision),
                          "onednn": speed.onednn_report(network, shape, batch=batch, precision=precision)}
    return out


def grid_part(run_root: Path, config: PipelineConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The grid's cost on class-balanced subsets of the run's prepared splits, with the run's network."""
    from ddae_core.sampling import balanced_subset
    from ddae_core.heads.probe_online import ImageSet
    import numpy as np

    manifest, splits = load_prepared(run_root / "data" / "prepared")
    sizes = parse_sizes(args.grid_subset)
    subsets = {}
    for name, split in splits.items():
        labels = np.asarray(split.labels)
        rows = (balanced_subset(labels, sizes[name], np.random.default_rng(0)) if 0 < sizes[name] < len(labels)
                else np.arange(len(labels)))
        subsets[name] = ImageSet(np.asarray(split.images[rows]), labels[rows], np.asarray(split.sample_ids)[rows])
    denoiser = load_network(run_root / "outputs" / "pretrain" / "network")
    return grid.grid_cost(denoiser, subsets, config, len(manifest["class_names"]), official=not args.no_official,
                          progress=not args.quiet)


def parse_sizes(text: str) -> dict[str, int]:
    """``"train,val,test"`` image counts (0 = the whole split) into a dict."""
    train, val, test = (int(v) for v in text.split(","))
    return {"train": train, "val": val, "test": test}


def quick_run(workdir: Path) -> Path:
    """A tiny default-run stand-in for ``--quick``: ``dvc repro evaluate`` on a small, short copy."""
    params = {"data.max_train": 600, "data.max_test": 300, "pretrain.network.name": "ddpm-tiny",
              "pretrain.train.steps": 20, "pretrain.samples.count": 0, "pretrain.monitor.points": 0,
              "extract.pools": [1, 2], "probe.raw_pixels": False}
    root = project.copy_project(workdir / "quick", params)
    done = project.run([project.tool("dvc"), "repro", "evaluate"], root, timeout=None)
    if done.returncode != 0:
        raise SystemExit(f"quick run failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return root


def run(args: argparse.Namespace) -> dict[str, Any]:
    config = PipelineConfig.from_dict(yaml.safe_load((ROOT / "params.yaml").read_text()))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "quick": args.quick,
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddae-bench-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        if args.quick:
            new = {"root": str(quick_run(work)), "wall_s": None}
            new.update(run_metrics(Path(new["root"])))
            baseline = None
        elif args.baseline:  # the one before, then this one: same machine, one after the other
            baseline = default_run(checkout(args.baseline, work / "baseline"), f"baseline {args.baseline}")
            new = default_run(project.copy_project(work / "new"), "working tree")
            baseline["revision"] = args.baseline
        else:
            new = {"root": str(args.run_dir), "wall_s": args.default_run_wall_s, **run_metrics(Path(args.run_dir))}
            baseline = None if args.baseline_run_wall_s is None else {"wall_s": args.baseline_run_wall_s}
            if baseline is not None and args.baseline_run_dir is not None:  # its accuracy beside its time
                baseline.update(root=str(args.baseline_run_dir), **run_metrics(args.baseline_run_dir))
        result["default_run"], result["baseline_run"] = new, baseline
        result.update(training_speed(config, args, device))
        result["grid"] = grid_part(Path(new["root"]), config, args)
    result["bench_wall_s"] = time.perf_counter() - started
    return {**summary(result), **result}


def summary(r: dict[str, Any]) -> dict[str, Any]:
    """The headline keys of docs/benchmarks.json and each bar, met or not."""
    new, base, g = r["default_run"], r["baseline_run"] or {}, r["grid"]
    keys = {
        "default_run_test_acc": new["test_acc"], "default_run_wall_s": new["wall_s"],
        "baseline_run_wall_s": base.get("wall_s"), "baseline_run_test_acc": base.get("test_acc"),
        "label_1pct_test_acc": new["label_1pct_test_acc"],
        "baseline_label_1pct_test_acc": base.get("label_1pct_test_acc"),
        "unet_vs_diffusers_img_s_ratio": r["training"]["ratio"],
        "achieved_fraction_of_peak": r["achieved"]["fraction_of_peak"],
        "grid_probe_wall_s": g["cached"]["probe_wall_s"], "grid_extract_over_forward": g["extract_over_forward"],
    }
    walls = (keys["default_run_wall_s"], keys["baseline_run_wall_s"])
    keys["bars"] = {
        f"test_acc >= {BARS['test_acc']}": keys["default_run_test_acc"] >= BARS["test_acc"],
        "wall <= baseline wall": None if None in walls else walls[0] <= walls[1],
        f"1% labels >= {BARS['label_1pct_test_acc']}": (keys["label_1pct_test_acc"] or 0) >= BARS["label_1pct_test_acc"],
        f"unet/diffusers >= {BARS['unet_vs_diffusers']}": keys["unet_vs_diffusers_img_s_ratio"] >= BARS["unet_vs_diffusers"],
        f"fraction of peak >= {BARS['fraction_of_peak']}": keys["achieved_fraction_of_peak"] >= BARS["fraction_of_peak"],
        f"grid probe <= {BARS['grid_probe_wall_s']:.0f} s": keys["grid_probe_wall_s"] <= BARS["grid_probe_wall_s"],
        f"grid extraction <= {BARS['extract_over_forward']}x forward":
            keys["grid_extract_over_forward"] <= BARS["extract_over_forward"],
    }
    return keys


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} s"


def markdown(r: dict[str, Any]) -> str:
    """Tables for docs/benchmarks.md."""
    m, t, p, a, g = r["machine"], r["training"], r["matmul_peak"], r["achieved"], r["grid"]
    new, base = r["default_run"], r["baseline_run"] or {}
    lines = [
        f"Measured {r['date']} on {m['cpu']} ({', '.join(m['cpu_flags'])}; {m['logical_cpus']} logical CPUs, "
        f"{m['torch_threads']} torch threads" + (f", {m['gpu']}" if m["gpu"] else "")
        + f"), torch {m['torch']}, diffusers {m['diffusers']}.",
        f"Command: `{r['command']}`" + ("  (quick tiny setup: not the default run)" if r["quick"] else ""),
        "",
        "| | baseline" + (f" (`{base['revision']}`)" if base.get("revision") else "") + " | this version |",
        "|---|---|---|",
        f"| default run wall time | {_s(base.get('wall_s'))} | {_s(new['wall_s'])} |",
        f"| test accuracy | {_pct(base.get('test_acc'))} | {_pct(new['test_acc'])} |",
        f"| 1% of the labels | {_pct(base.get('label_1pct_test_acc'))} | {_pct(new['label_1pct_test_acc'])} |",
        f"| raw pixels, same probe | {_pct(base.get('raw_pixels_test_acc'))} | {_pct(new['raw_pixels_test_acc'])} |",
        f"| readout | {base.get('readout', 'n/a')} | {new['readout']} |",
        f"| pretraining steps, images/s | {(base.get('pretrain') or {}).get('steps', 'n/a')}, "
        f"{(base.get('pretrain') or {}).get('images_per_s') or 0:.0f} | {new['pretrain']['steps']}, "
        f"{new['pretrain']['images_per_s'] or 0:.0f} |",
        "",
        f"Training step ({t['network']}, input {'x'.join(map(str, t['input_shape']))}, batch {t['batch']}, "
        f"{t['precision']}, {t['threads']} threads, {t['rounds']} interleaved rounds x {t['steps_per_round']} "
        "steps, medians):",
        "",
        "| network | parameters | images/s | GFLOP per step (fwd+bwd) | GFLOP/s |", "|---|---|---|---|---|",
        f"| ours | {t['ours_parameters']:,} | {t['ours_img_s']:.1f} | {t['ours_flops_per_step'] / 1e9:.1f} | "
        f"{a['gflop_s']:.0f} |",
        f"| diffusers UNet2DModel | {t['diffusers_parameters']:,} | {t['diffusers_img_s']:.1f} | "
        f"{t['diffusers_flops_per_step'] / 1e9:.1f} | {a['diffusers_gflop_s']:.0f} |",
        "",
        f"Ours / diffusers: {t['ratio']:.2f}x. Matmul peak ({p['size']}x{p['size']}): fp32 {p['fp32_gflop_s']:.0f}, "
        f"bf16 {'n/a (emulated here)' if p['bf16_gflop_s'] is None else format(p['bf16_gflop_s'], '.0f')} GFLOP/s; "
        f"our step achieves {100 * a['fraction_of_peak']:.1f}% of the "
        f"{a['peak_used'][:4]} peak.",
    ]
    if "kernels" in r:
        lines += ["", "Where our step spends its time (profiler, own CPU time per step):", "",
                  "| operator | calls | ms | share |", "|---|---|---|---|"]
        lines += [f"| `{k['op']}` | {k['calls_per_step']:.0f} | {k['ms_per_step']:.1f} | {100 * k['share']:.1f}% |"
                  for k in r["kernels"]["ops"][:10]]
        lines += ["", "oneDNN implementations (`ONEDNN_VERBOSE=1`, one step):", "",
                  "| primitive | implementation | calls | ms |", "|---|---|---|---|"]
        lines += [f"| {k['primitive']} | `{k['implementation']}` | {k['calls']} | {k['ms']:.1f} |"
                  for k in r["kernels"]["onednn"][:10]]
    c = g["cached"]
    lines += [
        "", f"Probe grid on {g['splits']} images, levels {', '.join(f'{v:g}' for v in c['levels'])}, "
        f"features in {g['precision']}:", "",
        "| | network runs | wall | chosen | val | test |", "|---|---|---|---|---|---|",
        f"| bare forward passes (the floor) | {g['forward_passes']:,} | {g['forward_wall_s']:.1f} s | | | |",
        f"| ours: extraction ({len(c['taps'])} blocks x {len(c['levels'])} levels x pools {c['pools']}) | "
        f"{g['forward_passes']:,} | {c['extract_wall_s']:.1f} s ({g['extract_over_forward']:.2f}x) | | | |",
        f"| ours: selection ({c['candidates']} candidates, {c['fits']} fits) | 0 | {c['probe_wall_s']:.1f} s | "
        f"`{c['chosen']}` | {_pct(c['val_acc'])} | {_pct(c['test_acc'])} |",
    ]
    if "official" in g:
        o = g["official"]
        lines.append(f"| official `linear.py --grid` ({o['layers']} layers, {o['epochs']} epochs, batch "
                     f"{o['batch_size']}, lr {o['lr']:g}) | {o['forward_passes']:,} | {o['wall_s']:.1f} s | "
                     f"`{o['chosen_on_val']}` (on val; best on test: `{o['best_test']}` {_pct(o['best_test_acc'])}) "
                     f"| | {_pct(o['chosen_on_val_test_acc'])} |")
    lines += ["", "| bar (issue 18) | value | met |", "|---|---|---|"]
    values = {"test_acc": _pct(r["default_run_test_acc"]), "wall": f"{_s(r['default_run_wall_s'])} vs "
              f"{_s(r['baseline_run_wall_s'])}", "1%": _pct(r["label_1pct_test_acc"]),
              "unet": f"{r['unet_vs_diffusers_img_s_ratio']:.2f}x", "fraction": f"{100 * r['achieved_fraction_of_peak']:.1f}%",
              "grid probe": _s(r["grid_probe_wall_s"]), "grid extraction": f"{r['grid_extract_over_forward']:.2f}x"}
    for bar, met in r["bars"].items():
        value = next(v for k, v in values.items() if bar.lower().startswith(k))
        lines.append(f"| {bar} | {value} | {'n/a' if met is None else 'yes' if met else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny copy of the project, few rounds: checks the script")
    parser.add_argument("--baseline", metavar="REV", help="run the default run at REV, then the working tree's")
    parser.add_argument("--run-dir", type=Path, default=ROOT, help="a finished default run (without --baseline)")
    parser.add_argument("--default-run-wall-s", type=float, default=None, help="its wall time (without --baseline)")
    parser.add_argument("--baseline-run-wall-s", type=float, default=None,
                        help="the baseline's wall time on this machine (without --baseline)")
    parser.add_argument("--baseline-run-dir", type=Path, default=None,
                        help="the finished baseline run, for its accuracy (with --baseline-run-wall-s)")
    parser.add_argument("--work", default=None, help="where the runs' copies go (default: a temporary folder)")
    parser.add_argument("--grid-subset", default="5400,600,1000",
                        help="train,val,test images for the grid comparison (0 = whole split)")
    parser.add_argument("--no-official", action="store_true", help="skip the official grid (the slow part)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved A/B rounds of the training step")
    parser.add_argument("--steps", type=int, default=5, help="training steps per network per round")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default docs/benchmarks.json; none with --quick)")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown tables here")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("ddae_core", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.quick:
        args.grid_subset, args.no_official = "200,60,100", args.no_official
    result = run(args)
    out = args.out if args.out is not None else (None if args.quick else ROOT / "docs" / "benchmarks.json")
    text = markdown(result)
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {out}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
