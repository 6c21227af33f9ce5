"""The `bios` command: the parser, built from bios.commands, and the dispatch to a subcommand."""

from __future__ import annotations

import argparse
import sys

from bios import __version__
from bios.commands import add_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bios", description="Fine-tune language models.")
    parser.add_argument("--version", action="version", version=f"bios {__version__}")
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
