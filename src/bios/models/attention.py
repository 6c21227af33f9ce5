"""The attention function of every model Bios loads with SDPA: transformers' own, except for a
prompt (more than one query) on the CPU, above all one with a mask (packed rows,
`bios.engine.batch`).

There, two things measure better than transformers' `sdpa_attention_forward` (a 2-core Xeon with
AMX, torch 2.13, SmolLM2-135M's heads, 4 rows × 185 tokens with a block-diagonal mask, forward +
backward of one layer):

- **Float32 arithmetic for a bf16 model.** torch's CPU flash-attention backward with a mask in
  bf16 takes 3× as long as in float32 (20 ms against 7 ms); the casts cost far less than the
  difference, and float32 softmax is the more accurate. The output is cast back to the model's
  dtype, so the layers around see what they always saw. The same in forward and backward, so a
  datum's logprobs do not depend on whether a gradient is asked for. What the backward keeps
  stays in the model's dtype (`CpuAttention`): the float32 copies are made again there.
- **Grouped-query attention without copies.** With a mask, transformers repeats each key/value
  head for every query head it serves (`repeat_kv`) before SDPA; the CPU kernel takes the groups
  itself, with the same result bit for bit, and autograd keeps k and v at their own width (a
  third of the queries' on SmolLM2) instead of the repeated copies.

Together: 11 ms for the layer's attention against 19 ms.

Packed rows attend sequence by sequence. The engine passes the rows' segment ids in the mask's
place (`segment_mask`), and each sequence runs the causal kernel, in float32, on its own slice
of the row (`SegmentAttention`): a masked kernel computes every (query, key) pair of a row, this
the causal half of each sequence's. Measured on a 2-core AMD EPYC with `avx512_bf16` (16 chats
of 37–80 tokens, forward + backward of one layer): 10.5 ms sequence by sequence against 14.1 ms
for 5 masked rows of 181 (in bf16 the short causal calls take 25 ms). The attention's cost no
longer grows with a row's width, so the engine packs rows with the least padding
(`bios.engine.batch.row_width` with no attention cost). A mask a caller gives is computed over
whole rows as above.

Without a mask (causal rows of one sequence each) transformers already groups the heads, and
its bf16 causal kernel was as fast as float32's on the Xeon (8 × 256 tokens: 30 ms against 34
ms; 45 against 39 on the EPYC above): the same kernel runs, in the model's dtype, with the same
bits, and only what is kept changes (the output once). On CUDA, for a float32 model's
decoding step and for a prefill over a cache without a mask, transformers' function runs as is.

A 16-bit model's decoding step on the CPU (one query a row over the KV cache) attends in float32
too (`decode_attention`): torch's bf16 kernel for one query takes 5× the float32 kernel's time
for 16 rows over 170 positions (measured; its cost grows with the cache as a per-call repacking
of keys and values would). The decode keeps its cache in float32 for it (`cache_dtype`), so
only the query is cast.
"""

from __future__ import annotations

from typing import Any

import torch
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


def takes_segments(model: nn.Module) -> bool:
    """Whether `model`'s prompts attend to packed rows given as segment ids (`segment_mask`):
    Bios's attention on the CPU."""
    return uses_attention(model) and model.device.type == "cpu"


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Packed rows' (R, L) segment ids — one id ≥ 0 per sequence, −1 on a row's padding — in
    the form `attention_forward` takes in place of a block-diagonal mask: (R, 1, 1, L), 4-D, so
    transformers hands it to every layer's attention as it does any prepared mask, and of an
    integer dtype, which no real mask has."""
    return segment_ids[:, None, None, :]


def _is_segment_mask(mask: torch.Tensor | None) -> bool:
    return mask is not None and not mask.is_floating_point() and mask.dtype != torch.bool


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
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    unsupported = dropout or any(
        kwargs.get(name) for name in ("position_bias", "softcap", "output_attentions")
    )
    delegated = (
        query.device.type != "cpu"
        or query.shape[2] == 1
        or (attention_mask is None and (not causal or key.shape[2] != query.shape[2]))
        or unsupported
    )
    if _is_segment_mask(attention_mask):
        if delegated or key.shape[2] != query.shape[2]:
            raise ValueError(
                "attention_mask: segment ids are for a prompt on the CPU without a cache, got "
                f"{query.shape[2]} queries over {key.shape[2]} keys on {query.device.type}"
            )
        dtype = compute_dtype(query.dtype, query.device)
        return SegmentAttention.apply(query, key, value, attention_mask, scaling, dtype), None
    one_query = query.shape[2] == 1 and query.device.type == "cpu" and not unsupported
    if one_query and compute_dtype(key.dtype, key.device) != query.dtype:
        return decode_attention(query, key, value, attention_mask, scaling), None
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
    if attention_mask is None:  # causal rows of one sequence each: the model's dtype
        return CpuAttention.apply(query, key, value, None, scaling, query.dtype), None
    dtype = compute_dtype(query.dtype, query.device)
    if attention_mask.dtype == torch.bool:  # the additive form SDPA makes of a boolean mask
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
        mask.masked_fill_(~attention_mask, float("-inf"))
    else:
        mask = attention_mask.to(dtype)
    return CpuAttention.apply(query, key, value, mask, scaling, dtype), None


def cache_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a decode's KV cache keeps for a model of `dtype` on `device`: that of its
    attention's arithmetic, float32 for a 16-bit model on the CPU (see `decode_attention`)."""
    return compute_dtype(dtype, device)


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """One query per row over a (float32) KV cache, for a 16-bit model on the CPU:
    softmax(q·kᵀ·scale + mask)·v in float32, returned as (batch, 1, heads, head dim) in the
    query's dtype. torch's bf16 CPU kernel for one query is the slow one: on SmolLM2's heads,
    16 rows over 170 cached positions, 1.7 ms a layer against 0.3 ms in float32 (1 row: 0.18
    against 0.07 ms; a 2-core AMD EPYC with `avx512_bf16`). The cache then keeps float32 keys
    and values (`cache_dtype`), twice bf16's bytes, so nothing is cast but the query; a bf16
    cache is cast here."""
    dtype = torch.promote_types(compute_dtype(query.dtype, query.device), key.dtype)
    mask = attention_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    output = torch.nn.functional.scaled_dot_product_attention(
        query.to(dtype),
        key.to(dtype),
        value.to(dtype),
        attn_mask=mask,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return output.transpose(1, 2).to(query.dtype)


class CpuAttention(torch.autograd.Function):
    """torch's CPU flash attention in `dtype`, with an additive mask or causal, keeping the inputs
    in their own dtype and the output only as the (batch, length, heads, head dim) tensor the
    output projection reads anyway: a bf16 SmolLM2 layer keeps 1.9 kB a token for its attention
    where SDPA on float32 copies would keep 6.1 kB, transformers' bf16 SDPA with repeated heads
    4.6 kB, without them 3.1 kB. The backward casts them again and runs the kernel's own
    backward: in the model's dtype it is autograd's of SDPA bit for bit; computing a bf16 model
    in float32 it reads the output as rounded to bf16 (as GPU flash attention in bf16 does).
    Grouped-query heads are the kernel's (its key/value heads may be fewer)."""

    @staticmethod
    def forward(
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query.to(dtype),
            key.to(dtype),
            value.to(dtype),
            is_causal=mask is None,
            attn_mask=mask,
            scale=scale,
        )
        result = output.to(query.dtype).transpose(1, 2).contiguous()
        ctx.save_for_backward(query, key, value, result, logsumexp, mask)
        ctx.scale, ctx.dtype = scale, dtype
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, result, logsumexp, mask = ctx.saved_tensors
        dtype = ctx.dtype
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.transpose(1, 2).to(dtype),
            query.to(dtype),
            key.to(dtype),
            value.to(dtype),
            result.transpose(1, 2).to(dtype),
            logsumexp,
            0.0,
            mask is None,
            attn_mask=mask,
            scale=ctx.scale,
        )
        grad_query, grad_key, grad_value = (
            g.to(x.dtype) for g, x in zip(grads, (query, key, value), strict=True)
        )
        return grad_query, grad_key, grad_value, None, None, None


def _spans(segment_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, stop) of every sequence in (R, 1, 1, L) segment ids; padding (−1) has none."""
    ids = segment_ids.reshape(segment_ids.shape[0], segment_ids.shape[-1])
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    rows, columns = starts.nonzero(as_tuple=True)
    firsts = list(zip(rows.tolist(), columns.tolist(), ids[rows, columns].tolist(), strict=True))
    spans = []
    for index, (row, start, segment) in enumerate(firsts):
        last = index + 1 == len(firsts) or firsts[index + 1][0] != row
        stop = ids.shape[1] if last else firsts[index + 1][1]
        if segment >= 0:
            spans.append((row, start, stop))
    return spans


class SegmentAttention(torch.autograd.Function):
    """Causal attention within each sequence of packed rows, sequence by sequence: torch's CPU
    flash kernel in `dtype` on each sequence's slice of q, k and v (grouped-query heads are the
    kernel's), written into one (batch, length, heads, head dim) output in the query's dtype;
    padding positions attend to nothing and get zeros. Each sequence's values are what the
    kernel gives for it alone. Kept for the backward, as by `CpuAttention`: q, k and v in their
    own dtype, the output once, and the float32 log-sum-exp (batch, heads, length)."""

    @staticmethod
    def forward(
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        segment_ids: torch.Tensor,
        scale: float | None,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        spans = _spans(segment_ids)
        q, k, v = (x.to(dtype) for x in (query, key, value))
        batch, heads, length, head_dim = query.shape
        result = query.new_zeros(batch, length, heads, head_dim)
        # The kernel's accumulation type: float32, float64 for a float64 model.
        lse_dtype = torch.promote_types(dtype, torch.float32)
        logsumexp = query.new_zeros(batch, heads, length, dtype=lse_dtype)
        for row, start, stop in spans:
            piece = (slice(row, row + 1), slice(None), slice(start, stop))
            output, piece_logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q[piece], k[piece], v[piece], is_causal=True, scale=scale
            )
            result[row, start:stop] = output[0].transpose(0, 1)
            logsumexp[piece] = piece_logsumexp
        ctx.save_for_backward(query, key, value, result, logsumexp)
        ctx.spans, ctx.scale, ctx.dtype = spans, scale, dtype
        return result

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        query, key, value, result, logsumexp = ctx.saved_tensors
        dtype = ctx.dtype
        q, k, v = (x.to(dtype) for x in (query, key, value))
        grad_output = grad.transpose(1, 2).to(dtype)
        output = result.transpose(1, 2).to(dtype)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
        for row, start, stop in ctx.spans:
            piece = (slice(row, row + 1), slice(None), slice(start, stop))
            pieces = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_output[piece],
                q[piece],
                k[piece],
                v[piece],
                output[piece],
                logsumexp[piece],
                0.0,
                True,
                scale=ctx.scale,
            )
            for total, part in zip(grads, pieces, strict=True):
                total[piece] = part
        grad_query, grad_key, grad_value = (
            g.to(x.dtype) for g, x in zip(grads, (query, key, value), strict=True)
        )
        return grad_query, grad_key, grad_value, None, None, None


def register() -> str:
    """Make `ATTENTION` an `attn_implementation` transformers knows (its masks are SDPA's)."""
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


def uses_attention(model: nn.Module) -> bool:
    """Whether `model` attends through `attention_forward`."""
    return getattr(model.config, "_attn_implementation", None) == ATTENTION


def mask_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the additive mask `model`'s attention adds to its scores: that of a masked
    prompt's arithmetic here, else the model's (eager attention)."""
    if uses_attention(model):
        return compute_dtype(model.dtype, model.device)
    return model.dtype
