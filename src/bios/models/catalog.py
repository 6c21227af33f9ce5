"""Known base models: the few numbers Bios needs before (or without) loading any weights.

Learning-rate, rank and batch-size advice scale with a model's hidden size and parameter count,
and the server lists what it can train. Both need these facts for models that are not on disk, so
they live in a table instead of being read from a config at run time. Values are the published
`config.json` ones: `hidden_size`, `num_hidden_layers`, `max_position_embeddings`; `num_params`
counts every distinct parameter once (tied embeddings once, all experts of an MoE model).

`model_spec` finds a model's spec: the table by name, else its `config.json` (no weights loaded).

The layer shapes (`intermediate_size`, attention heads, `head_dim`, `vocab_size`, experts) are
there for LoRA parameter counts (`bios.hparams.lora_param_count`); with them every row's
`num_params` is reproduced exactly (checked in `tests/test_hparams.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

FAMILIES = ("llama", "qwen2", "qwen3", "smollm2")

# transformers `model_type` -> Bios family. SmolLM2 is a Llama architecture, told apart by name.
_MODEL_TYPE_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3"}


@dataclass(frozen=True)
class ModelSpec:
    """What Bios knows about a base model without loading it."""

    name: str
    family: str
    hidden_size: int
    num_params: int
    num_layers: int
    context_length: int
    # Layer shapes, for LoRA parameter counts; None where unknown (a spec built from a config).
    intermediate_size: int | None = None  # MLP width; per expert for an MoE model
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int | None = None
    num_experts: int = 0  # routed experts per MoE layer; 0 for a dense model


def _specs() -> list[ModelSpec]:
    """The catalog rows; instruct/base variants share an architecture, so they share numbers."""
    rows: list[ModelSpec] = []

    def add(
        names: list[str],
        family: str,
        hidden: int,
        params: int,
        layers: int,
        ctx: int,
        shape: tuple[int, int, int, int, int, int],
    ) -> None:
        """`shape`: (intermediate size, heads, kv heads, head dim, vocab size, experts)."""
        rows.extend(ModelSpec(n, family, hidden, params, layers, ctx, *shape) for n in names)

    llama = "meta-llama/Llama-"
    llama_rows = [
        ("3.2-1B", 2048, 1_235_814_400, 16, (8192, 32, 8, 64, 128256, 0)),
        ("3.2-3B", 3072, 3_212_749_824, 28, (8192, 24, 8, 128, 128256, 0)),
        ("3.1-8B", 4096, 8_030_261_248, 32, (14336, 32, 8, 128, 128256, 0)),
        ("3.1-70B", 8192, 70_553_706_496, 80, (28672, 64, 8, 128, 128256, 0)),
    ]
    for size, hidden, params, layers, shape in llama_rows:
        names = [f"{llama}{size}", f"{llama}{size}-Instruct"]
        if size == "3.1-70B":
            names.append(f"{llama}3.3-70B-Instruct")
        add(names, "llama", hidden, params, layers, 131072, shape)

    # Qwen2.5: the 7B+ base configs state 131072 positions; every -Instruct config states 32768
    # (longer contexts need YaRN switched on), as do the small base models.
    # Shapes: (intermediate, heads, kv heads, head dim, vocab, experts); 7B+ have a larger vocab.
    qwen25 = [
        ("0.5B", 896, 494_032_768, 24, 32768, (4864, 14, 2, 64, 151936, 0)),
        ("1.5B", 1536, 1_543_714_304, 28, 32768, (8960, 12, 2, 128, 151936, 0)),
        ("3B", 2048, 3_085_938_688, 36, 32768, (11008, 16, 2, 128, 151936, 0)),
        ("7B", 3584, 7_615_616_512, 28, 131072, (18944, 28, 4, 128, 152064, 0)),
        ("14B", 5120, 14_770_033_664, 48, 131072, (13824, 40, 8, 128, 152064, 0)),
        ("32B", 5120, 32_763_876_352, 64, 131072, (27648, 40, 8, 128, 152064, 0)),
        ("72B", 8192, 72_706_203_648, 80, 131072, (29568, 64, 8, 128, 152064, 0)),
    ]
    for size, hidden, params, layers, ctx, shape in qwen25:
        add([f"Qwen/Qwen2.5-{size}"], "qwen2", hidden, params, layers, ctx, shape)
        add([f"Qwen/Qwen2.5-{size}-Instruct"], "qwen2", hidden, params, layers, 32768, shape)

    # MoE rows: the intermediate size is `moe_intermediate_size` (per expert, all layers sparse).
    qwen3 = [
        ("0.6B", 1024, 596_049_920, 28, (3072, 16, 8, 128, 151936, 0)),
        ("1.7B", 2048, 1_720_574_976, 28, (6144, 16, 8, 128, 151936, 0)),
        ("4B", 2560, 4_022_468_096, 36, (9728, 32, 8, 128, 151936, 0)),
        ("8B", 4096, 8_190_735_360, 36, (12288, 32, 8, 128, 151936, 0)),
        ("14B", 5120, 14_768_307_200, 40, (17408, 40, 8, 128, 151936, 0)),
        ("32B", 5120, 32_762_123_264, 64, (25600, 64, 8, 128, 151936, 0)),
        ("30B-A3B", 2048, 30_532_122_624, 48, (768, 32, 4, 128, 151936, 128)),
        ("235B-A22B", 4096, 235_093_634_560, 94, (1536, 64, 4, 128, 151936, 128)),
    ]
    for size, hidden, params, layers, shape in qwen3:
        add([f"Qwen/Qwen3-{size}"], "qwen3", hidden, params, layers, 40960, shape)
    add(["Qwen/Qwen3-4B-Instruct-2507"], "qwen3", 2560, 4_022_468_096, 36, 262144, qwen3[2][4])
    add(["Qwen/Qwen3-8B-Base"], "qwen3", 4096, 8_190_735_360, 36, 32768, qwen3[3][4])

    smol = "HuggingFaceTB/SmolLM2-"
    smol_rows = [
        ("135M", 576, 134_515_008, 30, (1536, 9, 3, 64, 49152, 0)),
        ("360M", 960, 361_821_120, 32, (2560, 15, 5, 64, 49152, 0)),
        ("1.7B", 2048, 1_711_376_384, 24, (8192, 32, 32, 64, 49152, 0)),
    ]
    for size, hidden, params, layers, shape in smol_rows:
        names = [f"{smol}{size}", f"{smol}{size}-Instruct"]
        add(names, "smollm2", hidden, params, layers, 8192, shape)
    return rows


CATALOG: tuple[ModelSpec, ...] = tuple(_specs())  # in listing order: family, then size
_BY_ID = {spec.name.lower(): spec for spec in CATALOG}
_BY_SHORT = {spec.name.rsplit("/", 1)[-1].lower(): spec for spec in CATALOG}


def lookup(name: str) -> ModelSpec | None:
    """The catalog row for a hub id, ignoring case; `Qwen3-8B` and `/models/Qwen3-8B` also match.

    Matching on the part after the last slash lets a local copy or a re-upload of a known model
    (same architecture under another namespace) get the same advice as the original.
    """
    key = name.strip().rstrip("/").lower()
    return _BY_ID.get(key) or _BY_SHORT.get(key.rsplit("/", 1)[-1])


def _text_config(config: Any) -> Any:
    """The decoder's config; multimodal configs nest it, plain ones are their own."""
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def family_from_config(config: Any) -> str | None:
    """The Bios family of a transformers config; None for an architecture outside the four."""
    return _MODEL_TYPE_FAMILIES.get(getattr(_text_config(config), "model_type", None) or "")


def spec_from_config(name: str, config: Any, num_params: int) -> ModelSpec:
    """A spec for a model the catalog does not list, read from its loaded config.

    SmolLM2 checkpoints say `model_type: llama`, so they are recognised by name. An architecture
    outside the four families keeps its `model_type` as family so it still loads and trains;
    family-specific advice then falls back to defaults.
    """
    text = _text_config(config)
    family = family_from_config(config) or str(getattr(text, "model_type", "unknown"))
    if family == "llama" and "smollm" in name.lower():
        family = "smollm2"
    return ModelSpec(
        name=name,
        family=family,
        hidden_size=int(text.hidden_size),
        num_params=int(num_params),
        num_layers=int(text.num_hidden_layers),
        context_length=int(getattr(text, "max_position_embeddings", 0) or 0),
    )


def model_spec(model: str | os.PathLike[str] | ModelSpec) -> ModelSpec | None:
    """What Bios can learn about `model` without loading weights; None when nothing is known.

    Order: a `ModelSpec` as given; the catalog by name (`lookup`); otherwise the model's
    `config.json` through transformers' `AutoConfig` with `local_files_only=True` (a local folder
    or a hub id in the local cache; nested `text_config`s included). A spec read from a config has
    `num_params=0` (not counted) and its family is the `model_type` when it is none of Bios's four.
    """
    if isinstance(model, ModelSpec):
        return model
    name = os.fspath(model)
    spec = lookup(name)
    if spec is not None:
        return spec
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # not a folder, not cached, not a transformers config: nothing known
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "hidden_size", None) is None:
        return None
    return replace(spec_from_config(name, config, 0), **_layer_shapes(text))


def _layer_shapes(text: Any) -> dict[str, int | None]:
    """The ModelSpec shape fields read from a (text) transformers config."""
    heads = getattr(text, "num_attention_heads", None)
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or 0
    inter = getattr(text, "moe_intermediate_size", None) if experts else None
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads else None)
    return {
        "intermediate_size": inter or getattr(text, "intermediate_size", None),
        "num_heads": heads,
        "num_kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "vocab_size": getattr(text, "vocab_size", None),
        "num_experts": int(experts),
    }
