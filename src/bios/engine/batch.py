"""Checking a batch of `Datum`s against an objective, and packing it into rows of tensors.

Validation runs before any computation, so a rejected request changes no state. Every error
names the field (`data[3].loss_fn_inputs['weights']`) and what was expected.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from bios.engine import provenance
from bios.errors import InvalidInputError
from bios.objectives import (
    DATUM_INDEX,
    SAMPLED,
    SAMPLER_LOGPROBS,
    LossFn,
    Objective,
    get_objective,
)
from bios.types import FLOAT32_MAX, Datum, TensorData, checked_data

_INT_KEYS = {"target_tokens"}
# The inputs that may be (N, K) for an objective with soft targets: K targets per position.
_SOFT_KEYS = ("target_tokens", "weights")
# How far a client's sampling logprobs may be from the recorded ones (both float32 of the same
# number when the client passes on what it was sent).
_LOGPROB_TOLERANCE = 1e-3


@dataclass
class PackedBatch:
    """A request's sequences packed into rows without padding between them, plus the
    objective's inputs flattened over the real tokens.

    Sequences keep their order; each row takes the next sequences while they fit in its width:
    the longest sequence's, or with `attention_cost` the width that makes the batch cheapest to
    compute (`row_width`), so that short sequences share rows. Position ids
    restart at 0 with every sequence and attention never crosses sequences (`attention_mask`),
    so each sequence is computed as it would be alone. Only the end of a row may be padding
    (segment -1), which no real token attends to. Flattening the rows' real tokens in row-major
    order gives the tokens in datum order.
    """

    input_ids: torch.Tensor  # (R, L) int64, padded with 0 at the end of a row
    targets: torch.Tensor  # (R, L) int64, padded with 0; (R, L, K) with K soft targets
    mask: torch.Tensor  # (R, L) bool, True on real tokens
    lengths: list[int]  # per datum, in datum order
    inputs: dict[str, torch.Tensor]  # each (sum of lengths,), in datum order; + datum_index
    position_ids: torch.Tensor  # (R, L) int64: the position within its sequence
    segment_ids: torch.Tensor  # (R, L) int64: the datum each position belongs to, -1 padding
    attention_cost: float | None = None  # what the rows' width was chosen with (`row_width`)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-datum pieces of a tensor flattened over the real tokens."""
        return list(torch.split(flat, self.lengths))

    @property
    def shares_rows(self) -> bool:
        """Whether some row holds more than one sequence (and so needs the block mask)."""
        return self.input_ids.shape[0] < len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def flat_targets(self) -> torch.Tensor:
        """(sum of lengths,) the target of every real token, in datum order ((sum, K) with K
        soft targets)."""
        return self.targets[self.mask]

    def attention_mask(self, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
        """(R, 1, L, L): query i may attend key j iff both are in the same sequence and j ≤ i.

        Boolean (True = attend) for SDPA; with `additive_dtype`, 0 / the dtype's minimum, the
        form eager attention adds to its scores. Padding attends to padding only, so no row of
        the mask is empty (an empty one would make SDPA produce NaN)."""
        same = self.segment_ids[:, :, None] == self.segment_ids[:, None, :]
        length = self.segment_ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=same.device).tril()
        allowed = (same & causal)[:, None]
        if additive_dtype is None:
            return allowed
        zeros = torch.zeros(allowed.shape, dtype=additive_dtype, device=allowed.device)
        return zeros.masked_fill(~allowed, torch.finfo(additive_dtype).min)

    def to(self, device: torch.device) -> PackedBatch:
        """The same batch with every tensor on `device` (itself if they are there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        move = functools.partial(torch.Tensor.to, device=device, non_blocking=True)
        return dataclasses.replace(
            self,
            input_ids=move(self.input_ids),
            targets=move(self.targets),
            mask=move(self.mask),
            inputs={key: move(value) for key, value in self.inputs.items()},
            position_ids=move(self.position_ids),
            segment_ids=move(self.segment_ids),
        )

    def select(self, start: int, stop: int) -> PackedBatch:
        """Data [start, stop) packed on their own (the objective's inputs are not carried)."""
        rows = self.split(self.input_ids[self.mask])[start:stop]
        targets = self.split(self.flat_targets())[start:stop]
        return pack_sequences(rows, targets, {}, self.attention_cost)


def attention_cost(config: PretrainedConfig) -> float:
    """a: the compute of one token attending to one more key, relative to the compute of its
    projections, in a decoder layer of `config`:

        a = 4·q / (2·(h·(2q + 2k) + 3·h·i))

    4·q multiply-adds per key (q·kᵀ and the weighted sum of v, over q = heads × head dim) against
    two per weight of the q, k, v, o projections (h × q, h × k twice, q × h) and the MLP's three
    (h × i). SmolLM2-135M: 3.3e-4, so a 256-token row spends 8% on attention (measured 8%)."""
    config = config.get_text_config()
    h, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q = heads * head_dim
    k = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return 4 * q / (2 * (h * (2 * q + 2 * k) + 3 * h * config.intermediate_size))


def _next_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Datum indices of each row: each row takes the next sequences while they fit."""
    packed_rows: list[list[int]] = [[]]
    used = 0
    for index, length in enumerate(lengths):
        if used + length > capacity:
            packed_rows.append([])
            used = 0
        packed_rows[-1].append(index)
        used += length
    return packed_rows


def row_width(lengths: Sequence[int], cost: float | None) -> int:
    """The width of the rows sequences are packed into, at least the longest sequence.

    A row of width W costs about W · (1 + a·W) (every position's projections, padding included,
    and attention over all W keys of its row: a block-diagonal mask computes them all); the
    width chosen minimises Σ over rows among widths from the longest sequence's, each the last
    × 5/4, up to all the tokens in one row (a few dozen tries even for thousands of sequences).
    a = 0 (attention sequence by sequence, `bios.models.attention.segment_mask`): the width with
    the least padding. a = None: the longest sequence's width."""
    longest, total = max(lengths), sum(lengths)
    if cost is None:
        return longest
    best, best_cost, capacity = longest, math.inf, longest
    while True:
        rows = _next_fit(lengths, capacity)
        width = max(sum(lengths[i] for i in members) for members in rows)
        estimate = len(rows) * width * (1 + cost * width)
        if estimate < best_cost:
            best, best_cost = capacity, estimate
        if capacity >= total:
            return best
        capacity = min(total, max(capacity + 1, capacity * 5 // 4))


def pack_sequences(
    rows: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    inputs: dict[str, torch.Tensor],
    attention_cost: float | None = None,
) -> PackedBatch:
    """Pack token sequences (and their targets) into rows as `PackedBatch` describes; with
    `attention_cost` (a model's `attention_cost`) into rows of the cheapest width."""
    lengths = [len(row) for row in rows]
    packed_rows = _next_fit(lengths, row_width(lengths, attention_cost))
    width = max(sum(lengths[i] for i in members) for members in packed_rows)
    shape = (len(packed_rows), width)
    input_ids = torch.zeros(shape, dtype=torch.int64)
    padded_targets = torch.zeros(shape + tuple(targets[0].shape[1:]), dtype=torch.int64)
    position_ids = torch.zeros(shape, dtype=torch.int64)
    segment_ids = torch.full(shape, -1, dtype=torch.int64)
    for row, members in enumerate(packed_rows):
        start = 0
        for index in members:
            stop = start + lengths[index]
            input_ids[row, start:stop] = rows[index]
            padded_targets[row, start:stop] = targets[index]
            position_ids[row, start:stop] = torch.arange(lengths[index])
            segment_ids[row, start:stop] = index
            start = stop
        # The padding at a row's end is a sequence of its own (segment -1), from position 0.
        position_ids[row, start:] = torch.arange(width - start)
    mask = segment_ids >= 0
    return PackedBatch(
        input_ids, padded_targets, mask, lengths, inputs, position_ids, segment_ids, attention_cost
    )


def resolve_objective(loss_fn: LossFn) -> Objective:
    if not isinstance(loss_fn, str) and isinstance(loss_fn, Sequence):
        for index, part in enumerate(loss_fn):
            weight = part[1] if isinstance(part, Sequence) and len(part) == 2 else None
            if isinstance(weight, int | float) and not abs(weight) <= FLOAT32_MAX:
                raise InvalidInputError(
                    f"loss_fn[{index}]", f"weight {weight!r} is not a finite float32 number"
                )
    try:
        return get_objective(loss_fn)
    except ValueError as error:
        raise InvalidInputError("loss_fn", str(error)) from None


def _targets_of(key: str, given: Mapping[str, float], objective: Objective) -> list[str]:
    """The config keys a user key sets: itself, or for a combination every part's `*.key`."""
    if key in objective.config:
        return [key]
    return [full for full in objective.config if full.endswith(f".{key}") and full not in given]


def resolve_config(objective: Objective, config: Mapping[str, float] | None) -> dict[str, float]:
    """`loss_fn_config` with defaults filled in; unknown, missing or bad values rejected.

    For a combination, an unprefixed key (`beta`) sets every part's key of that name
    (`dpo.beta`); a prefixed key wins over it.
    """
    given = dict(config or {})
    values: dict[str, float] = {}
    for key, value in given.items():
        field = f"loss_fn_config[{key!r}]"
        targets = _targets_of(key, given, objective)
        if not targets:
            accepted = ", ".join(sorted(objective.config)) or "none"
            raise InvalidInputError(
                field, f"not a setting of loss_fn {objective.name!r} (accepted: {accepted})"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not abs(value) <= FLOAT32_MAX
        ):
            raise InvalidInputError(field, f"expected a finite number (in float32), got {value!r}")
        check = objective.config_checks.get(targets[0])
        if check is not None and not check[0](value):
            raise InvalidInputError(field, f"expected {check[1]}, got {value!r}")
        values.update(dict.fromkeys(targets, float(value)))
    for key, default in objective.config.items():
        if key not in values:
            if default is None:
                raise InvalidInputError(
                    f"loss_fn_config[{key!r}]", f"required by loss_fn {objective.name!r}"
                )
            values[key] = default
    return values


def _tensor(
    field: str, key: str, data: TensorData, length: int, custom: bool, soft: bool = False
) -> torch.Tensor:
    """One loss input, checked: dtype, shape [length] (or [length, K] for a soft-target key when
    `soft`), and values finite within float32."""
    expected_dtype = "int64" if key in _INT_KEYS else "float32"
    if data.dtype != expected_dtype and not (custom and key not in _INT_KEYS):
        raise InvalidInputError(field, f"expected dtype {expected_dtype}, got {data.dtype}")
    shape = data.shape if data.shape is not None else [len(data.data)]
    if soft and key in _SOFT_KEYS and len(shape) == 2:
        if shape[0] != length or shape[1] < 1 or len(data.data) != shape[0] * shape[1]:
            raise InvalidInputError(
                field,
                f"expected shape [{length}] or [{length}, K] with K ≥ 1 (the length of "
                f"model_input, K targets per position), got {shape} holding {len(data.data)} "
                "values",
            )
    elif len(shape) != 1 or shape[0] != length or len(data.data) != length:
        soft_note = (
            "; (N, K) soft targets are taken by cross_entropy's target_tokens and weights only"
            if len(shape) == 2 and key in _SOFT_KEYS
            else ""
        )
        raise InvalidInputError(
            field, f"expected shape [{length}] (the length of model_input), got {shape}{soft_note}"
        )
    if data.dtype == "float32":  # read wide first: float32 would turn 1e39 into inf unseen
        wide = torch.tensor(data.data, dtype=torch.float64)
        outside = ~(wide.abs() <= FLOAT32_MAX)  # NaN too
        if outside.any():
            position = int(outside.nonzero()[0])
            value = wide[position].item()
            what = (
                "non-finite value" if not math.isfinite(value) else "value outside float32's range"
            )
            raise InvalidInputError(field, f"{what} {value} at position {position}")
    tensor = data.to_torch()
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        position = int((~torch.isfinite(tensor.reshape(-1))).nonzero()[0])
        raise InvalidInputError(
            field, f"non-finite value {tensor.reshape(-1)[position].item()} at position {position}"
        )
    return tensor


def _check_tokens(field: str, tokens: torch.Tensor, vocab_size: int) -> None:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        where = bad.nonzero()[0]
        position = ", ".join(str(int(i)) for i in where)
        raise InvalidInputError(
            field,
            f"token id {int(tokens[tuple(where)])} at position {position} is outside the "
            f"vocabulary [0, {vocab_size})",
        )


def _check_soft(where: str, tensors: dict[str, torch.Tensor], first_k: int | None) -> int | None:
    """Soft targets: `weights` as (N, K) as `target_tokens`, and one K across the batch.
    Answers this datum's K (None: one target per position)."""
    targets, weights = tensors.get("target_tokens"), tensors.get("weights")
    k = targets.shape[1] if targets is not None and targets.dim() == 2 else None
    if weights is not None and targets is not None and weights.shape != targets.shape:
        raise InvalidInputError(
            f"{where}.loss_fn_inputs['weights']",
            f"expected shape {list(targets.shape)} (that of target_tokens), "
            f"got {list(weights.shape)}",
        )
    if first_k != k and where != "data[0]":
        raise InvalidInputError(
            f"{where}.loss_fn_inputs['target_tokens']",
            f"{'K = ' + str(k) if k else 'one'} target(s) per position, but data[0] has "
            f"{'K = ' + str(first_k) if first_k else 'one'}: every datum of a request has the "
            "same number",
        )
    return k


def _check_provenance_inputs(where: str, columns: dict[str, torch.Tensor]) -> None:
    """With recorded sampling: advantages only on sampled tokens, and the client's sampling
    logprobs (if sent) the recorded ones."""
    sampled = columns[SAMPLED] > 0
    advantages = columns.get("advantages")
    if advantages is not None and (advantages[~sampled] != 0).any():
        position = int(((advantages != 0) & ~sampled).nonzero()[0])
        raise InvalidInputError(
            f"{where}.loss_fn_inputs['advantages']",
            f"nonzero ({float(advantages[position])}) at position {position}, which no sampled "
            "span covers: this loss takes advantages on sampled tokens only",
        )
    given = columns.get("logprobs")
    if given is not None:
        off = (given - columns[SAMPLER_LOGPROBS]).abs() > _LOGPROB_TOLERANCE
        off &= sampled
        if off.any():
            position = int(off.nonzero()[0])
            raise InvalidInputError(
                f"{where}.loss_fn_inputs['logprobs']",
                f"{float(given[position])} at position {position}, but the sampler recorded "
                f"{float(columns[SAMPLER_LOGPROBS][position])} for that token",
            )


def _check_keys(where: str, given: Mapping[str, TensorData], objective: Objective | None):
    """Unknown keys and missing required keys; `objective=None` is a custom loss (any keys)."""
    name = objective.name if objective is not None else "custom"
    if objective is not None:
        for key in given:
            if key not in objective.accepted_inputs:
                accepted = ", ".join(objective.accepted_inputs)
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs[{key!r}]",
                    f"not an input of loss_fn {name!r} (accepted: {accepted})",
                )
    required = ("target_tokens", *(objective.required_inputs if objective is not None else ()))
    for key in required:
        if key not in given:
            raise InvalidInputError(
                f"{where}.loss_fn_inputs", f"missing key {key!r} required by loss_fn {name!r}"
            )


def _check_shape_of_batch(data: Sequence[Datum], objective: Objective | None) -> None:
    checked_data(data)
    if objective is not None and objective.pairs and len(data) % 2:
        raise InvalidInputError(
            "data",
            f"loss_fn {objective.name!r} takes (chosen, rejected) pairs as data[2k], data[2k+1]; "
            f"got an odd number of data ({len(data)})",
        )


def pack_batch(
    data: Sequence[Datum],
    objective: Objective | None,
    vocab_size: int,
    max_length: int,
    lookup: provenance.Lookup | None = None,
    attention_cost: float | None = None,
) -> PackedBatch:
    """Validate `data` for `objective` (None: a custom loss) and pack it (into rows of the
    cheapest width for a model of `attention_cost`, see `row_width`). Provenance spans must
    tile their fields; an objective with `provenance` resolves them through `lookup` (sequence
    id -> what its sampler recorded, `bios.engine.provenance`).

    Raises InvalidInputError naming the field.
    """
    _check_shape_of_batch(data, objective)
    soft = objective is not None and objective.soft_targets
    uses_provenance = objective is not None and objective.provenance
    rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    columns: dict[str, list[torch.Tensor]] = {}
    first_k: int | None = None
    for index, datum in enumerate(data):
        where = f"data[{index}]"
        tokens = torch.tensor(datum.model_input.to_ints(), dtype=torch.int64)
        if len(tokens) == 0:
            raise InvalidInputError(f"{where}.model_input", "is empty")
        if len(tokens) > max_length:
            raise InvalidInputError(
                f"{where}.model_input",
                f"length {len(tokens)} exceeds the model's context of {max_length}",
            )
        _check_tokens(f"{where}.model_input", tokens, vocab_size)
        _check_keys(where, datum.loss_fn_inputs, objective)
        provenance.check_tiling(
            where, datum.model_input_spans, datum.loss_fn_input_spans, len(tokens), len(tokens)
        )
        tensors = {
            key: _tensor(
                f"{where}.loss_fn_inputs[{key!r}]", key, value, len(tokens), objective is None, soft
            )
            for key, value in datum.loss_fn_inputs.items()
        }
        mask = tensors.get("sequence_ratio_mask")
        if mask is not None and not mask.any():
            raise InvalidInputError(
                f"{where}.loss_fn_inputs['sequence_ratio_mask']",
                "marks no token: the sequence ratio is a mean over at least one",
            )
        k = _check_soft(where, tensors, first_k)
        first_k = k if index == 0 else first_k
        _check_tokens(
            f"{where}.loss_fn_inputs['target_tokens']", tensors["target_tokens"], vocab_size
        )
        if uses_provenance:
            if lookup is None:
                raise InvalidInputError("loss_fn", "this engine keeps no sampling records")
            tensors[SAMPLER_LOGPROBS], tensors[SAMPLED] = provenance.resolve(
                where,
                datum.model_input_spans,
                datum.loss_fn_input_spans,
                tokens,
                tensors["target_tokens"],
                lookup,
            )
            _check_provenance_inputs(where, tensors)
        targets.append(tensors.pop("target_tokens"))
        for key, tensor in tensors.items():
            columns.setdefault(key, []).append(tensor)
        rows.append(tokens)
    for key, pieces in columns.items():
        if len(pieces) != len(data):
            first_missing = next(i for i, d in enumerate(data) if key not in d.loss_fn_inputs)
            raise InvalidInputError(
                f"data[{first_missing}].loss_fn_inputs",
                f"missing key {key!r} that other data in the batch have",
            )
    lengths = [len(row) for row in rows]
    inputs = {key: torch.cat(pieces) for key, pieces in columns.items()}
    inputs[DATUM_INDEX] = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(lengths))
    return pack_sequences(rows, targets, inputs, attention_cost)
