"""`bios export PATH --adapter DIR | --merged DIR`: a checkpoint as a PEFT adapter or a merged
Hugging Face model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="write a checkpoint as a PEFT adapter or a merged Hugging Face model",
        description="PATH is a bios:// checkpoint path, a run folder (its result: the checkpoint "
        "marked best in checkpoints.jsonl, else its last) or a checkpoint folder.",
    )
    parser.add_argument("path", metavar="PATH", help="checkpoint path, run folder or folder")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--adapter", metavar="DIR", help="PEFT adapter folder (PeftModel.from_pretrained)"
    )
    target.add_argument(
        "--merged", metavar="DIR", help="merged model folder (AutoModelForCausalLM.from_pretrained)"
    )
    parser.add_argument("--home", help="the Bios home holding checkpoints [$BIOS_HOME]")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from bios.checkpoints.export import export_adapter, export_merged
    from bios.errors import NotFoundError
    from bios.recipes.run_folder import checkpoint_folder_of

    try:
        folder = checkpoint_folder_of(args.path, Path(args.home) if args.home else None)
        if args.adapter:
            out = export_adapter(folder, Path(args.adapter))
            print(f"PEFT adapter written to {out} (from {folder})")
        else:
            out = export_merged(folder, Path(args.merged))
            print(f"merged model written to {out} (from {folder})")
    except (ValueError, NotFoundError) as error:
        print(f"bios export: {error}", file=sys.stderr)
        return 2
    return 0
