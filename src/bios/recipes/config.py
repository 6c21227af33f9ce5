"""The settings every recipe shares, and converting configs to and from plain values.

A recipe's config is a dataclass deriving from `TrainConfig`. Each field carries a one-line help
text (the CLI's `--help`) and, where the values are a fixed set, its choices. A setting left at
None is chosen by the recipe from the model and the data (`bios.recipes.settings`), which prints
the choice and the reason.

`from_mapping` builds a config from plain values (a YAML or JSON file, command-line options),
converting strings to the field's type and naming the key of any bad value; `to_json` is the
inverse (a callable, such as an RL reward function, becomes its `module:name`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bios.hparams import SCHEDULES
from bios.models.loading import DEFAULT_MODEL


def option(
    default: Any, help: str, choices: tuple[str, ...] | None = None, metavar: str | None = None
) -> Any:
    """A config field with its help text (and allowed values, and its CLI placeholder)."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class TrainConfig:
    """Settings shared by every recipe."""

    model: str = option(
        DEFAULT_MODEL, "base model: catalog name, folder, cached hub id or .gguf", metavar="MODEL"
    )
    data: str = option("", "training data, JSONL (required)", metavar="FILE")
    eval_data: str | None = option(None, "held-out data in the same format", metavar="FILE")
    name: str | None = option(
        None, "run name: the run folder is RUNS_DIR/NAME [recipe-date-time]", metavar="NAME"
    )
    runs_dir: str = option("runs", "folder that holds the run folders", metavar="RUNS_DIR")
    init_from: str | None = option(
        None, "start from these weights: bios:// path or run folder", metavar="PATH"
    )
    rank: int | None = option(None, "LoRA rank (default: chosen from the data)")
    learning_rate: float | None = option(None, "peak learning rate (default: chosen for the model)")
    lr_schedule: str = option("linear", "learning-rate schedule", SCHEDULES)
    warmup_steps: int = option(0, "steps of linear warmup")
    batch_size: int | None = option(None, "examples (RL: prompts) per step (default: chosen)")
    steps: int | None = option(None, "optimizer steps (default: from epochs, or chosen)")
    epochs: float | None = option(None, "passes over the data, instead of steps")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip_norm: float = option(0.0, "clip the gradient to this global norm (0: off)")
    eval_every: int | None = option(None, "steps between evaluations (default: 10 per run)")
    save_every: int = option(20, "steps between checkpoints (0: only the final one)")
    tokens_per_request: int = option(
        2048, "send a step's batch in pieces of at most this many tokens (bounds memory)"
    )
    seed: int = option(0, "seed of the LoRA init, the data order and sampling")
    resume: bool = option(False, "continue the run in the run folder from its last checkpoint")
    base_url: str | None = option(
        None, "train on a `bios serve` server (default: in-process)", metavar="URL"
    )
    device: str | None = option(
        None,
        "in-process engine's device: cpu, cuda, cuda:N (default: $BIOS_DEVICE, else a GPU if any)",
        metavar="DEVICE",
    )
    dtype: str | None = option(
        None,
        "in-process base models' dtype (default: bf16 on GPUs, CPUs with native bf16; else fp32)",
        ("auto", "bf16", "fp32"),
    )
    tensorboard: bool = option(False, "also log to TensorBoard (needs `tensorboard`)")
    wandb: bool = option(False, "also log to wandb, offline (needs `wandb`)")
    progress: bool = option(True, "show the progress bar")


# Settings of a session, not of the training trajectory: a resumed run may change them.
SESSION_FIELDS = (
    "resume",
    "base_url",
    "device",
    "dtype",
    "tensorboard",
    "wandb",
    "progress",
    "runs_dir",
    "name",
)
ALIASES = {"eval": "eval_data"}


def fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def base_type(hint: Any) -> tuple[type, bool]:
    """(the non-None type of a hint, whether None is allowed). `str | Callable` counts as str."""
    args = typing.get_args(hint)
    if not args:
        return hint, False
    types = [a for a in args if a is not type(None)]
    concrete = [t for t in types if t in (str, int, float, bool)]
    return (concrete[0] if concrete else types[0]), type(None) in args


def coerce(name: str, value: Any, hint: Any, choices: tuple[str, ...] | None = None) -> Any:
    """`value` as the field's type; strings are parsed (command line, YAML). ValueError names the
    key and what was expected."""
    kind, optional = base_type(hint)
    callable_ok = any(
        typing.get_origin(a) is Callable or a is Callable for a in typing.get_args(hint)
    )
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ValueError(f"{name}: a value is required")
    if callable_ok and callable(value):
        return value
    try:
        if kind is bool:
            value = _bool(value)
        elif kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        elif kind is str and not isinstance(value, str):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {kind.__name__}, got {value!r}") from None
    if choices is not None and value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ValueError


def from_mapping(cls: type, values: Mapping[str, Any], recipe: str | None = None) -> Any:
    """A config of `cls` from plain values; keys may use `-` or `_`. A `recipe` key (as in a
    run's config.json) must match `recipe`."""
    known = fields(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = ALIASES.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
        if key == "recipe":
            if recipe is not None and value != recipe:
                raise ValueError(f"recipe: this config is for {value!r}, not {recipe!r}")
            continue
        if key not in known:
            raise ValueError(f"unknown setting {raw_key!r}; expected one of: {', '.join(known)}")
        field_, hint = known[key]
        kwargs[key] = coerce(key, value, hint, field_.metadata.get("choices"))
    return cls(**kwargs)


def to_json(config: Any) -> dict[str, Any]:
    """The config as JSON values (a callable becomes `module:qualname`)."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if callable(value):
            value = f"{getattr(value, '__module__', '?')}:{getattr(value, '__qualname__', value)}"
        out[f.name] = value
    return out


def merge_for_resume(config: Any, saved: Mapping[str, Any]) -> Any:
    """The config of a resumed run: the saved (resolved) settings, with this session's settings.

    A trajectory setting given here that differs both from the saved run and from its default is
    an error: resuming continues the run as it was configured.
    """
    given = to_json(config)
    defaults = to_json(type(config)())
    values = {k: v for k, v in saved.items() if k != "recipe"}
    conflicts = [
        f"{key}={given[key]!r} (the run has {saved.get(key)!r})"
        for key in given
        if key not in SESSION_FIELDS
        and key in saved
        and given[key] != saved[key]
        and given[key] != defaults[key]
        and not callable(getattr(config, key))
    ]
    if conflicts:
        raise ValueError(
            "resume: these settings differ from the run being resumed: " + "; ".join(conflicts)
        )
    merged = from_mapping(type(config), values)
    keep = {k: getattr(config, k) for k in SESSION_FIELDS}
    keep |= {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if callable(getattr(config, f.name))
    }
    return dataclasses.replace(merged, **keep)
