"""`bios plot RUN`: a run's curves as a PNG."""

from __future__ import annotations

import argparse
import sys


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plot",
        help="draw a run's loss, eval loss, reward, KL and learning rate as a PNG",
        description="Reads RUN/metrics.jsonl and writes the curves (default: RUN/curves.png).",
    )
    parser.add_argument("folder", metavar="RUN", help="a run folder (or a metrics.jsonl file)")
    parser.add_argument("--out", metavar="FILE", help="the PNG to write [RUN/curves.png]")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bios.recipes.plot import plot_run

    try:
        path = plot_run(args.folder, args.out)
    except (OSError, ValueError) as error:
        print(f"bios plot: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0
