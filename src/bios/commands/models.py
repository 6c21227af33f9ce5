"""`bios models` (the models Bios knows) and `bios resolve [MODEL]` (a model's folder)."""

from __future__ import annotations

import argparse


def list_models(args: argparse.Namespace) -> int:
    from bios.models.catalog import CATALOG

    for spec in CATALOG:
        print(
            f"{spec.name:45s} {spec.family:8s} "
            f"hidden={spec.hidden_size:<6d} params={spec.num_params:,}"
        )
    return 0


def resolve(args: argparse.Namespace) -> int:
    from bios.models.loading import DEFAULT_MODEL, resolve_model_path

    print(resolve_model_path(args.model or DEFAULT_MODEL))
    return 0


def add(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser("models", help="list the models Bios knows (family, size)")
    models.set_defaults(run=list_models)
    parser = commands.add_parser(
        "resolve",
        help="find (and for GGUF or the default model, convert once) a model; print its folder",
    )
    parser.add_argument(
        "model", nargs="?", help="name, folder or .gguf file (default: the default model)"
    )
    parser.set_defaults(run=resolve)
