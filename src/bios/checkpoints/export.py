"""Exporting a checkpoint for use outside Bios.

    export_adapter   a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`)
                     with the base model's tokenizer: `PeftModel.from_pretrained(base, folder)`
    export_merged    a Hugging Face model folder with the adapter merged into the weights,
                     W' = W + (α/r)·B·A on every adapted layer (or a full fine-tuning run's
                     weights): `AutoModelForCausalLM.from_pretrained(folder)`

A checkpoint is the folder of a `bios://…/weights/…` or `…/sampler_weights/…` path. A merged
model computes the same logits as Bios's LoRA model on the same base (in float32, up to
rounding). With tied input/output embeddings and an adapted `lm_head`, the merged model unties
them: the output projection gets the merged copy, the input embedding stays as it was — which is
what the LoRA model computes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from bios.checkpoints.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    FULL_WEIGHTS_FILE,
    has_adapter,
    read_state,
)
from bios.fsutil import atomic_folder
from bios.models.loading import load_tokenizer, resolve_model_path
from bios.models.lora import LoRAAdapter

ADAPTER_FILES = (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE)


def checkpoint_base_model(folder: Path) -> str:
    """The base model a checkpoint folder was trained on."""
    return read_state(folder).base_model


def export_adapter(folder: Path, out: Path) -> Path:
    """Copy a LoRA checkpoint's PEFT adapter and the base tokenizer to `out` (atomically)."""
    base_model = checkpoint_base_model(folder)
    if not has_adapter(folder):
        raise ValueError(f"{folder}: a full fine-tuning checkpoint has no adapter; use --merged")
    with atomic_folder(out) as staging:
        for name in ADAPTER_FILES:
            shutil.copy2(folder / name, staging / name)
        load_tokenizer(base_model).save_pretrained(staging)
    return out


def export_merged(folder: Path, out: Path) -> Path:
    """Write the base model with the checkpoint's weights merged in, as a Hugging Face folder."""
    base_model = checkpoint_base_model(folder)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(base_model), dtype=torch.float32
    )
    with torch.no_grad():
        if has_adapter(folder):
            _merge_adapter(model, LoRAAdapter.load_peft(folder))
        else:
            _load_full_weights(model, load_file(folder / FULL_WEIGHTS_FILE))
    with atomic_folder(out) as staging:
        model.save_pretrained(staging)
        load_tokenizer(base_model).save_pretrained(staging)
    return out


def _merge_adapter(model: nn.Module, adapter: LoRAAdapter) -> None:
    modules = dict(model.named_modules())
    output = model.get_output_embeddings()
    if output is not None and output.weight is model.get_input_embeddings().weight:
        output_name = next(n for n, m in modules.items() if m is output)
        if output_name in adapter.module_names:  # untie, so the delta reaches the output only
            output.weight = nn.Parameter(output.weight.detach().clone())
            model.config.tie_word_embeddings = False
            model.config.get_text_config().tie_word_embeddings = False
    for name in adapter.module_names:
        if name not in modules:
            raise ValueError(f"the adapter adapts {name!r}, which the base model does not have")
        modules[name].weight += adapter.merged_weight(name).to(modules[name].weight.dtype)


def _load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    own = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(own))
    if unknown:
        raise ValueError(f"checkpoint has weights the base model lacks: {unknown[:3]}")
    for name, tensor in weights.items():
        own[name].copy_(tensor)
