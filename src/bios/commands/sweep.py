"""`bios sweep lr|rank|batch`: vary one setting around the SFT defaults and compare eval loss.

Takes every `bios sft` option (the settings the variations share) plus the values to try. The
runs are ordinary SFT run folders inside the sweep's folder, so `bios doctor`, `bios plot` and
`bios sample` work on each of them.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from bios.commands.train import add_options, read_config_file
from bios.recipes.config import fields, from_mapping
from bios.recipes.sft import SFTConfig

if TYPE_CHECKING:
    from bios.recipes.sweep_report import SweepResult


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sweep",
        help="SFT runs that vary one setting (lr, rank or batch) around the defaults; "
        "compare final eval loss",
        description="Runs `bios sft` once per value of one setting, everything else as `bios sft` "
        "would choose it (or as given), and writes OUT/sweep.csv, sweep.md and sweep.png. "
        "Defaults: lr ×0.25 ×0.5 ×1 ×2 ×4 the chosen LR; rank 8 16 32 64 128; batch ×0.5 ×1 ×2 "
        "the chosen batch (its LR scaled by √batch, as `bios sft` does).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("setting", metavar="{lr,rank,batch}", help="the setting to vary")
    values = parser.add_mutually_exclusive_group()
    values.add_argument(
        "--values", nargs="+", metavar="X", help="the values to try (spaces or commas)"
    )
    values.add_argument(
        "--multipliers", nargs="+", metavar="X", help="factors on the value `bios sft` chooses"
    )
    parser.add_argument(
        "--out", metavar="DIR", help="the sweep's folder [RUNS_DIR/sweep-SETTING-DATE-TIME]"
    )
    parser.add_argument(
        "--config", metavar="FILE", help="YAML/JSON file of the SFT options (flags win)"
    )
    # The variations' names are their values, and each is a new run.
    add_options(parser, SFTConfig, skip=("name", "resume"))
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bios.recipes.sweep import SweepConfig, parse_numbers, run_sweep

    options = {k: v for k, v in vars(args).items() if k in fields(SFTConfig)}
    try:
        values = read_config_file(args.config) if "config" in args else {}
        # Only the final checkpoint of each variation, unless asked: a sweep makes many runs.
        config = from_mapping(SFTConfig, {"save_every": 0, **values, **options}, recipe="sft")
        sweep = SweepConfig(
            sft=config,
            setting=args.setting,
            values=parse_numbers("values", args.values) if "values" in args else None,
            multipliers=(
                parse_numbers("multipliers", args.multipliers) if "multipliers" in args else None
            ),
            out=getattr(args, "out", None),
        )
        result = run_sweep(sweep)
    except (ValueError, FileExistsError, ImportError) as error:
        print(f"bios sweep: {error}", file=sys.stderr)
        return 2
    show(result)
    return 0


def show(result: SweepResult) -> None:
    """The sweep's table, the notes and the best value, on the terminal."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from bios.recipes.sweep_report import TABLE_HEAD, table_rows, value_text

    # The value is the LR itself in an LR sweep: no second LR column.
    keep = [i for i, head in enumerate(TABLE_HEAD) if not (result.setting == "lr" and head == "LR")]
    table = Table(title=f"sweep of {result.setting}", box=box.SIMPLE_HEAD)
    for i in keep:
        table.add_column(TABLE_HEAD[i], justify="right" if i < len(TABLE_HEAD) - 1 else "left")
    for cells in table_rows(result):
        table.add_row(*(cells[i].replace("**", "") for i in keep))
    # Wide enough for every column when the output goes to a file or a pipe.
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    for note in result.notes:
        console.print(f"  {note}")
    best = result.best
    line = (
        f"best {result.setting}: {value_text(result.setting, best.value)} "
        f"(final eval loss {best.final_eval_loss:.5f})"
    )
    default = next((row for row in result.rows if row.default), None)
    if default is not None and not default.best:
        line += (
            f"; the default {value_text(result.setting, default.value)} is "
            f"{default.ratio_to_best - 1:.2%} worse"
        )
    elif default is not None:
        line += ", the default"
    console.print(line)
    console.print(f"results: {result.out}/sweep.csv, sweep.md, sweep.png")
