"""The attention function of every model Bios loads with SDPA: transformers' own, except where a
prompt (more than one query) is attended on the CPU.

There, two things measure better than transformers' `sdpa_attention_forward` (a 2-core Xeon with
AMX, torch 2.13, SmolLM2-135M's heads, 4 rows × 185 tokens with a block-diagonal mask, forward +
backward of one layer):

- **Float32 arithmetic for a bf16 model.** torch's CPU flash-attention backward in bf16 takes
  3× as long as in float32 (20 ms against 7 ms); the casts cost far less than the difference,
  and float32 softmax is the more accurate. The output is cast back to the model's dtype, so the
  layers around see what they always saw. One rule for forward and backward alike, so a datum's
  logprobs do not depend on whether a gradient is asked for.
- **Grouped-query attention without copies.** With a mask, transformers repeats each key/value
  head for every query head it serves (`repeat_kv`) before SDPA; the CPU kernel takes the groups
  itself (`enable_gqa`), with the same result bit for bit, and autograd keeps k and v at their
  own width (a third of the queries' on SmolLM2) instead of the repeated copies.

Together: 10.7 ms for the layer's attention against 21.4 ms. On CUDA, and for one query (a
decoding step), transformers' function runs unchanged: its bf16 kernels are the fast ones there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION = "bios_sdpa"


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a prompt's attention computes in: float32 for a 16-bit model on the CPU, else
    the model's."""
    half = dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if device.type == "cpu" and half else dtype


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """softmax(q·kᵀ·scaling + mask)·v over (batch, heads, length, head dim) inputs, returned as
    (batch, length, heads, head dim) in the query's dtype, as transformers' attention functions
    return it."""
    q_length, kv_length = query.shape[2], key.shape[2]
    delegated = (
        query.device.type != "cpu"
        or q_length == 1
        or (attention_mask is None and kv_length != q_length)  # a prefill over a cache
        or any(kwargs.get(name) for name in ("position_bias", "softcap", "output_attentions"))
    )
    if delegated:
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    dtype = compute_dtype(query.dtype, query.device)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    output = F.scaled_dot_product_attention(
        query.to(dtype),
        key.to(dtype),
        value.to(dtype),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=mask is None and causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return output.to(query.dtype).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make `ATTENTION` an `attn_implementation` transformers knows (its masks are SDPA's)."""
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def uses_attention(model: nn.Module) -> bool:
    """Whether `model` attends through `attention_forward`."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION
