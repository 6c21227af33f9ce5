"""The `bios` command."""

from __future__ import annotations

import argparse
import sys

from bios import __version__


def _cmd_models(args: argparse.Namespace) -> int:
    from bios.models.catalog import CATALOG

    for spec in CATALOG:
        print(
            f"{spec.name:45s} {spec.family:8s} "
            f"hidden={spec.hidden_size:<6d} params={spec.num_params:,}"
        )
    return 0


def _cmd_fetch_default(args: argparse.Namespace) -> int:
    from bios.models.loading import DEFAULT_MODEL, resolve_model_path

    print(resolve_model_path(args.model or DEFAULT_MODEL))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bios", description="Fine-tune language models.")
    parser.add_argument("--version", action="version", version=f"bios {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    models = commands.add_parser("models", help="list the models Bios knows (family, size)")
    models.set_defaults(run=_cmd_models)
    resolve = commands.add_parser(
        "resolve",
        help="find (and for GGUF or the default model, convert once) a model; print its folder",
    )
    resolve.add_argument(
        "model", nargs="?", help="name, folder or .gguf file (default: the default model)"
    )
    resolve.set_defaults(run=_cmd_fetch_default)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
