"""The on-disk layout of a checkpoint folder, and its one reader.

A checkpoint is a folder (see `paths.py` for where it lives) holding

    bios_state.json              what the weights are: format, run id, base model, LoRA settings
                                 (or null for full fine-tuning), steps taken
    adapter_config.json          a LoRA run's adapter in PEFT's format (`models/lora.py`), which
    adapter_model.safetensors    `peft.PeftModel.from_pretrained(base, folder)` loads
    model.safetensors            a full fine-tuning run's weights instead
    optimizer.safetensors        the AdamW moments (`<param>.exp_avg`, `.exp_avg_sq`, `.step`),
                                 for `weights/` checkpoints only

Every folder is written whole by `bios.fsutil.atomic_folder`; `read_state` is the only code that
parses `bios_state.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bios.errors import InvalidInputError
from bios.models.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from bios.types import LoraConfig

STATE_FILE = "bios_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
FULL_WEIGHTS_FILE = "model.safetensors"
STATE_FORMAT = 1

__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "FULL_WEIGHTS_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "SavedState",
    "describe_state",
    "has_adapter",
    "has_full_weights",
    "is_checkpoint",
    "read_state",
    "write_state",
]


@dataclass(frozen=True)
class SavedState:
    """The contents of a checkpoint's `bios_state.json`."""

    base_model: str
    lora: dict[str, Any] | None  # LoraConfig's fields; None for full fine-tuning
    steps: int
    run_id: str | None
    modified_ns: int  # the state file's mtime: changes when the checkpoint is overwritten

    @property
    def is_lora(self) -> bool:
        return self.lora is not None

    def lora_config(self) -> LoraConfig | None:
        return LoraConfig(**self.lora) if self.lora is not None else None


def is_checkpoint(folder: Path) -> bool:
    return (folder / STATE_FILE).is_file()


def has_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG_FILE).is_file()


def has_full_weights(folder: Path) -> bool:
    return (folder / FULL_WEIGHTS_FILE).is_file()


def read_state(folder: Path, field: str = "path") -> SavedState:
    """The saved state of a checkpoint folder; InvalidInputError (naming `field`) if the folder
    is not a Bios checkpoint."""
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise InvalidInputError(field, f"{folder.name}: not a Bios checkpoint (no {STATE_FILE})")
    saved = json.loads(state_file.read_text())
    return SavedState(
        base_model=saved["base_model"],
        lora=saved["lora"],
        steps=int(saved.get("steps", 0)),
        run_id=saved.get("run_id"),
        modified_ns=state_file.stat().st_mtime_ns,
    )


def describe_state(
    run_id: str, base_model: str, lora: LoraConfig | None, steps: int
) -> dict[str, Any]:
    """The `bios_state.json` record of a run's weights."""
    return {
        "format": STATE_FORMAT,
        "run_id": run_id,
        "base_model": base_model,
        "lora": lora.model_dump() if lora is not None else None,
        "steps": steps,
    }


def write_state(folder: Path, description: dict[str, Any]) -> None:
    (folder / STATE_FILE).write_text(json.dumps(description, indent=2))
