"""What the engine's memory planner (`bios.engine.memory`) expects a training step to need, per
model size: the figures `bios serve` and `ServiceClient` check against the device before a run
is created or a request is queued.

For each model (the published configs' shapes, built on the meta device, so nothing is
allocated and nothing is downloaded) and each setting — LoRA rank 32 on attention, MLP and
lm_head, or full fine-tuning; bf16 base weights; one step of 8 × 2048 tokens, plain or with
gradient checkpointing — it prints:

  weights     the base model in bf16 (2 bytes a parameter), shared by every run on it
  run         the run's own state: float32 trainable weights, gradients and two AdamW moments
              (16 bytes a trainable parameter), plus a full run's float32 master copy
  step        activations kept for the backward pass, the attention mask and one logits chunk
              (`step_bytes`), plain and checkpointed
  total       weights + run + step, what one run's step needs at its peak

and, for sampling, what one decode of 16 samples × (512 prompt + 1536 new tokens) needs besides
the weights (`sample_bytes`): its KV cache in bf16 (a GPU) and in float32 (what a bf16 model's
decode keeps on the CPU), and the whole decode's estimate with the bf16 cache.

These are the planner's estimates, not measurements: the tests check that the estimate bounds
what autograd really keeps (1.1–1.2× of it on the tiny models). Run:

    python benchmarks/memory_plan.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bios.engine.batch import pack_sequences
from bios.engine.decoding import SampleRequest, SampleSettings
from bios.engine.memory import (
    GIB,
    Shape,
    cache_bytes,
    run_bytes,
    sample_bytes,
    step_bytes,
    trainable_parameters,
)
from bios.models.rms_norm import fuse_rms_norms
from bios.models.swiglu import fuse_swiglu_mlps
from bios.types import LoraConfig

sys.path.insert(0, str(Path(__file__).parent))
from gpu_check import LLAMA_SHAPES  # the shapes live in one place

SHAPES = {
    "SmolLM2-135M": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    **LLAMA_SHAPES,
}
SEQUENCES, LENGTH, RANK = 8, 2048, 32
SAMPLES, PROMPT, NEW_TOKENS = 16, 512, 1536
LORA = LoraConfig(rank=RANK)


def meta_model(shape: dict) -> torch.nn.Module:
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**shape, torch_dtype=torch.bfloat16))
    # As `load_model` gives it to the engine: the planner counts the MLP's 2i and the norms'
    # scales only.
    fuse_swiglu_mlps(model)
    fuse_rms_norms(model)
    return model.to(torch.bfloat16)


def main() -> None:
    tokens = torch.zeros(LENGTH, dtype=torch.int64)
    batch = pack_sequences([tokens] * SEQUENCES, [tokens] * SEQUENCES, {})
    print(f"One step of {SEQUENCES} × {LENGTH} tokens, bf16 base weights (GiB):")
    header = ("model", "setting", "weights", "run", "step", "step ckpt", "total", "total ckpt")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, shape_config in SHAPES.items():
        model = meta_model(shape_config)
        shape = Shape.of(model)
        parameters = sum(p.numel() for p in model.parameters())
        weights = 2 * parameters
        for setting, lora in (("LoRA r32", LORA), ("full", None)):
            trained = trainable_parameters(model, lora)
            run = run_bytes(trained, 4 * parameters if lora is None else 0)
            rank = lora.rank if lora is not None else None
            plain = step_bytes(shape, batch, False, rank)
            checkpointed = step_bytes(shape, batch, True, rank)
            cells = [weights, run, plain, checkpointed, weights + run + plain]
            cells.append(weights + run + checkpointed)
            print(f"| {name} | {setting} | " + " | ".join(f"{c / GIB:.1f}" for c in cells) + " |")
    settings = SampleSettings(max_tokens=NEW_TOKENS, temperature=1.0, top_k=-1, top_p=1.0, seed=0)
    request = SampleRequest([0] * PROMPT, SAMPLES, settings)
    print(f"\nOne decode of {SAMPLES} samples × ({PROMPT} + {NEW_TOKENS}) tokens (GiB):")
    header = ("model", "KV cache bf16", "KV cache float32 (CPU)", "decode total (bf16 cache)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, shape_config in SHAPES.items():
        shape = Shape.of(meta_model(shape_config))
        positions = PROMPT + NEW_TOKENS
        cells = [cache_bytes(shape, SAMPLES, positions, b) for b in (2, 4)]
        cells.append(sample_bytes(shape, [request], 2))
        print(f"| {name} | " + " | ".join(f"{c / GIB:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
