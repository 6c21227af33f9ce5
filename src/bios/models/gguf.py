"""Converting a GGUF file into a plain transformers folder (float32 safetensors + tokenizer).

transformers reads GGUF with the `gguf` package and dequantizes it; what GGUF metadata loses or
garbles (special-token ids, the chat template, float32 noise in config values, a build label as
the model name) is repaired here so the saved folder loads like any Hugging Face model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

PROVENANCE = "bios_source.json"  # written beside converted weights: what they were made from


def convert_gguf_to_folder(gguf: Path, out: Path, name: str) -> None:
    """Dequantize `gguf` to float32 and save model and tokenizer as a plain transformers folder."""
    try:  # newer transformers may keep GGUF blocks packed unless told to dequantize
        from transformers import GgufConfig

        dequantize: dict[str, Any] = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older releases always dequantize
        dequantize = {}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **dequantize
    )
    _drop_gguf_quantization(model)
    _fix_up(model, tokenizer, gguf, name)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    stat = gguf.stat()
    source = {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (out / PROVENANCE).write_text(json.dumps({**source, "dtype": "float32"}, indent=2) + "\n")


def _drop_gguf_quantization(model: PreTrainedModel) -> None:
    """Check the weights are dense tensors, then forget the GGUF `quantization_config`.

    Kept, it would send every later load of the saved folder through the GGUF quantizer (and
    `save_pretrained` refuses to write a model that still has a GGUF quantizer attached).
    """
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed or not all(p.dtype.is_floating_point for p in model.parameters()):
        raise RuntimeError(f"GGUF weights were not dequantized (packed modules: {packed[:3]})")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.is_quantized = False


def _fix_up(model: PreTrainedModel, tokenizer: Any, gguf: Path, name: str) -> None:
    """Repair what GGUF metadata loses: special-token ids, chat template, lengths, float noise."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, key)
        if value is not None:
            setattr(model.config, key, value)
            setattr(model.generation_config, key, value)
    if not tokenizer.chat_template:
        tokenizer.chat_template = _gguf_chat_template(gguf)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and tokenizer.model_max_length > 10**9:
        tokenizer.model_max_length = context
    eps = getattr(model.config, "rms_norm_eps", None)
    if isinstance(eps, float):  # GGUF stores float32, so 1e-5 comes back as 9.999999747e-06
        short = float(f"{eps:.6g}")
        if struct.pack("f", short) == struct.pack("f", eps):
            model.config.rms_norm_eps = short
    if hasattr(model.config, "_model_name_or_path"):  # GGUF's `general.name`, often a build label
        model.config._model_name_or_path = name


def _gguf_chat_template(gguf: Path) -> str | None:
    """The chat template in the GGUF metadata, for transformers versions that do not copy it."""
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.chat_template")
    return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")
