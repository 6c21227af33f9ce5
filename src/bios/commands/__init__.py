"""The `bios` subcommands of the recipes and their runs (cli.py registers them).

train.py    bios sft | rl | dpo | distill     (options from each recipe's config dataclass)
sample.py   bios sample MODEL_OR_PATH "prompt"
runs.py     bios runs
export.py   bios export PATH --adapter DIR | --merged DIR
plot.py     bios plot RUN
sweep.py    bios sweep lr|rank|batch       (SFT runs varying one setting)
"""

from __future__ import annotations

import argparse

from bios.commands import export, plot, runs, sample, sweep, train


def add_commands(commands: argparse._SubParsersAction) -> None:
    for module in (train, sweep, sample, runs, export, plot):
        module.add(commands)
