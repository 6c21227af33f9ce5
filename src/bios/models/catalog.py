"""Known base models: the few numbers Bios needs before (or without) loading any weights.

Learning-rate, rank and batch-size advice scale with a model's hidden size and parameter count,
and the server lists what it can train. Both need these facts for models that are not on disk, so
they live in a table instead of being read from a config at run time. Values are the published
`config.json` ones: `hidden_size`, `num_hidden_layers`, `max_position_embeddings`; `num_params`
counts every distinct parameter once (tied embeddings once, all experts of an MoE model).
"""

from __future__ import annotations

from dataclasses import dataclass
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


def _specs() -> list[ModelSpec]:
    """The catalog rows; instruct/base variants share an architecture, so they share numbers."""
    rows: list[ModelSpec] = []

    def add(names: list[str], family: str, hidden: int, params: int, layers: int, ctx: int) -> None:
        rows.extend(ModelSpec(n, family, hidden, params, layers, ctx) for n in names)

    llama = "meta-llama/Llama-"
    add([f"{llama}3.2-1B", f"{llama}3.2-1B-Instruct"], "llama", 2048, 1_235_814_400, 16, 131072)
    add([f"{llama}3.2-3B", f"{llama}3.2-3B-Instruct"], "llama", 3072, 3_212_749_824, 28, 131072)
    add([f"{llama}3.1-8B", f"{llama}3.1-8B-Instruct"], "llama", 4096, 8_030_261_248, 32, 131072)
    add(
        [f"{llama}3.1-70B", f"{llama}3.1-70B-Instruct", f"{llama}3.3-70B-Instruct"],
        "llama",
        8192,
        70_553_706_496,
        80,
        131072,
    )

    # Qwen2.5: the 7B+ base configs state 131072 positions; every -Instruct config states 32768
    # (longer contexts need YaRN switched on), as do the small base models.
    qwen25 = [
        ("0.5B", 896, 494_032_768, 24, 32768),
        ("1.5B", 1536, 1_543_714_304, 28, 32768),
        ("3B", 2048, 3_085_938_688, 36, 32768),
        ("7B", 3584, 7_615_616_512, 28, 131072),
        ("14B", 5120, 14_770_033_664, 48, 131072),
        ("32B", 5120, 32_763_876_352, 64, 131072),
        ("72B", 8192, 72_706_203_648, 80, 131072),
    ]
    for size, hidden, params, layers, ctx in qwen25:
        add([f"Qwen/Qwen2.5-{size}"], "qwen2", hidden, params, layers, ctx)
        add([f"Qwen/Qwen2.5-{size}-Instruct"], "qwen2", hidden, params, layers, 32768)

    qwen3 = [
        ("0.6B", 1024, 596_049_920, 28),
        ("1.7B", 2048, 1_720_574_976, 28),
        ("4B", 2560, 4_022_468_096, 36),
        ("8B", 4096, 8_190_735_360, 36),
        ("14B", 5120, 14_768_307_200, 40),
        ("32B", 5120, 32_762_123_264, 64),
        ("30B-A3B", 2048, 30_532_122_624, 48),
        ("235B-A22B", 4096, 235_093_634_560, 94),
    ]
    for size, hidden, params, layers in qwen3:
        add([f"Qwen/Qwen3-{size}"], "qwen3", hidden, params, layers, 40960)
    add(["Qwen/Qwen3-4B-Instruct-2507"], "qwen3", 2560, 4_022_468_096, 36, 262144)
    add(["Qwen/Qwen3-8B-Base"], "qwen3", 4096, 8_190_735_360, 36, 32768)

    smol = "HuggingFaceTB/SmolLM2-"
    add([f"{smol}135M", f"{smol}135M-Instruct"], "smollm2", 576, 134_515_008, 30, 8192)
    add([f"{smol}360M", f"{smol}360M-Instruct"], "smollm2", 960, 361_821_120, 32, 8192)
    add([f"{smol}1.7B", f"{smol}1.7B-Instruct"], "smollm2", 2048, 1_711_376_384, 24, 8192)
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
