"""RMSNorm in one kernel while decoding: `torch.nn.functional.rms_norm` for the Llama, Qwen2 and
Qwen3 RMSNorm layers.

Their forward, w · x / sqrt(mean(x²) + ε) in float32, is five tensor operations, and a decode step
runs 2 · layers + 1 of them (Qwen3 two more per layer) on a few rows, where each operation costs
its dispatch rather than its arithmetic: measured ~2% of a 16-row decode step of SmolLM2-135M.
`rms_norm` computes the same formula in one call; the logits of a whole model came out bit-equal
here (tests compare sampling with and without it).

Only float32 norms of those three classes are swapped (other classes may differ: Gemma's scales
by 1 + w), on the instance and for the duration of a decode, as `bios.engine.packed` does for the
linear layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

RMS_NORMS = (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm)


def _rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.rms_norm(
        x, module.weight.shape, module.weight, module.variance_epsilon
    )


@contextmanager
def fused_rms_norms(model: nn.Module) -> Iterator[None]:
    """Inside this block the model's RMSNorm layers run as one `rms_norm` call each."""
    modules = [
        module
        for module in model.modules()
        if isinstance(module, RMS_NORMS) and module.weight.dtype == torch.float32
    ]
    # The forward each had on the instance (`bios.models.rms_norm`'s, installed for the model's
    # life), put back afterwards.
    previous = [module.__dict__.get("forward") for module in modules]
    for module in modules:
        module.forward = partial(_rms_norm, module)
    try:
        yield
    finally:
        for module, forward in zip(modules, previous, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
