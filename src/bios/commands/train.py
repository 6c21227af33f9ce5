"""`bios sft|rl|dpo|distill`: run a recipe with options from the command line and/or a file.

Every field of the recipe's config dataclass is an option (`learning_rate` → `--learning-rate`).
`--config FILE` reads the same names from YAML or JSON (a run's own config.json works, so
`bios sft --config runs/NAME/config.json --resume` continues a run); options given on the
command line win over the file.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

from bios.recipes.config import base_type, fields, from_mapping

RECIPES = {
    "sft": (
        "bios.recipes.sft",
        "SFTConfig",
        "supervised fine-tuning on chat or prompt/completion JSONL",
    ),
    "rl": ("bios.recipes.rl", "RLConfig", "reinforcement learning on prompts with a reward"),
    "dpo": ("bios.recipes.dpo", "DPOConfig", "preference learning on prompt/chosen/rejected JSONL"),
    "distill": ("bios.recipes.distill", "DistillConfig", "on-policy distillation from a teacher"),
}


def add(commands: argparse._SubParsersAction) -> None:
    for name, (module, class_name, summary) in RECIPES.items():
        config_class = getattr(importlib.import_module(module), class_name)
        parser = commands.add_parser(
            name,
            help=summary,
            description=f"{summary}. Settings left out are chosen for the model and the data, "
            "and printed with the reason.",
            argument_default=argparse.SUPPRESS,
        )
        parser.add_argument(
            "--config", metavar="FILE", help="YAML/JSON file of these options (flags win)"
        )
        add_options(parser, config_class)
        parser.set_defaults(run=lambda args, n=name, m=module, c=config_class: run(args, n, m, c))


def add_options(
    parser: argparse.ArgumentParser, config_class: type, skip: tuple[str, ...] = ()
) -> None:
    """One option per config field (except `skip`), with its help text, choices and default."""
    defaults = config_class()
    for name, (field, hint) in fields(config_class).items():
        if name in skip:
            continue
        flags = ["--" + name.replace("_", "-")] + (["--eval"] if name == "eval_data" else [])
        default = getattr(defaults, name)
        help_text = field.metadata.get("help", "")
        if default not in (None, "") and not isinstance(default, bool):
            help_text += f" [{default}]"
        kind, _ = base_type(hint)
        if kind is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                help=help_text + (" [on]" if default else ""),
            )
        else:
            choices = field.metadata.get("choices")
            metavar = field.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "TEXT")
            metavar = None if choices else metavar
            parser.add_argument(*flags, dest=name, metavar=metavar, choices=choices, help=help_text)


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML or JSON mapping of options."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--config: no such file {path}")
    try:
        values = yaml.safe_load(file.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value")
    return values


def run(args: argparse.Namespace, recipe: str, module: str, config_class: type) -> int:
    options = {k: v for k, v in vars(args).items() if k in fields(config_class)}
    try:
        values = read_config_file(args.config) if "config" in args else {}
        config = from_mapping(config_class, {**values, **options}, recipe=recipe)
        folder = importlib.import_module(module).run(config)
    except (ValueError, FileExistsError, ImportError) as error:
        print(f"bios {recipe}: {error}", file=sys.stderr)
        return 2
    print(f"run folder: {folder}")
    print("  result:  the checkpoint marked best in checkpoints.jsonl (RUN stands for it below)")
    print(f"  curves:  bios plot {folder}")
    print(f"  export:  bios export {folder} --merged DIR  (or --adapter DIR)")
    print(f'  try it:  bios sample {folder} "your prompt"')
    return 0
