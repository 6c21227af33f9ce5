"""`bios runs`: the recipe runs in a runs folder and the checkpoints in $BIOS_HOME."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "runs",
        help="list recipe runs and checkpoints, with their paths",
        description="List the runs in a runs folder (progress, last metrics, checkpoints) and "
        "every checkpoint saved under the Bios home.",
    )
    parser.add_argument("--dir", default="runs", help="the runs folder [runs]")
    parser.add_argument("--home", help="the Bios home holding checkpoints [$BIOS_HOME]")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bios.checkpoints.paths import KINDS
    from bios.models.loading import bios_home
    from bios.recipes.progress import summary
    from bios.recipes.run_folder import list_runs

    folders = list_runs(args.dir)
    print(f"Runs in {Path(args.dir).resolve()}: {len(folders) or 'none'}")
    for folder in folders:
        config = folder.saved_config() or {}
        metrics = folder.metrics()
        step = max((r.get("step", 0) for r in metrics), default=0)
        last = {k: v for r in metrics for k, v in r.items()}  # latest value of each metric
        print(
            f"  {folder.path}  {config.get('recipe')}  {config.get('model')}  "
            f"step {step}/{config.get('steps')}  {summary(last)}"
        )
        for checkpoint in folder.checkpoints():
            final = "  (final)" if checkpoint.get("final") else ""
            loss = f"  eval {checkpoint['eval_loss']:.4f}" if "eval_loss" in checkpoint else ""
            result = f"  <- result: {checkpoint.get('why')}" if checkpoint.get("best") else ""
            print(f"      step {checkpoint['step']:>6}  {checkpoint['path']}{final}{loss}{result}")
    home = Path(args.home) if args.home else bios_home()
    saved = sorted(
        folder
        for kind in KINDS
        for folder in (home / "runs").glob(f"*/{kind}/*")
        if folder.is_dir() and not folder.name.startswith(".")
    )
    print(f"\nCheckpoints in {home / 'runs'}: {len(saved) or 'none'}")
    for folder in saved:
        run_id, kind, name = folder.parts[-3:]
        print(f"  bios://{run_id}/{kind}/{name}  {folder}")
    return 0
