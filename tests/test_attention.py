"""Bios's attention function (`bios.models.attention`) against transformers' SDPA attention and
a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from bios.models.attention import (
    attention_forward,
    cache_dtype,
    segment_mask,
    uses_attention,
)
from bios.models.loading import load_model
from bios.models.rms_norm import fuse_rms_norms
from bios.models.swiglu import fuse_swiglu_mlps
from helpers import saved_storages
from tiny_models import FAMILIES


class Module(torch.nn.Module):
    """What an attention function reads of its module."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def block_diagonal(lengths: list[int], dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, T, T) additive mask: causal within each sequence, nothing across."""
    segments = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    causal = torch.ones(len(segments), len(segments), dtype=torch.bool).tril()
    allowed = (segments[:, None] == segments[None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def packed_segments(rows: list[list[int]], width: int) -> torch.Tensor:
    """(R, width) segment ids of sequences of the given lengths packed row by row (ids counted
    across rows), −1 on the padding at a row's end."""
    ids, next_id = torch.full((len(rows), width), -1), 0
    for row, lengths in enumerate(rows):
        start = 0
        for length in lengths:
            ids[row, start : start + length] = next_id
            start, next_id = start + length, next_id + 1
    return ids


def segments_to_mask(ids: torch.Tensor) -> torch.Tensor:
    """(R, 1, L, L) additive float64 mask of packed segment ids: causal within a sequence,
    nothing across; a padding position attends to itself only (so no row is empty)."""
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    allowed = (same & causal) | torch.eye(length, dtype=torch.bool)
    return torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, -torch.inf)[
        :, None
    ]


def reference(q, k, v, mask, groups):
    """softmax(q·kᵀ/√d + mask)·v in float64, each key/value head repeated for its group."""
    k, v = (x.double().repeat_interleave(groups, dim=1) for x in (k, v))
    scores = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        scores = scores + mask.double()
    else:
        length = q.shape[2]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


@pytest.mark.parametrize("boolean", [False, True], ids=["additive", "boolean"])
def test_bf16_attention_computes_in_float32(boolean):
    """A bf16 prompt with a mask on the CPU: the float32 computation on the same inputs, rounded
    once to bf16 at the end, grouped-query heads without copies; values and gradients within
    bf16's rounding of the float64 reference. A boolean mask is its additive form."""
    generator = torch.Generator().manual_seed(3)
    groups, lengths = 3, [7, 12, 5]
    shape = (2, 2, sum(lengths), 64)
    k, v = (torch.randn(*shape, generator=generator).bfloat16() for _ in range(2))
    q = torch.randn(2, 2 * groups, sum(lengths), 64, generator=generator).bfloat16()
    mask = block_diagonal(lengths, torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]

    given = mask == 0 if boolean else mask.bfloat16()  # as transformers or Bios would pass it
    output, weights = attention_forward(Module(groups), *leaves, given)
    assert weights is None and output.dtype == torch.bfloat16
    assert output.shape == (2, sum(lengths), 2 * groups, 64)
    in_float32 = F.scaled_dot_product_attention(
        q.float(),
        k.float().repeat_interleave(groups, dim=1),
        v.float().repeat_interleave(groups, dim=1),
        attn_mask=mask == 0 if boolean else mask,
    )
    torch.testing.assert_close(output, in_float32.bfloat16().transpose(1, 2), atol=0, rtol=0)

    expected = reference(q, k, v, mask, groups)
    assert relative_error(output, expected) < 4e-3  # bf16: 8 significant bits
    cotangent = torch.randn(output.shape, generator=generator).bfloat16()
    grads = torch.autograd.grad(output, leaves, cotangent)
    references = [x.double().requires_grad_() for x in (q, k, v)]
    expected_grads = torch.autograd.grad(
        reference(*references, mask, groups), references, cotangent.double()
    )
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert grad.dtype == torch.bfloat16 and grad.shape == expected_grad.shape, name
        assert relative_error(grad, expected_grad) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_rows_attend_sequence_by_sequence(dtype):
    """Segment ids in the mask's place: each sequence attends causally to itself alone. Values
    and gradients within the dtype's rounding of the float64 block-diagonal reference (bf16
    computes in float32 and rounds once); padding gets zeros and passes no gradient; in float32
    each sequence's values are transformers' SDPA on the sequence alone."""
    generator = torch.Generator().manual_seed(6)
    groups, width = 3, 24
    ids = packed_segments([[7, 12, 5], [9, 10]], width)
    real = ids >= 0
    q = torch.randn(2, 2 * groups, width, 64, generator=generator).to(dtype)
    k, v = (torch.randn(2, 2, width, 64, generator=generator).to(dtype) for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    output, weights = attention_forward(Module(groups), *leaves, segment_mask(ids))
    assert weights is None and output.dtype == dtype and output.shape == (2, width, 6, 64)
    assert not output[~real].any()

    mask = segments_to_mask(ids)
    expected = reference(q, k, v, mask, groups)
    value_bound, grad_bound = (1e-6, 1e-6) if dtype == torch.float32 else (4e-3, 1e-2)
    assert relative_error(output[real], expected[real]) < value_bound
    cotangent = torch.randn(output.shape, generator=generator).to(dtype)
    grads = torch.autograd.grad(output, leaves, cotangent)
    references = [x.double().requires_grad_() for x in (q, k, v)]
    padding_free = cotangent.double() * real[:, :, None, None]
    expected_grads = torch.autograd.grad(
        reference(*references, mask, groups), references, padding_free
    )
    for name, grad, expected_grad in zip("qkv", grads, expected_grads, strict=True):
        assert grad.dtype == dtype and not grad.transpose(1, 2)[~real].any(), name
        assert relative_error(grad, expected_grad) < grad_bound, name
    if dtype == torch.float32:
        for row, start, stop in [(0, 0, 7), (0, 7, 19), (0, 19, 24), (1, 0, 9), (1, 9, 19)]:
            alone = [x[row : row + 1, :, start:stop] for x in (q, k, v)]
            theirs, _ = sdpa_attention_forward(Module(groups), *alone, None)
            assert torch.equal(output[row : row + 1, start:stop], theirs)


def test_segment_ids_are_only_for_a_prompt():
    """Segment ids where attention would not take them (one query over a cache) are refused,
    not read as a mask."""
    q = torch.randn(1, 6, 1, 64)
    k, v = (torch.randn(1, 2, 9, 64) for _ in range(2))
    with pytest.raises(ValueError, match="segment ids"):
        attention_forward(Module(3), q, k, v, segment_mask(packed_segments([[4, 5]], 9)))


@pytest.mark.parametrize("masked", ["block-diagonal", "causal", "segments"])
def test_bf16_attention_keeps_its_inputs_and_output_in_bf16(masked):
    """What the backward keeps: q, k and v in bf16 at their own widths (no repeated heads, no
    float32 copies), the output as returned (the tensor the output projection reads anyway),
    the float32 log-sum-exp and the mask shared by every layer (segment ids: none); nothing
    else."""
    generator = torch.Generator().manual_seed(4)
    lengths = [10, 6]
    q = torch.randn(2, 6, 16, 64, generator=generator).bfloat16().requires_grad_()
    k, v = (
        torch.randn(2, 2, 16, 64, generator=generator).bfloat16().requires_grad_() for _ in range(2)
    )
    masks = {
        "block-diagonal": block_diagonal(lengths, torch.float32),
        "causal": None,
        "segments": segment_mask(packed_segments([lengths, [16]], 16)),
    }
    mask = masks[masked]
    with saved_storages([] if masked != "block-diagonal" else [mask]) as seen:
        output, _ = attention_forward(Module(3), q, k, v, mask)
    kept = {q.untyped_storage().data_ptr(), k.untyped_storage().data_ptr()}
    kept |= {v.untyped_storage().data_ptr(), output.untyped_storage().data_ptr()}
    assert kept <= set(seen)
    log_sum_exp = 2 * 6 * 16 * 4  # (batch, heads, length) float32
    assert sum(seen.values()) == 2 * (q.numel() + k.numel() + v.numel() + output.numel()) + (
        log_sum_exp
    )


def test_without_a_mask_it_is_transformers_attention():
    """A causal prompt without a mask: the same bits as transformers' own SDPA function, in the
    model's dtype, values and gradients."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 6, 9, 64, generator=generator).bfloat16()
    k, v = (torch.randn(1, 2, 9, 64, generator=generator).bfloat16() for _ in range(2))
    cotangent = torch.randn(1, 9, 6, 64, generator=generator).bfloat16()
    results = []
    for function in (attention_forward, sdpa_attention_forward):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        output, _ = function(Module(3), *leaves, None)
        results.append((output, *torch.autograd.grad(output, leaves, cotangent)))
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("cache", ["bf16 cache", "float32 cache"])
def test_one_query_of_a_bf16_model_is_float32_attention(cache):
    """A decoding step of a bf16 model on the CPU (one query over the cache, masked or not) is
    torch's SDPA computed on float32 copies, output and gradients rounded to bf16 once,
    bit for bit — over a bf16 cache or the float32 one decoding keeps (`cache_dtype`) — and
    within bf16 rounding of a float64 computation. A float32 model's step is transformers' own."""
    assert cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert cache_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert cache_dtype(torch.bfloat16, torch.device("meta")) == torch.bfloat16  # not a CPU
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(3, 6, 1, 64, generator=generator).bfloat16()
    kv_dtype = torch.float32 if cache == "float32 cache" else torch.bfloat16
    k, v = (torch.randn(3, 2, 9, 64, generator=generator).to(kv_dtype) for _ in range(2))
    cotangent = torch.randn(3, 1, 6, 64, generator=generator).bfloat16()
    padding = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    padding[1, ..., :4] = False  # row 1's prompt was shorter: left padding
    for mask in (None, padding):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        output, _ = attention_forward(Module(3), *leaves, mask)
        ours = (output, *torch.autograd.grad(output, leaves, cotangent))
        wide = [x.float().requires_grad_() for x in (q, k, v)]
        expected = F.scaled_dot_product_attention(*wide, attn_mask=mask, enable_gqa=True)
        expected = expected.transpose(1, 2)
        theirs = (expected, *torch.autograd.grad(expected, wide, cotangent.float()))
        assert output.dtype == torch.bfloat16
        for mine, reference, leaf in zip(ours, theirs, (output, *leaves), strict=True):
            assert torch.equal(mine, reference.to(leaf.dtype))
        # float64 reference, by the formula: softmax(q·kᵀ/8 + mask)·v, grouped heads
        q64, k64, v64 = (x.double() for x in (q, k, v))
        scores = q64 @ k64.repeat_interleave(3, dim=1).transpose(-1, -2) / 8
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        by_hand = (scores.softmax(-1) @ v64.repeat_interleave(3, dim=1)).transpose(1, 2)
        torch.testing.assert_close(output.double(), by_hand, atol=1e-2, rtol=1e-2)
    # A float32 model: transformers' own function, unchanged.
    leaves = [x.float() for x in (q, k, v)]
    ours, _ = attention_forward(Module(3), *leaves, padding)
    theirs, _ = sdpa_attention_forward(Module(3), *leaves, padding)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("family", FAMILIES)
def test_models_attend_as_transformers_does(family, tiny_models):
    """Every model `load_model` gives attends through Bios's function; in float32 its logits on
    packed rows (restarting positions, a block-diagonal mask) equal transformers' SDPA model's
    bit for bit, and the gradients of a loss with respect to the input embeddings within 1e-6."""
    folder = tiny_models[family]
    ours = load_model(folder).model
    theirs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")
    fuse_swiglu_mlps(theirs)
    fuse_rms_norms(theirs)
    theirs.eval().requires_grad_(False)
    assert uses_attention(ours) and not uses_attention(theirs)

    lengths = [9, 14, 6]
    generator = torch.Generator().manual_seed(7)
    rows = torch.randint(3, 300, (1, sum(lengths)), generator=generator)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    mask = block_diagonal(lengths, torch.float32)
    embeddings = ours.get_input_embeddings()(rows)
    cotangent = torch.randn(1, sum(lengths), ours.config.vocab_size, generator=generator)
    results = []
    for model in (ours, theirs):
        leaf = embeddings.clone().requires_grad_()
        logits = model(inputs_embeds=leaf, position_ids=position_ids, attention_mask=mask).logits
        (grad,) = torch.autograd.grad(logits, leaf, cotangent)
        results.append((logits.detach(), grad))
    (our_logits, our_grad), (their_logits, their_grad) = results
    assert torch.equal(our_logits, their_logits)
    assert relative_error(our_grad, their_grad) < 1e-6
