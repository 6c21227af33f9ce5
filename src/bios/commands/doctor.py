"""`bios doctor METRICS`: read a run's metrics and say what went wrong and what to change."""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
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


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor",
        help="read a run's metrics and say what went wrong and which setting to change "
        "(exit 1 if a finding is an error)",
    )
    parser.add_argument("metrics", help="a metrics.jsonl file, or a run folder holding one")
    parser.set_defaults(run=run)
