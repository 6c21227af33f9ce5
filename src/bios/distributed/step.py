"""One `forward_backward` over N ranks: each rank runs the model on its share of the batch, and
rank 0 evaluates the objective on the whole batch.

    1. rank 0 splits the batch into contiguous runs of data (by datum index, balanced by tokens)
       and sends each rank its share;
    2. every rank runs the model on its share and sends rank 0 the target logprobs (detached;
       and `ref_logprobs` computed from the reference model, if the objective needs them),
       computed in chunks as one process does (`engine.forward.target_logprobs`), so no rank
       holds all its positions' logits — except FSDP2 runs, whose root parameters only the
       whole model's forward gathers, and a custom loss of the logits;
    3. rank 0 puts them back in datum order and evaluates the objective on the whole batch,
       exactly as one process does, on a leaf copy of the logprobs: the loss, the metrics and
       dL/dlogprobs, which it sends back, each rank its share;
    4. every rank runs the backward pass from its logprobs with that gradient.

The gradient each rank then holds is that of the whole batch's loss through its own data; the
sum over ranks (LoRA: all-reduce at `optim_step`; FSDP2: its reduce-scatter, set to SUM) is the
gradient one process computes. Since the objective only ever sees the whole batch, every
objective works unchanged — pairs (DPO) split across ranks, sequence-level losses, weighted
combinations, a user's custom loss — and `loss:sum` and every `:mean` metric are exactly one
process's. What travels is one float per token each way (a custom loss on logits sends the
logits: N × vocabulary floats per datum).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bios.distributed.group import Group
from bios.distributed.protocol import RaisedInStep
from bios.engine.batch import PackedBatch, pack_sequences
from bios.engine.forward import batch_logits, gather_logprobs, target_logprobs
from bios.engine.runs import forward_output
from bios.errors import InvalidInputError
from bios.models.lora import LoRAAdapter
from bios.objectives import REF_LOGPROBS, Objective
from bios.objectives.custom import checked_custom_result
from bios.types import Datum, ForwardBackwardOutput


@dataclass
class StepHeader:
    """What every rank needs to know about a forward_backward besides its data."""

    run_id: str
    backward: bool
    reference: str | None  # a key of Replica.references; "base" for the base model; None: none
    logits: bool = False  # a custom loss of the logits (send logits instead of logprobs)


@dataclass
class Shard:
    """One rank's data: the packed tokens of data [start, stop) (no objective inputs)."""

    start: int
    stop: int
    batch: PackedBatch | None  # None: this rank has no data


def split_ranges(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, stop) ranges covering the data in order, each holding about
    the same number of tokens and at least one datum (with fewer data than parts, the last
    ranges are empty)."""
    count = len(lengths)
    if count <= parts:
        return [(min(i, count), min(i + 1, count)) for i in range(parts)]
    cumulative = list(itertools.accumulate(lengths, initial=0))
    bounds = [0]
    for part in range(1, parts):
        target = cumulative[-1] * part / parts
        cut = bisect.bisect_left(cumulative, target)  # cumulative[cut - 1] < target <= [cut]
        if target - cumulative[cut - 1] < cumulative[cut] - target:
            cut -= 1  # the nearer boundary
        # At least one datum here, and one for each part still to come.
        bounds.append(min(max(cut, bounds[-1] + 1), count - (parts - part)))
    bounds.append(count)
    return list(itertools.pairwise(bounds))


def shard_batch(batch: PackedBatch, start: int, stop: int) -> Shard:
    """The tokens of data [start, stop) of a packed batch, packed on their own."""
    if stop <= start:
        return Shard(start, stop, None)
    return Shard(start, stop, batch.select(start, stop))


def shards_of(batch: PackedBatch, world: int) -> list[Shard]:
    return [shard_batch(batch, a, b) for a, b in split_ranges(batch.lengths, world)]


def _dummy_batch() -> PackedBatch:
    """One token, for a rank with no data whose collectives must still run (FSDP2)."""
    one = torch.zeros(1, dtype=torch.int64)
    return pack_sequences([one], [one], {})


Evaluate = Callable[[list[list[torch.Tensor]]], list[list[torch.Tensor | None]]]


def distributed_step(
    group: Group,
    run,
    header: StepHeader,
    shard: Shard,
    reference: LoRAAdapter | None,
    evaluate: Evaluate | None,
) -> None:
    """Steps 2-4 above on this rank. `evaluate` (rank 0 only) maps every rank's sent tensors to
    the gradients of each of them (None: no gradient); it may raise to reject the request, and
    then no rank runs its backward pass (`RaisedInStep`)."""
    what = f"forward_backward {header.run_id}"
    has_data = shard.batch is not None
    runs_model = has_data or run.lockstep
    batch = shard.batch if has_data else _dummy_batch()
    live: list[torch.Tensor] = []  # what this rank sends, still on the graph
    sent: list[torch.Tensor] = []
    # A backward that fails part-way leaves the accumulated gradients as they were.
    grad_mode = torch.set_grad_enabled(header.backward)
    with run.request_gradients(header.backward), grad_mode, run.model() as model:
        if runs_model:
            batch = batch.to(next(model.parameters()).device)
            if header.logits or run.lockstep:
                # A loss of the logits needs them all; so does FSDP2, whose root parameters
                # (embeddings, head) are gathered only by the whole model's forward.
                outputs = batch_logits(model, batch)
                if has_data:
                    live = [outputs[batch.mask]] if header.logits else []
                    live.append(gather_logprobs(outputs, batch))
            else:  # chunked, as one process computes them: never every position's logits
                outputs = target_logprobs(model, batch)
                live = [outputs] if has_data else []
            sent = [t.detach() for t in live]
            dummy_loss = outputs.sum() * 0.0  # takes part in FSDP2's backward, adds nothing
        if has_data and header.reference is not None:
            sent.append(run.reference_logprobs(batch, reference))
        gathered = group.gather(sent, f"{what}: collecting logprobs")
        rejected: BaseException | None = None
        replies = None
        if group.is_leader:
            assert evaluate is not None and gathered is not None
            try:
                grads_per_rank = evaluate(gathered)
                replies = [("ok", g if header.backward else None) for g in grads_per_rank]
            except BaseException as error:  # a user's loss: anything; no rank goes on
                rejected = error
                replies = [("rejected", None)] * group.world
        status, grads = group.scatter(replies, f"{what}: sending gradients")
        if status == "ok" and header.backward and runs_model:
            used = [(t, g) for t, g in zip(live, grads or [], strict=False) if g is not None]
            if used:
                torch.autograd.backward([t for t, _ in used], [g for _, g in used])
            elif run.lockstep:
                dummy_loss.backward()
    if rejected is not None:
        raise RaisedInStep(rejected)
    if status != "ok":
        raise RaisedInStep(InvalidInputError("loss_fn", "rejected on rank 0"))


# ---- rank 0: the objective over the whole batch ---------------------------------------------


def _leaf(gathered: list[list[torch.Tensor]], slot: int) -> tuple[torch.Tensor, list[int]]:
    """Slot `slot` of every rank's tensors, concatenated in rank (= datum) order, as a leaf
    that requires grad; and each rank's number of rows in it."""
    pieces = [sent[slot] if sent else None for sent in gathered]
    template = next(p for p in pieces if p is not None)
    pieces = [p if p is not None else template[:0] for p in pieces]
    return torch.cat(pieces).requires_grad_(True), [len(p) for p in pieces]


def _joined(gathered: list[list[torch.Tensor]], slot: int) -> torch.Tensor:
    return torch.cat([sent[slot] for sent in gathered if sent])


def _split(grad: torch.Tensor | None, leaf: torch.Tensor, counts: list[int]) -> list:
    if grad is None:
        grad = torch.zeros_like(leaf)
    return list(torch.split(grad.detach(), counts))


class ObjectiveEvaluation:
    """Rank 0's `evaluate` for a built-in objective; `output` holds the response after."""

    def __init__(
        self,
        batch: PackedBatch,
        objective: Objective,
        config: dict[str, float],
        backward: bool,
        with_reference: bool,
    ) -> None:
        self.batch, self.objective, self.config = batch, objective, config
        self.backward, self.with_reference = backward, with_reference
        self.output: ForwardBackwardOutput | None = None

    def __call__(self, gathered: list[list[torch.Tensor]]) -> list[list[torch.Tensor | None]]:
        logprobs, counts = _leaf(gathered, 0)
        inputs = dict(self.batch.inputs)
        if self.with_reference:
            inputs[REF_LOGPROBS] = _joined(gathered, 1)
        with torch.enable_grad():
            loss, metrics = self.objective.fn(logprobs, inputs, self.config)
            grad = None
            if self.backward and loss.requires_grad:
                (grad,) = torch.autograd.grad(loss, logprobs, allow_unused=True)
        self.output = forward_output(self.batch, logprobs, loss, metrics)
        return [[g] for g in _split(grad, logprobs, counts)]


class CustomEvaluation:
    """Rank 0's `evaluate` for a user's loss of per-datum logprobs (or logits)."""

    def __init__(
        self, batch: PackedBatch, data: Sequence[Datum], loss_fn: Callable, input_type: str
    ) -> None:
        self.batch, self.data, self.loss_fn, self.input_type = batch, data, loss_fn, input_type
        self.output: ForwardBackwardOutput | None = None

    def __call__(self, gathered: list[list[torch.Tensor]]) -> list[list[torch.Tensor | None]]:
        logits_mode = self.input_type == "logits"
        given_leaf, counts = _leaf(gathered, 0)
        logprobs = _joined(gathered, 1) if logits_mode else given_leaf
        with torch.enable_grad():
            result = self.loss_fn(list(self.data), self.batch.split(given_leaf))
            loss, metrics = checked_custom_result(result)
            (grad,) = torch.autograd.grad(loss, given_leaf, allow_unused=True)
        self.output = forward_output(self.batch, logprobs, loss, metrics)
        grads = _split(grad, given_leaf, counts)
        return [[g, None] for g in grads] if logits_mode else [[g] for g in grads]
