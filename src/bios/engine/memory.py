"""Memory planned before work is queued: what a run or a request needs, against what is free.

A request that does not fit is refused with the numbers and the setting to change, instead of
dying in an out-of-memory crash that would take every tenant's runs on the worker with it.

What a training request holds at its peak (per decoder layer l = 1…L, per token computed, with
b = bytes per element of the base model's dtype, h = hidden size, q = the query width (heads ×
head dim), k = the key/value width (kv heads × head dim), i = the MLP width, n = query heads):

    activations   L · tokens · (b·(5h + q + 2k' + m·i) + 4n + norms)
                  5h: the two norms' inputs and the inputs of the attention and MLP projections
                  (shared by q/k/v and gate/up) and of the output projection; q + 2k': rotated
                  q and k, and v, with k' = q where rows share (a mask makes transformers repeat
                  the key/value heads for SDPA) unless Bios's attention groups the heads itself
                  (on the CPU, `bios.models.attention`, which keeps them in the model's dtype
                  even where it computes in float32), else k; 4n: the attention's log-sum-exp;
                  m·i:
                  the MLP's gate and up, m = 2 where every layer's MLP is fused
                  (`bios.models.swiglu`, as `load_model` installs it on Llama, Qwen2 and Qwen3:
                  the product is recomputed for the backward; 3 in a checkpointed layer, which
                  keeps it), else m = 4: the product and the activation's output too; norms: 8
                  bytes (a float32 scale a
                  norm) where every RMSNorm keeps only its input (`bios.models.rms_norm`, also
                  installed by `load_model`), else 8h (each norm's float32 input); Qwen3's
                  per-head q and k norms add b·(q + k) + 4·(n + kv heads) fused, (4 + b)·(q + k)
                  plain
                  with gradient checkpointing: L · tokens · b·h (each layer's input) plus one
                  layer's activations while it is recomputed
    around        tokens · (2·b·h + 8·head dim): the final norm's input, the real tokens'
                  hidden states, the rotary cos and sin (float32, shared by the layers)
    attention     the block-diagonal additive mask, rows × row length² × b (one for all layers),
                  none where Bios's CPU attention takes the rows' segment ids instead
    LoRA          per token and adapted layer, the rank-r intermediate A·x (r × 4 bytes), small;
                  in bf16 also the factors' bf16 casts, b · r · (in + out) each
and on top of what is kept, the larger of two moments:
    logits        the unembedding's chunks, at the end of the forward: chunk tokens ×
                  vocabulary × 4 bytes × 3 (the log-softmax buffer, and the next chunk's logits
                  and lm_head's LoRA delta, the spent chunk let go; `engine/forward.py`),
                  lm_head's LoRA gradients twice (a chunk's and their running sum), and the
                  hidden states' gradient twice (the chunks' pieces, then joined), tokens · 2b·h
    backward      a layer's MLP backward: tokens · b · (3i + 2h), the product's gradient and
                  gate's and up's (`bios.models.swiglu` writes each over the temporary it comes
                  from), and the residual stream's gradient

What a decode batch holds at its peak (`sample_bytes`; R rows = the batch's samples, S = its most
`max_tokens`, P_j its prompts' lengths, P the longest, c = bytes per element of the KV cache's
dtype, `bios.models.attention.cache_dtype`: float32 for a bf16 model on the CPU, V the vocabulary,
K the most `topk_sample_logprobs` asked):

    KV cache      L · 2k · R · (P + S) · c: every row's keys and values (the buffers grow to no
                  more, `bios.engine.kv_cache`), plus one layer's while its buffers are copied
                  into larger ones, plus the prompts' own caches, L · 2k · Σ P_j · b, held
                  until the batch's is built from them
    decode state  R · S · (12 + 12·K): the tokens (int64), their logprobs (float32), the top-K
    a step        R · V · (b + 48): the new logits and their float32 copy, the logits chosen
                  from, and the token choice's float32/int64 temporaries (sorting for top-p)
    a prefill     (its largest prompt) P · (b·(5h + 2q + 2k + 3i) + 4·(q + 2k)): one layer's
                  tensors without gradients, float32 attention copies on the CPU; and the
                  logits kept for its prompt logprobs, (N + 1) · V · (b + 8) with N the positions
                  scored (all of the prompt, or `prompt_logprobs_last_n`)

the larger of a step and a prefill counted once. Each `sample` call is checked alone when it
arrives, against all of the device's memory (what can never fit is refused at once), and again
against the free memory when the worker is about to decode it (its future then fails with the
same kind of error, nothing decoded); requests that arrive together share a batch only while the
batch's estimate fits.

A run holds its trainable parameters in float32 four times over: weights, gradients, and the
two AdamW moments (16 bytes a parameter); a full fine-tuning run also its own copy of the model.
A training request's backward makes a fresh set of gradients (4 bytes a trainable value), which
its check counts on top of the step; those accumulated since the last `optim_step` are
allocated already, so not free. A full fine-tuning run on a bf16 engine computes under
`torch.autocast` from its float32 weights, which keeps a bf16 copy of every weight a matrix
product reads for as long as the step lasts (`weight_cast_bytes`: 2 bytes a weight, 2.5 GB for
Llama-3.2-1B): counted on top as well. A step of a few tokens is all but these copies and the
gradients (on a tiny model, 8 tokens: a measured peak of 4.6 MiB, 1.2 MiB above the estimate
without them).

The estimates are upper bounds of the step's peak: tests compare them with the most the CPU
allocator had allocated at once during real steps (what autograd keeps and every transient,
from the allocator's own events: 1.03-1.05× it without checkpointing) and with the bytes autograd
saves; the free memory is the device's (`torch.cuda.mem_get_info` plus what
torch's caching allocator holds unused) or the host's `MemAvailable`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from bios.engine.batch import PackedBatch
from bios.engine.decoding import SampleRequest
from bios.engine.forward import chunk_tokens_for
from bios.errors import InvalidInputError
from bios.models.attention import takes_segments
from bios.models.lora import find_targets, target_names
from bios.models.rms_norm import fused_norms
from bios.models.swiglu import fused_mlps
from bios.types import LoraConfig

GIB = 1 << 30
# Refuse what would leave less than this share of the free memory: allocator fragmentation,
# temporaries of the backward pass and the other requests of the worker need room too.
HEADROOM = 0.9


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclass(frozen=True)
class Shape:
    """The sizes of a model that memory depends on."""

    layers: int
    hidden: int
    kv_width: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    mlp_tensors: int = 4  # (tokens × intermediate) tensors an MLP keeps: 2 fused, 4 plain
    norms_fused: bool = False  # every RMSNorm keeps only its input (and a scale a row)
    heads: int = 1
    head_dim: int = 0  # 0: hidden / heads
    qk_norms: bool = False  # per-head norms of q and k (Qwen3)
    # Bios's CPU attention (`bios.models.attention.takes_segments`): k and v kept at their own
    # width, packed rows attended sequence by sequence (no mask).
    cpu_attention: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        layers = config.num_hidden_layers
        qk_norms = any(hasattr(module, "q_norm") for module in model.modules())
        norms = 2 * layers + 1 + (2 * layers if qk_norms else 0)
        return cls(
            layers=layers,
            hidden=config.hidden_size,
            kv_width=kv_heads * head_dim,
            intermediate=config.intermediate_size,
            vocab=model.get_output_embeddings().weight.shape[0],
            dtype_bytes=model.dtype.itemsize,
            # 2 only if every layer's MLP is fused: an estimate that must stay an upper bound.
            mlp_tensors=2 if fused_mlps(model) >= layers else 4,
            norms_fused=fused_norms(model) >= norms,
            heads=heads,
            head_dim=head_dim,
            qk_norms=qk_norms,
            cpu_attention=takes_segments(model),
        )

    @property
    def q_width(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    def layer_bytes_per_token(self, shares_rows: bool = True, checkpointed: bool = False) -> int:
        b, h, q, k = self.dtype_bytes, self.hidden, self.q_width, self.kv_width
        kv = q if shares_rows and not self.cpu_attention else k
        mlp = self.mlp_tensors + (1 if checkpointed and self.mlp_tensors == 2 else 0)
        per_token = b * (5 * h + q + 2 * kv + mlp * self.intermediate)
        per_token += 4 * self.heads + (2 * 4 if self.norms_fused else 2 * 4 * h)
        if self.qk_norms:
            kv_heads = k // (self.head_dim or self.hidden // self.heads)
            if self.norms_fused:
                per_token += b * (q + k) + 4 * (self.heads + kv_heads)
            else:
                per_token += (4 + b) * (q + k)
        return per_token


def lora_width(shape: Shape) -> int:
    """Σ (in + out) over a decoder layer's seven projections (q, k, v, o, gate, up, down): a
    rank-r adapter on all of them has r times as many values a layer."""
    h, q, k, i = shape.hidden, shape.q_width, shape.kv_width, shape.intermediate
    return (h + q) + 2 * (h + k) + (q + h) + 2 * (h + i) + (i + h)


def step_bytes(
    shape: Shape, batch: PackedBatch, checkpoint_layers: bool, lora_rank: int | None
) -> int:
    """What a forward + backward of `batch` holds at its peak (see the module docstring)."""
    tokens = batch.input_ids.numel()  # the padding at the rows' ends is computed too
    b, rank = shape.dtype_bytes, lora_rank or 0
    per_layer = shape.layer_bytes_per_token(batch.shares_rows, checkpoint_layers)
    if checkpoint_layers:
        activations = shape.layers * tokens * b * shape.hidden
        activations += tokens * per_layer
    else:
        activations = shape.layers * tokens * per_layer
    around = tokens * (2 * b * shape.hidden + 8 * (shape.q_width // shape.heads))
    rows, width = batch.input_ids.shape
    masked = batch.shares_rows and not shape.cpu_attention
    attention = rows * width * width * b if masked else 0
    lora = shape.layers * tokens * 7 * 4 * rank
    if b != 4:  # the float32 factors' casts to the model's dtype, kept for the backward
        lora += b * rank * (shape.layers * lora_width(shape) + shape.hidden + shape.vocab)
    # Then the larger of two moments on top of what is kept. The unembedding's chunks, at the
    # end of the forward: a chunk's logits, their log-softmax and its gradient, lm_head's LoRA
    # gradients (a chunk's and their running sum), and the hidden states' gradient (the chunks'
    # pieces, then joined into one tensor). Or the backward of a layer's MLP: the product's
    # gradient and the gradients of gate and up, three (tokens × intermediate) tensors at once
    # (`SiLUMul.backward`), and the residual stream's gradient.
    chunk = min(batch.num_tokens, chunk_tokens_for(shape.vocab, batch.input_ids.device))
    logits = chunk * shape.vocab * 4 * 3 + 2 * 4 * rank * (shape.hidden + shape.vocab)
    logits += tokens * 2 * b * shape.hidden
    backward = tokens * b * (3 * shape.intermediate + 2 * shape.hidden)
    return activations + around + attention + lora + max(logits, backward)


def cache_bytes(shape: Shape, rows: int, positions: int, element_bytes: int) -> int:
    """The keys and values of every layer for `rows` rows of `positions` positions."""
    return shape.layers * 2 * shape.kv_width * rows * positions * element_bytes


def scored_positions(request: SampleRequest) -> int:
    """How many prompt positions a request's prefill scores (whose logits it keeps)."""
    if not (request.prompt_logprobs or request.topk_prompt_logprobs > 0):
        return 0
    last_n = request.prompt_logprobs_last_n
    return len(request.prompt) - 1 if last_n is None else last_n


def sample_bytes(shape: Shape, requests: Sequence[SampleRequest], cache_element_bytes: int) -> int:
    """What decoding `requests` as one batch holds at its peak (see the module docstring)."""
    b, h, k = shape.dtype_bytes, shape.hidden, shape.kv_width
    q, i, vocab = shape.q_width, shape.intermediate, shape.vocab
    rows = sum(r.num_samples for r in requests)
    steps = max(r.settings.max_tokens for r in requests)
    longest = max(len(r.prompt) for r in requests)
    top_k = max(r.topk_sample_logprobs for r in requests)
    cache = cache_bytes(shape, rows, longest + steps, cache_element_bytes)
    cache += cache // shape.layers  # one layer's buffers while they grow
    cache += cache_bytes(shape, 1, sum(len(r.prompt) for r in requests), b)
    state = rows * steps * (12 + 12 * top_k)
    step = rows * vocab * (b + 48)
    prefill = max(
        len(r.prompt) * (b * (5 * h + 2 * q + 2 * k + 3 * i) + 4 * (q + 2 * k))
        + (scored_positions(r) + 1) * vocab * (b + 8)
        for r in requests
    )
    return cache + state + max(step, prefill)


def total_bytes(device: torch.device) -> int:
    """All of `device`'s memory: the most any request could have. Read without I/O: reading
    `/proc/meminfo` in the caller's thread for each `sample` call changed how a burst of them
    was batched by the worker (seen in the RL recipe's rollouts)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):  # no such sysconf here: nothing to plan against
        return 1 << 62


def check_sample_fits(
    shape: Shape,
    request: SampleRequest,
    cache_element_bytes: int,
    device: torch.device,
    free: int | None = None,
    scoring_only: bool = False,
) -> None:
    """Refuse a `sample` request whose decode would not fit, naming the numbers and what to
    change: in all of the device's memory (when it arrives), or in the `free` bytes read when
    the worker is about to decode it; with `scoring_only`, a prompt scored without decoding
    (`compute_logprobs`)."""
    needed = sample_bytes(shape, [request], cache_element_bytes)
    available = total_bytes(device) if free is None else free
    if needed <= HEADROOM * available:
        return
    if free is None:
        has = f"{device} has {gib(available)} in all"
    else:
        has = f"{gib(available)} is free"
    if scoring_only:
        raise InvalidInputError(
            "prompt",
            f"scoring {len(request.prompt)} tokens needs about {gib(needed)} on {device} (their "
            f"logits over a {shape.vocab}-token vocabulary) but {has}; score a shorter prompt, "
            "or sample with prompt_logprobs_last_n for the last positions only",
        )
    steps = request.settings.max_tokens
    cache = cache_bytes(
        shape, request.num_samples, len(request.prompt) + steps, cache_element_bytes
    )
    advice = ["fewer samples (num_samples)", "fewer new tokens (sampling_params.max_tokens)"]
    if scored_positions(request) > 1:
        advice.append("prompt logprobs for fewer positions (prompt_logprobs_last_n)")
    raise InvalidInputError(
        "num_samples",
        f"this request needs about {gib(needed)} on {device} to decode ({request.num_samples} "
        f"samples × ({len(request.prompt)} prompt + {steps} new tokens): {gib(cache)} of KV "
        f"cache) but {has}; ask for " + ", or ".join(advice),
    )


def sample_batch_fits(
    shape: Shape, requests: Sequence[SampleRequest], cache_element_bytes: int, free: int
) -> bool:
    """Whether `requests` decoded as one batch fit in `free` bytes."""
    return sample_bytes(shape, requests, cache_element_bytes) <= HEADROOM * free


def trainable_parameters(model: nn.Module, lora: LoraConfig | None) -> int:
    """Parameters a run would train: r·(in + out) per adapted layer, or the whole model."""
    if lora is None:
        return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    targets = find_targets(model, target_names(lora))
    return sum(lora.rank * (m.in_features + m.out_features) for m in targets.values())


def run_bytes(trainable_parameters: int, full_model_bytes: int = 0) -> int:
    """A run's own memory: float32 weights, gradients and two AdamW moments, and a full
    fine-tuning run's copy of the model."""
    return 16 * trainable_parameters + full_model_bytes


def weight_cast_bytes(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """The 16-bit copies of `model`'s float32 matrix weights that autocast keeps through a step
    computed in `compute_dtype`: `torch.autocast` caches the cast of each weight that takes a
    gradient (every `nn.Linear`'s, lm_head's among them, once where it is tied) until its region
    ends, and the backward reads them. 0 where nothing is cast (a float32 engine, or a model
    already in `compute_dtype`: a LoRA run's frozen base)."""
    if compute_dtype == torch.float32 or next(model.parameters()).dtype != torch.float32:
        return 0
    weights = {
        id(module.weight): module.weight
        for module in model.modules()
        if isinstance(module, nn.Linear) and module.weight.requires_grad
    }
    return compute_dtype.itemsize * sum(weight.numel() for weight in weights.values())


def free_bytes(device: torch.device) -> int:
    """Memory free for new tensors on `device` now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused_cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + unused_cache
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux: nothing to plan against
        return 1 << 62


def check_step_fits(
    shape: Shape,
    batch: PackedBatch,
    device: torch.device,
    checkpoint_layers: bool,
    lora_rank: int | None,
    dtype_name: str,
    new_gradients: int,
    held_gradients: int = 0,
    weight_casts: int = 0,
) -> None:
    """Refuse a forward + backward that would not fit, naming the numbers and what to change.
    `new_gradients`: the bytes of the gradients the request's backward makes, a fresh set
    every time (`TrainingRun.request_gradients`; a full fine-tuning run's are the size of its
    weights). `held_gradients`: the bytes of those accumulated since the last `optim_step`,
    which are allocated already (so not free) and which `optim_step` would release.
    `weight_casts`: the bytes of the 16-bit weight copies autocast keeps (`weight_cast_bytes`)."""
    step = step_bytes(shape, batch, checkpoint_layers, lora_rank)
    fixed = new_gradients + weight_casts  # whatever the request's size
    needed = step + fixed
    free = free_bytes(device)
    if needed <= HEADROOM * free:
        return
    per_token = step / max(batch.input_ids.numel(), 1)
    fits = max(0, int((HEADROOM * free - fixed) / per_token))
    advice = [f"send at most about {fits} tokens per request (this one has {batch.num_tokens})"]
    if not checkpoint_layers:
        advice.append("create the run with gradient_checkpointing=True")
    if shape.dtype_bytes > 2 and not weight_casts:  # not computing in bf16 already
        advice.append("load the base model in bf16 (--dtype bf16)")
    if held_gradients:
        advice.append(
            f"call optim_step before more forward_backward calls (it frees the "
            f"{gib(held_gradients)} of gradients accumulated since the last one)"
        )
    raise InvalidInputError(
        "data",
        f"this request needs about {gib(needed)} on {device} for its forward and backward "
        f"({batch.num_tokens} tokens, {dtype_name}, {gib(new_gradients)} of it the gradients "
        f"it makes"
        + (
            f", {gib(weight_casts)} the weights' 16-bit copies under autocast"
            if weight_casts
            else ""
        )
        + f") but {gib(free)} is free; "
        + "; or ".join(advice),
    )


def check_run_fits(trainable_parameters: int, full_model_bytes: int, device: torch.device) -> None:
    """Refuse a new run whose weights, gradients and AdamW moments would not fit."""
    needed = run_bytes(trainable_parameters, full_model_bytes)
    free = free_bytes(device)
    if needed <= HEADROOM * free:
        return
    raise InvalidInputError(
        "model",
        f"a new run needs about {gib(needed)} on {device} ({trainable_parameters:,} trainable "
        f"parameters × 16 bytes for weights, gradients and AdamW moments"
        + (f", plus {gib(full_model_bytes)} for its copy of the model" if full_model_bytes else "")
        + f") but {gib(free)} is free; use a smaller LoRA rank, LoRA instead of full "
        "fine-tuning, or free runs (unload_model)",
    )
