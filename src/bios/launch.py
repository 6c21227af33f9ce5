"""The entry point each rank of `bios launch` starts in (the command: bios.commands.launch).

    torchrun --standalone --nproc-per-node 2 -m bios.launch train.py --my-flag

In each rank, `python -m bios.launch` runs the script on rank 0 only — its `ServiceClient()`
gets a DistributedEngine that spreads every request over the ranks — while the other ranks run
rank 0's commands until the script ends. The script is the same one you run in one process;
nothing in it changes. In one process it just runs the script.
"""

from __future__ import annotations

import os
import runpy
import sys

from bios.distributed import process_engine, shutdown_process_engine, spans_ranks


def run_script(argv: list[str]) -> int:
    """In each rank: rank 0 runs the script, the others follow rank 0's commands."""
    if not argv:
        print("usage: python -m bios.launch SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    script, *script_args = argv
    if spans_ranks():
        # Decided before the script starts: rank 0 goes on with the engine its ServiceClient()
        # will get; every other rank follows rank 0 here and exits.
        process_engine()
    try:
        _run(script, script_args)
    finally:
        shutdown_process_engine()  # the other ranks leave their loop (one process: nothing)
    return 0


def _run(script: str, script_args: list[str]) -> None:
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    sys.exit(run_script(sys.argv[1:]))
