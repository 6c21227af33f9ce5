"""The model's forward over a packed batch, and the target logprobs it gives.

    hidden states   the decoder on the packed rows: position ids restart with every sequence and
                    the block-diagonal causal mask keeps sequences apart (`PackedBatch`)
    logprobs        log p(target_t | tokens_≤t) = z_t[target_t] − logsumexp(z_t), z_t = W_out h_t
                    (with K soft targets per position, the K of them: (tokens, K)),
                    computed in float32 over chunks of at most `chunk_tokens` real tokens, so a
                    step never holds more than one chunk of (tokens × vocabulary) logits: with
                    gradients on, each chunk is recomputed in the backward pass (activation
                    checkpointing of the unembedding) instead of being kept

With `logprob_grads` — g = ∂L/∂logprobs, known before the forward pass when the objective is
linear in the logprobs (`cross_entropy`: g = −w) — each chunk's backward runs as soon as its
logprobs are computed: the chunk's gradient with respect to the hidden states (tokens × hidden)
and the unembedding's trainable parameters (the LoRA factors of `lm_head`) are kept, its logits
are not, and nothing is recomputed later. The backward pass hands those gradients on after
checking that the gradient it receives is g, bit for bit (`_KnownGradient`). The recomputing
path's arithmetic in fewer passes over the logits (`logprobs_and_logits_grad`), and one forward
of the unembedding fewer (about a tenth of a step of SmolLM2-135M, whose unembedding is a fifth
of its weights). Positions where g is zero — a chat's prompt, weight 0 — have a zero
∂L/∂logits, so only the others go through the unembedding's backward; the rest get their
logprobs from a forward alone (workload b of
`benchmarks/train_throughput.py`: 32–46% of the tokens are weighted, and the unembedding's
backward shrinks accordingly: about 3% of a step).

With `checkpoint_layers`, each decoder layer runs under activation checkpointing: its inputs are
kept and everything inside it is recomputed in the backward pass (about one more forward of the
layers, for activation memory of one layer instead of all of them; for long sequences).

`batch_logits` is the unchunked path: every position's logits at once, for a custom objective that
asks for them (`loss_type_input="logits"`) and for runs whose modules must be called as a whole
(FSDP2-sharded models, models with a logit transform after the unembedding).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bios.engine.batch import PackedBatch
from bios.models.attention import mask_dtype, segment_mask, takes_segments
from bios.models.swiglu import products_kept

# Bytes of float32 logits a chunk may hold (its gradient and log-softmax are as large again).
# On a CPU 32 MiB, 170 tokens of a 49k vocabulary: there a chunk costs memory, not speed (a LoRA
# step of 16 chats on SmolLM2-135M peaked 100 MiB lower than at 64 MiB, as fast). On a GPU 256
# MiB, 523 tokens of Llama-3's 128k: its matrix units want hundreds of rows per product, and
# three such buffers are little beside its memory.
CPU_CHUNK_LOGIT_BYTES = 32 << 20
GPU_CHUNK_LOGIT_BYTES = 256 << 20
MIN_CHUNK_TOKENS = 64
# Devices whose logits' gradient comes from autograd's log-softmax backward kernel; elsewhere
# (GPUs) from the exponential of the log-softmax, in fewer passes (`logprobs_and_logits_grad`).
KERNEL_GRADIENT_DEVICES = frozenset({"cpu"})


def chunk_tokens_for(
    vocab_size: int, device: torch.device | str = "cpu", budget_bytes: int | None = None
) -> int:
    """Tokens per chunk on `device`: as many as fit the budget of float32 logits, at least 64."""
    if budget_bytes is None:
        on_cpu = torch.device(device).type == "cpu"
        budget_bytes = CPU_CHUNK_LOGIT_BYTES if on_cpu else GPU_CHUNK_LOGIT_BYTES
    return max(MIN_CHUNK_TOKENS, budget_bytes // (4 * vocab_size))


def model_inputs(model: nn.Module, batch: PackedBatch) -> dict[str, torch.Tensor]:
    """The keyword arguments of a forward over the packed rows.

    Rows that hold one sequence each (equal lengths, or data too long to share) need no mask:
    the plain causal mask is exact, as a right-padded batch always was, and SDPA then takes its
    causal fast path instead of a masked one. Rows that share get the restarting position ids
    and, for Bios's attention on the CPU, the rows' segment ids in the mask's place (each
    sequence attends on its own: `bios.models.attention.segment_mask`), else the block-diagonal
    mask. That mask is additive, in the dtype attention computes in, for SDPA
    as for eager attention: SDPA converts a boolean mask to that form in every layer and each
    layer's backward keeps its own copy (rows × length² × 4 bytes a layer), and so would a cast
    in every layer; one additive mask is shared by all."""
    if not batch.shares_rows:
        return {"input_ids": batch.input_ids}
    if takes_segments(model):
        mask = segment_mask(batch.segment_ids)
    else:
        mask = batch.attention_mask(mask_dtype(model))
    return {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": mask,
    }


def can_chunk(model: nn.Module) -> bool:
    """Whether logits are exactly `output_embeddings(decoder(x))`: true of Llama, Qwen2 and
    Qwen3; false where a transform follows the unembedding (Gemma's soft-capping, scaled
    logits), which the unchunked path leaves to the model's own forward."""
    config = model.config.get_text_config()
    transforms = ("final_logit_softcapping", "logit_scale", "logits_scaling")
    return (
        hasattr(model, "get_decoder")
        and model.get_output_embeddings() is not None
        and all(getattr(config, name, None) in (None, 1.0) for name in transforms)
    )


def batch_logits(model: nn.Module, batch: PackedBatch) -> torch.Tensor:
    """(R, L, V) float32 logits of every position of the packed rows."""
    return model(**model_inputs(model, batch), use_cache=False).logits.float()


def gather_logprobs(logits: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """log p(target_t | tokens_≤t) for every real token, flattened in datum order."""
    return _logprobs_of(logits[batch.mask], batch.flat_targets())


def _logprobs_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(T,) logprobs of one target per position, or (T, K) of K soft targets per position."""
    if targets.dim() == 1:
        return -F.cross_entropy(logits.float(), targets, reduction="none")
    return logits.float().log_softmax(dim=-1).gather(-1, targets)


def _chunk_logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _logprobs_of(head(hidden), targets)


def _scratch(
    buffers: dict[str, torch.Tensor] | None, name: str, like: torch.Tensor
) -> torch.Tensor:
    """A float32 tensor of `like`'s shape: a fresh one, or the first rows of `buffers[name]`
    (made at the first, largest chunk and reused by the chunks after it)."""
    if buffers is None:
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    buffer = buffers.get(name)
    if buffer is None or buffer.shape[0] < like.shape[0] or buffer.shape[1:] != like.shape[1:]:
        buffer = buffers[name] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return buffer[: like.shape[0]]


def _float_log_softmax(
    logits: torch.Tensor, buffers: dict[str, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z in float32, log_softmax(z) in float32) of a chunk of logits z: float32 logits are their
    own float copy; the rest come from `buffers` (see `_scratch`)."""
    log_softmax = _scratch(buffers, "log_softmax", logits)
    if logits.dtype == torch.float32:
        wide = logits
    else:
        wide = _scratch(buffers, "float_logits", logits).copy_(logits)
    torch.log_softmax(wide, dim=-1, out=log_softmax)
    return wide, log_softmax


@torch.no_grad()
def chunk_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """log_softmax(z_t)[y_t] in float32 for a chunk of logits z (one target per position, or K),
    computed in the work `buffers` when given: the values of `_logprobs_of`, bit for bit."""
    _, log_softmax = _float_log_softmax(logits, buffers)
    index = targets if targets.dim() == 2 else targets[:, None]
    return log_softmax.gather(-1, index).view(targets.shape)


@torch.no_grad()
def logprobs_and_logits_grad(
    logits: torch.Tensor,
    targets: torch.Tensor,
    logprob_grads: torch.Tensor,
    buffers: dict[str, torch.Tensor] | None = None,
    by_kernel: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The target logprobs of a chunk of logits z, and ∂L/∂z for a known g = ∂L/∂logprobs:

        logp_t = log_softmax(z_t)[y_t]        ∂L/∂z_t = G_t − S_t·softmax(z_t),

    G_t = Σ_k g_tk·e_{y_tk} (K soft targets y_t1…y_tK per position, or one), S_t = Σ_k g_tk:
    the float32 arithmetic of autograd's backward through the log-softmax and the gather, in
    one of two ways (`by_kernel`; None: the first on `KERNEL_GRADIENT_DEVICES`, the CPU, the
    second elsewhere):

    - by autograd's own kernel (`_log_softmax_backward_data`, G − exp(log_softmax)·S) over a
      one-hot G zeroed and filled in a float32 buffer: the gradient autograd gives, bit for
      bit. A CPU computes the kernel's exponential inside the same pass (exponentials are what
      costs there: 7 ms a chunk of 170 × 49k against 9.5 ms the other way, on a 2-core EPYC);
    - by the exponential: −S_t·softmax(z_t) written straight into `logits` from the
      log-softmax (`torch.exp` in place, then the product), then G_t − S_t·softmax(z_t)[y] at
      the K targets (a target listed twice takes both of its g). On a GPU, where such passes
      cost the bytes they move, that is 14 bytes per (token × vocabulary) entry in bf16 and 16
      in float32 against 26 and 20 (the buffer zeroed, the kernel's two reads of G, a copy
      back to bf16): for 8 × 2048 tokens of Llama-3's 128k vocabulary, 25 GB less in a bf16
      step. Its `torch.exp` differs from the kernel's vectorised exponential by a unit or two
      of float32's last place on a CPU; rounded to bf16 the two agree.

    Either way the gradient is written over `logits` and returned, in their dtype, rounded
    once as the cast's backward would round it: their values are spent once the log-softmax is
    taken, and the backward of a linear layer never reads its output. The float32 work
    tensors come from `buffers` when given (see `_scratch`): for a chunk of SmolLM2's 49k
    vocabulary each is tens of megabytes, which a fresh allocation page-faults in again at
    every chunk."""
    index = targets if targets.dim() == 2 else targets[:, None]
    grads = logprob_grads if logprob_grads.dim() == 2 else logprob_grads[:, None]
    wide, log_softmax = _float_log_softmax(logits, buffers)
    logprobs = log_softmax.gather(-1, index)
    if by_kernel is None:
        by_kernel = logits.device.type in KERNEL_GRADIENT_DEVICES
    if by_kernel:
        gradient = wide.zero_().scatter_add_(-1, index, grads)
        torch.ops.aten._log_softmax_backward_data.out(
            gradient, log_softmax, -1, torch.float32, out=gradient
        )
        if gradient is not logits:
            logits.copy_(gradient)
        return logprobs.view(targets.shape), logits
    total = grads.sum(-1, keepdim=True)  # S_t
    if index.shape[1] == 1:
        one_hot = grads  # G_t at y_t
    else:  # G_t at each y_tk: every g_tj whose target is the same token
        same = index[:, :, None] == index[:, None, :]
        one_hot = (same * grads[:, None, :]).sum(-1)
    probs = log_softmax.exp_()
    at_targets = one_hot - probs.gather(-1, index) * total
    torch.mul(probs, total.neg(), out=logits)
    logits.scatter_(-1, index, at_targets.to(logits.dtype))
    return logprobs.view(targets.shape), logits


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder's list of layers (`model.model.layers` in Llama, Qwen2, Qwen3), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(_products_kept, forward, *args, use_reentrant=False, **kwargs)


def _products_kept(forward, *args, **kwargs):
    """A checkpointed layer is recomputed whole, so its MLP keeps its product (in the forward
    and in the recomputation alike: checkpointing expects the same tensors saved by both)."""
    with products_kept():
        return forward(*args, **kwargs)


@contextlib.contextmanager
def layer_checkpointing(model: nn.Module, enabled: bool) -> Iterator[None]:
    """While the block runs, each decoder layer's forward is checkpointed (when `enabled` and
    gradients are on). The recomputation in the backward pass calls the original forward, which
    the checkpoint keeps, so the layers may be restored as soon as the forward is done."""
    layers = decoder_layers(model) if enabled and torch.is_grad_enabled() else None
    if layers is None:
        yield
        return
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute: the class's forward shows again


def graph_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The tensors whose `.grad` a backward from `output` would accumulate into."""
    leaves, seen, nodes = [], set(), [output.grad_fn]
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            leaves.append(variable)
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@dataclass
class _Computed:
    """The backward of the unembedding, done in the forward for a known ∂L/∂logprobs."""

    expected: torch.Tensor  # the ∂L/∂logprobs it was computed for
    hidden_grad: torch.Tensor  # ∂L/∂hidden, (tokens, hidden)
    leaf_grads: list[torch.Tensor]  # ∂L/∂ each trainable parameter of the unembedding


class _KnownGradient(torch.autograd.Function):
    """Logprobs whose backward was computed in the forward pass: it checks that the gradient
    arriving is the one computed for, then hands the hidden states and the unembedding's
    parameters their gradients (accumulated by autograd, as any backward's are)."""

    @staticmethod
    def forward(
        ctx, hidden: torch.Tensor, logprobs: torch.Tensor, computed: _Computed, *leaves
    ) -> torch.Tensor:
        ctx.computed = computed
        return logprobs

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        computed: _Computed = ctx.computed
        if not torch.equal(grad, computed.expected):
            raise RuntimeError(
                "the gradient of the loss with respect to the logprobs is not the one the "
                "unembedding's gradient was computed for: an objective marked linear is not"
            )
        return computed.hidden_grad, None, None, *computed.leaf_grads


def _logprobs_with_known_gradient(
    head: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    logprob_grads: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Chunked logprobs whose unembedding backward runs chunk by chunk in this forward.

    Only the positions with a non-zero ∂L/∂logprobs take part in that backward (`live_positions`):
    elsewhere ∂L/∂z = G − (Σ G)·softmax(z) is zero, so a prompt's tokens (weight 0) get their
    logprobs from a forward alone and a zero gradient for their hidden states. The live positions
    are chunked on their own, the others after them."""
    weighted = live_positions(logprob_grads)
    live, idle = weighted.nonzero().squeeze(1), (~weighted).nonzero().squeeze(1)
    everywhere = len(idle) == 0
    values, hidden_grads = [], []
    leaves: list[torch.Tensor] = []
    leaf_grads: list[torch.Tensor] = []
    buffers: dict[str, torch.Tensor] = {}
    live_hidden = hidden if everywhere else hidden.detach().index_select(0, live)
    live_targets = targets if everywhere else targets.index_select(0, live)
    live_grads = logprob_grads if everywhere else logprob_grads.index_select(0, live)
    for start in range(0, len(live), size):
        piece = live_hidden[start : start + size].detach().requires_grad_()
        logits = head(piece)
        if start == 0:  # every chunk runs the same head, so it reaches the same leaves
            leaves = [leaf for leaf in graph_leaves(logits) if leaf is not piece]
        logprobs, logits_grad = logprobs_and_logits_grad(
            logits, live_targets[start : start + size], live_grads[start : start + size], buffers
        )
        piece_grad, *grads = torch.autograd.grad(logits, [piece, *leaves], grad_outputs=logits_grad)
        values.append(logprobs)
        hidden_grads.append(piece_grad)
        if start == 0:
            leaf_grads = grads
        else:
            for total, grad in zip(leaf_grads, grads, strict=True):
                total.add_(grad)  # autograd.grad's own fresh tensors: safe to add into
        # Let go of the spent chunk now: held through the next chunk's unembedding, it would be
        # one more chunk of logits at the step's peak than the three the planner counts.
        del logits, logits_grad, piece_grad, grads
    if not leaves:  # no live position: the head's leaves, for their zero gradients
        with torch.enable_grad():
            probe = hidden[:1].detach().requires_grad_()
            leaves = [leaf for leaf in graph_leaves(head(probe)) if leaf is not probe]
        leaf_grads = [torch.zeros_like(leaf) for leaf in leaves]
    if everywhere:
        logprobs, hidden_grad = torch.cat(values), torch.cat(hidden_grads)
    else:
        logprobs = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        hidden_grad = torch.zeros_like(hidden)
        if values:
            logprobs.index_copy_(0, live, torch.cat(values))
            hidden_grad.index_copy_(0, live, torch.cat(hidden_grads))
        idle_hidden, idle_targets = hidden.detach().index_select(0, idle), targets[idle]
        with torch.no_grad():
            for start in range(0, len(idle), size):
                logits = head(idle_hidden[start : start + size])
                piece = chunk_logprobs(logits, idle_targets[start : start + size], buffers)
                logprobs.index_copy_(0, idle[start : start + size], piece)
    computed = _Computed(logprob_grads, hidden_grad, leaf_grads)
    return _KnownGradient.apply(hidden, logprobs, computed, *leaves)


def live_positions(logprob_grads: torch.Tensor) -> torch.Tensor:
    """(positions,) bool: whether a position's ∂L/∂logprobs (one per position, or K) is not
    zero."""
    nonzero = logprob_grads != 0
    return nonzero.any(-1) if nonzero.dim() == 2 else nonzero


def target_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    chunk_tokens: int | None = None,
    checkpoint_layers: bool = False,
    logprob_grads: torch.Tensor | None = None,
) -> torch.Tensor:
    """(sum of lengths,) float32 target logprobs in datum order ((sum, K) with K soft targets),
    the unembedding and the log-softmax run over chunks of real tokens; with `logprob_grads`
    (∂L/∂logprobs, the logprobs' shape), the unembedding's backward runs in this forward (see
    the module docstring)."""
    if not can_chunk(model):
        with layer_checkpointing(model, checkpoint_layers):
            return gather_logprobs(batch_logits(model, batch), batch)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with layer_checkpointing(model, checkpoint_layers):
        hidden = decoder(**model_inputs(model, batch), use_cache=False).last_hidden_state
    hidden, targets = hidden[batch.mask], batch.flat_targets()
    size = chunk_tokens or chunk_tokens_for(head.weight.shape[0], head.weight.device)
    if logprob_grads is not None and torch.is_grad_enabled():
        return _logprobs_with_known_gradient(head, hidden, targets, logprob_grads, size)
    pieces = []
    for start in range(0, len(targets), size):
        chunk = (head, hidden[start : start + size], targets[start : start + size])
        if torch.is_grad_enabled():
            pieces.append(checkpoint(_chunk_logprobs, *chunk, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*chunk))
    return torch.cat(pieces)
