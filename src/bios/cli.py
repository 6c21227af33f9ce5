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


def _cmd_doctor(args: argparse.Namespace) -> int:
    from bios.diagnostics import diagnose, read_metrics

    try:
        records = read_metrics(args.metrics)
    except (OSError, ValueError) as error:
        print(f"bios doctor: cannot read {args.metrics}: {error}", file=sys.stderr)
        return 2
    steps = [r["step"] for r in records if isinstance(r.get("step"), int)]
    span = f", steps {min(steps)}–{max(steps)}" if steps else ""
    print(f"{args.metrics}: {len(records)} records{span}")
    findings = diagnose(records)
    for finding in findings:
        print(finding)
    if not findings:
        print("no problems found")
    return 1 if any(f.severity == "error" for f in findings) else 0


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
    doctor = commands.add_parser(
        "doctor",
        help="read a run's metrics and say what went wrong and which setting to change "
        "(exit 1 if a finding is an error)",
    )
    doctor.add_argument("metrics", help="a metrics.jsonl file, or a run folder holding one")
    doctor.set_defaults(run=_cmd_doctor)
    from bios.server.commands import add_commands as add_server_commands

    add_server_commands(commands)
    from bios.launch import add_commands as add_launch_commands

    add_launch_commands(commands)
    from bios.commands import add_commands as add_recipe_commands

    add_recipe_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
