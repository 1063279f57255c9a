"""The ``ddae`` console script: one handler per subcommand, registered in ``SUBCOMMANDS``.

To add a subcommand, write ``configure(parser)`` and ``run(args, out) -> exit code`` and add an entry;
handlers write their report to ``out`` (stdout) and diagnostics to logging (``-v`` DEBUG, ``-q`` WARNING). Each handler imports what
it needs when it runs, so ``ddae networks`` starts no orchestration stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence, TextIO

import yaml

from ddae_core.config import ConfigError

log = logging.getLogger("ddae")
# How `ddae run` prints each stage's status (tasks.services.runner.dvc_stage.StageResult)
STATUS_WORDS = {"ran": "ran", "skipped": "skipped (unchanged)", "restored": "restored (run-cache)"}


@dataclass(frozen=True)
class Subcommand:
    """A ``ddae <name>`` subcommand: its help line, argument setup and handler."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def _configure_networks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (default: per network)")
    parser.add_argument("--resolution", type=int, default=None, help="input H = W (default: per network)")
    parser.add_argument("--taps", action="store_true", help="also list every tap with (channels, resolution)")
    parser.add_argument("--from", dest="source", default=None, metavar="SOURCE",
                        help="list an imported model's taps instead: a folder (diffusers save_pretrained, a ddae "
                             "network), a Hugging Face hub id, or models:/<name>/<version>")


def _run_networks(args: argparse.Namespace, out: TextIO) -> int:
    """``ddae networks``: every named network with exact parameter counts (and its taps), or with
    ``--from`` the taps of a model to import."""
    if args.source is not None:
        return _describe_source(args.source, out)
    from ddae_core.nn.describe import describe_networks

    out.write(describe_networks(args.in_channels, args.resolution, taps=args.taps))
    return 0


def _describe_source(source: str, out: TextIO) -> int:
    """``ddae networks --from SOURCE``: read the model as ``pretrain.init`` would and list its taps."""
    from ddae_core.pretrained.describe import describe_imported
    from ddae_core.pretrained.errors import ImportSourceError
    from ddae_core.pretrained.importer import import_network
    from tasks.services.outputs.paths import resolve_root
    from tasks.services.tracking.imports import init_folder

    try:
        root = resolve_root() if source.startswith("models:/") else Path.cwd()
        with init_folder(root, source) as folder:
            out.write(describe_imported(import_network(folder)))
    except (ImportSourceError, FileNotFoundError) as err:
        print(f"ddae networks: {err}", file=sys.stderr)
        return 1
    return 0


def parse_overrides(pairs: Sequence[str]) -> dict:
    """``key=value`` pairs (values parsed as YAML: numbers, lists, booleans) into a dict."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. pretrain.train.steps=2000")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key first (validated), e.g. --set pretrain.train.steps=2000")
    parser.add_argument("--dataset", default=None, help="shorthand for --set data.dataset=NAME")
    parser.add_argument("--wait", action="store_true",
                        help="if another pipeline run holds the repository, wait for it (default: exit 75 at once)")
    parser.add_argument("--repo", default=None, help="repository root (default: found from the working directory)")


def _run_run(args: argparse.Namespace, out: TextIO) -> int:
    """Run the whole pipeline as a Prefect flow (a temporary local server starts if none is set).

    Exit codes: 2 invalid params, 1 a stage failed, 75 another run holds the repository.
    """
    from tasks.services.outputs.paths import resolve_root
    from tasks.services.params.overrides import overridden_params
    from tasks.services.runner.process_env import apply_offline_env
    from tasks.services.runner.run_lock import BUSY_EXIT_CODE, RepositoryBusy, hold_run_lock, log_waiting

    apply_offline_env()
    try:  # fail fast, before Prefect starts a server
        overrides = parse_overrides(args.overrides)
        if args.dataset:
            overrides["data.dataset"] = args.dataset
        root = resolve_root(args.repo)
        overridden_params(root / "params.yaml", overrides)
    except (ConfigError, FileNotFoundError) as err:
        out.write(f"error: {err}\n")
        return 2
    try:  # the flow re-enters this process's lock: held from before params.yaml changes to the last stage
        with hold_run_lock(root, wait=args.wait, on_wait=log_waiting(log, root)):
            return _run_flow(root, overrides, out)
    except RepositoryBusy as err:
        out.write(f"error: {err}\n")
        return BUSY_EXIT_CODE


def _run_flow(root: Path, overrides: dict, out: TextIO) -> int:
    from flows.pipeline import ddae_pipeline
    from tasks.services.runner.dvc_stage import StageFailed

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Prefect API call otherwise

    try:
        summary = ddae_pipeline(overrides=overrides, repo=str(root))
    except ConfigError as err:
        out.write(f"error: {err}\n")
        return 2
    except StageFailed as err:
        out.write(f"error: {err}\n")
        return 1
    probe = summary.get("probe", {})
    for stage in summary["stages"]:
        out.write(f"{stage['stage']:<9} {STATUS_WORDS[stage['status']]}  {stage['seconds']} s\n")
    if probe and "test_auroc" in probe:  # anomaly mode (data.normal_classes)
        out.write(f"test AUROC {probe['test_auroc']:.4f} with {probe['best']['name']}"
                  + (f" (raw pixels {probe['raw_pixels_test_auroc']:.4f})" if "raw_pixels_test_auroc" in probe else "")
                  + "\n")
    elif probe:
        out.write(f"test accuracy {100 * probe['test_acc']:.2f}% with {probe['best']['name']}"
                  + (f", balanced {100 * probe['test_balanced_acc']:.2f}%" if "test_balanced_acc" in probe else "")
                  + (f" (raw pixels {100 * probe['raw_pixels_test_acc']:.2f}%)" if "raw_pixels_test_acc" in probe else "")
                  + "\n")
    efficiency = root / "plots" / "evaluate" / "label_efficiency.md"
    if efficiency.is_file():
        out.write(efficiency.read_text())
    out.write(json.dumps({"metrics": "metrics/probe.json", "model": "models:/ddae-classifier@champion",
                          "mlflow_ui": summary["mlflow_ui"]}) + "\n")
    return 0


def _configure_profile(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", nargs="?", default=None, help="the profile to apply (omit to list them)")
    parser.add_argument("--repo", default=None, help="repository root (default: found from the working directory)")


def _run_profile(args: argparse.Namespace, out: TextIO) -> int:
    """``ddae profile NAME``: write profiles/NAME.yaml into params.yaml (validated first, comments kept).

    Exit codes: 2 unknown profile or invalid result (params.yaml unchanged), 75 a pipeline run holds
    the repository (params.yaml never changes under a run).
    """
    from tasks.services.outputs.paths import resolve_root
    from tasks.services.params.committed import recover_working_params
    from tasks.services.params.profiles import apply_profile, available_profiles
    from tasks.services.runner.run_lock import BUSY_EXIT_CODE, RepositoryBusy, hold_run_lock

    try:
        root = resolve_root(args.repo)
        if args.name is None:
            out.write("\n".join(available_profiles(root)) + "\n")
            return 0
        with hold_run_lock(root, wait=False):
            recover_working_params(root, log)
            _, changed = apply_profile(root / "params.yaml", args.name)
    except (ConfigError, FileNotFoundError) as err:
        out.write(f"error: {err}\n")
        return 2
    except RepositoryBusy as err:
        out.write(f"error: {err}\n")
        return BUSY_EXIT_CODE
    out.write(f"params.yaml: profile {args.name} applied, {len(changed)} value(s) changed\n")
    for key, (old, new) in changed.items():
        out.write(f"  {key}: {old!r} -> {new!r}\n")
    out.write("run it with `dvc exp run` or `ddae run`; `dvc params diff` shows the change\n")
    return 0


def _configure_batch(parser: argparse.ArgumentParser, *, predict: bool) -> None:
    parser.add_argument("source", help="a folder of images (any depth) or a .zip/.tar/.tar.gz archive")
    parser.add_argument("-o", "--output", required=True, help="the Parquet file to write")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=None,
                       help="model URI (default: models:/<register.model_name>@champion)")
    which.add_argument("--version", type=int, default=None, help="a registered version of the model instead")
    if predict:
        parser.add_argument("--review-threshold", type=float, default=None,
                            help="flag predictions below this confidence (default: predict.review_threshold)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (default: predict.batch_size)")
    parser.add_argument("--repo", default=None, help="repository root (default: found from the working directory)")


def _run_batch(args: argparse.Namespace, out: TextIO, *, predict: bool) -> int:
    """``ddae predict`` / ``ddae embed``: errors (bad source, unknown model, bad params) exit 2."""
    from ddae_core.data import DatasetError
    from tasks.services.outputs.paths import resolve_root
    from tasks.services.runner.process_env import apply_offline_env
    from tasks.services.runner.stage_main import StageError

    apply_offline_env()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        root = resolve_root(args.repo)
        if predict:
            from tasks.services.serving.predict import run_predict

            summary = run_predict(root, args.source, args.output, model=args.model, version=args.version,
                                  review_threshold=args.review_threshold, batch_size=args.batch_size)
            out.write(summary.line() + "\n")
        else:
            from tasks.services.serving.embed import run_embed

            result = run_embed(root, args.source, args.output, model=args.model, version=args.version,
                               batch_size=args.batch_size)
            out.write(f"embedded {result['images']} images ({result['unreadable']} unreadable) with "
                      f"{result['tap']} ({result['dim']} features) in {result['seconds']} s: "
                      f"{result['images_per_s']} images/s; model {result['model_uri']} "
                      f"(version {result['model_version'] or '-'}) -> {result['output']}\n")
    except (ConfigError, FileNotFoundError, DatasetError, StageError, ValueError) as err:
        out.write(f"error: {err}\n")
        return 2
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "networks": Subcommand(help="list the named networks with exact parameter counts and their taps",
                           configure=_configure_networks, run=_run_networks),
    "run": Subcommand(help="run the whole pipeline (prepare, pretrain, extract, probe, finetune, evaluate, register)",
                      configure=_configure_run, run=_run_run),
    "profile": Subcommand(help="apply a profile (profiles/NAME.yaml, the paper's settings) to params.yaml",
                          configure=_configure_profile, run=_run_profile),
    "predict": Subcommand(
        help="batch inference: a folder or archive of images -> a Parquet file of predictions",
        configure=partial(_configure_batch, predict=True), run=partial(_run_batch, predict=True)),
    "embed": Subcommand(
        help="the registered model's features for a folder or archive of images (Parquet, as extract writes)",
        configure=partial(_configure_batch, predict=False), run=partial(_run_batch, predict=False)),
}


def verbosity_options() -> argparse.ArgumentParser:
    """``-v`` / ``-q``, accepted before or after the subcommand (``ddae -v run``, ``ddae run -q``)."""
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="log_level", action="store_const", const=logging.DEBUG,
                       default=argparse.SUPPRESS, help="log ddae's DEBUG lines too (also in the stages it runs)")
    group.add_argument("-q", "--quiet", dest="log_level", action="store_const", const=logging.WARNING,
                       default=argparse.SUPPRESS, help="log warnings and errors only (the report still prints)")
    return options


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per subcommand."""
    verbosity = verbosity_options()
    parser = argparse.ArgumentParser(prog="ddae", parents=[verbosity],
                                     description="Denoising diffusion autoencoders (DDAE): images to a classifier.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help, parents=[verbosity])
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ddae`` console script: run one subcommand; returns the exit code."""
    from tasks.services.runner.process_env import LOG_LEVEL_ENV, configure_logging

    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", logging.INFO)  # INFO unless -v / -q
    configure_logging("%(levelname)s %(name)s: %(message)s", level)
    if level != logging.INFO:
        os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)  # the stages `ddae run` starts log alike
    return SUBCOMMANDS[args.command].run(args, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
