"""The ``ddae`` console script: one handler per subcommand, registered in ``SUBCOMMANDS``.

To add a subcommand, write ``configure(parser)`` and ``run(args, out) -> exit code`` and add an entry;
handlers write their report to ``out`` (stdout) and diagnostics to logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TextIO

import torch

from ddae_core.nn.unet import (
    NETWORKS,
    UNet,
    UNetConfig,
    count_parameters,
    network_config,
    paper_aliases,
    tap_channels,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Subcommand:
    """A ``ddae <name>`` subcommand: its help line, argument setup and handler."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, TextIO], int]


def _format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def _parameter_count(config: UNetConfig) -> int:
    """Exact trainable parameter count of the network, built on the meta device (no memory, fast)."""
    with torch.device("meta"):
        return count_parameters(UNet(config))


def _configure_networks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--in-channels", type=int, default=None, help="input channels (default: per network)")
    parser.add_argument("--resolution", type=int, default=None, help="input H = W (default: per network)")
    parser.add_argument("--taps", action="store_true", help="also list every tap with (channels, resolution)")


def _run_networks(args: argparse.Namespace, out: TextIO) -> int:
    """Table of every named network: exact parameter count, input shape, number of taps (and the taps)."""
    rows: list[list[str]] = []
    details: list[str] = []
    for name in NETWORKS:
        try:
            config = network_config(name, args.in_channels, args.resolution)
        except ValueError as err:
            rows.append([name, "-", "-", "-", f"invalid at this shape: {err}"])
            continue
        channels = tap_channels(config)
        shape = f"{config.in_channels}x{config.resolution}x{config.resolution}"
        summary = (NETWORKS[name].__doc__ or "").strip().splitlines()[0]
        rows.append([name, str(_parameter_count(config)), shape, str(len(channels)), summary])
        if args.taps:
            aliases = {ours: paper for paper, ours in paper_aliases(config).items()}
            tap_rows = [
                [tap, str(ch), f"{res}x{res}", aliases.get(tap, "")] for tap, (ch, res) in channels.items()
            ]
            details.append(f"\n{name} ({shape}):")
            details.extend("  " + line for line in _format_table(["tap", "channels", "output", "paper"], tap_rows))
    lines = _format_table(["network", "parameters", "input", "taps", "description"], rows)
    out.write("\n".join(lines + details) + "\n")
    return 0


SUBCOMMANDS: dict[str, Subcommand] = {
    "networks": Subcommand(
        help="list the named networks with exact parameter counts and their taps",
        configure=_configure_networks,
        run=_run_networks,
    ),
}


def build_parser(subcommands: Mapping[str, Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(prog="ddae", description="Denoising diffusion autoencoders (DDAE) toolkit.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in subcommands.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.configure(sub)
    return parser


def main(argv: Sequence[str] | None = None, subcommands: Mapping[str, Subcommand] = SUBCOMMANDS) -> int:
    """Run one subcommand (the library's, or a larger set such as the pipeline's); returns the exit code."""
    args = build_parser(subcommands).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return subcommands[args.command].run(args, sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
