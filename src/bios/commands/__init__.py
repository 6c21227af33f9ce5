"""Every `bios` subcommand, one module per subcommand or family (cli.py builds the parser from
them and dispatches):

models.py   bios models | resolve [MODEL]
doctor.py   bios doctor METRICS
serve.py    bios serve                    (--nproc-per-node N: on N ranks, rank 0 serves)
keys.py     bios keys create|revoke|list
launch.py   bios launch SCRIPT            (the torchrun command; each rank runs bios/launch.py)
train.py    bios sft | rl | dpo | distill     (options from each recipe's config dataclass)
sweep.py    bios sweep lr|rank|batch       (SFT runs varying one setting)
sample.py   bios sample MODEL_OR_PATH "prompt"
runs.py     bios runs
export.py   bios export PATH --adapter DIR | --merged DIR
plot.py     bios plot RUN
console.py  bios console [RUNS_DIR]     (the web console over run folders, read-only)
"""

from __future__ import annotations

import argparse

from bios.commands import (
    console,
    doctor,
    export,
    keys,
    launch,
    models,
    plot,
    runs,
    sample,
    serve,
    sweep,
    train,
)

# The order `bios --help` lists them in.
MODULES = (models, doctor, serve, keys, launch, train, sweep, sample, runs, export, plot, console)


def add_commands(commands: argparse._SubParsersAction) -> None:
    for module in MODULES:
        module.add(commands)
