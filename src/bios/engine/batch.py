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

from bios.errors import InvalidInputError
from bios.objectives import DATUM_INDEX, LossFn, Objective, get_objective
from bios.types import FLOAT32_MAX, Datum, TensorData, checked_data

_INT_KEYS = {"target_tokens"}


@dataclass
class PackedBatch:
    """A request's sequences packed into rows without padding between them, plus the
    objective's inputs flattened over the real tokens.

    Sequences keep their order; each row takes the next sequences while they fit in the longest
    one (so equal-length data is one sequence a row, and short ones share rows). Position ids
    restart at 0 with every sequence and attention never crosses sequences (`attention_mask`),
    so each sequence is computed as it would be alone. Only the end of a row may be padding
    (segment -1), which no real token attends to. Flattening the rows' real tokens in row-major
    order gives the tokens in datum order.
    """

    input_ids: torch.Tensor  # (R, L) int64, padded with 0 at the end of a row
    targets: torch.Tensor  # (R, L) int64, padded with 0
    mask: torch.Tensor  # (R, L) bool, True on real tokens
    lengths: list[int]  # per datum, in datum order
    inputs: dict[str, torch.Tensor]  # each (sum of lengths,), in datum order; + datum_index
    position_ids: torch.Tensor  # (R, L) int64: the position within its sequence
    segment_ids: torch.Tensor  # (R, L) int64: the datum each position belongs to, -1 padding

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
        """(sum of lengths,) the target of every real token, in datum order."""
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
        return pack_sequences(rows, targets, {})


def pack_sequences(
    rows: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    inputs: dict[str, torch.Tensor],
) -> PackedBatch:
    """Pack token sequences (and their targets) into rows as `PackedBatch` describes."""
    lengths = [len(row) for row in rows]
    capacity = max(lengths)
    packed_rows: list[list[int]] = [[]]  # datum indices of each row
    used = 0
    for index, length in enumerate(lengths):
        if used + length > capacity:
            packed_rows.append([])
            used = 0
        packed_rows[-1].append(index)
        used += length
    width = max(sum(lengths[i] for i in members) for members in packed_rows)
    shape = (len(packed_rows), width)
    input_ids = torch.zeros(shape, dtype=torch.int64)
    padded_targets = torch.zeros(shape, dtype=torch.int64)
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
    return PackedBatch(input_ids, padded_targets, mask, lengths, inputs, position_ids, segment_ids)


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


def _tensor(field: str, key: str, data: TensorData, length: int, custom: bool) -> torch.Tensor:
    expected_dtype = "int64" if key in _INT_KEYS else "float32"
    if data.dtype != expected_dtype and not (custom and key not in _INT_KEYS):
        raise InvalidInputError(field, f"expected dtype {expected_dtype}, got {data.dtype}")
    shape = data.shape if data.shape is not None else [len(data.data)]
    if len(shape) != 1 or shape[0] != length or len(data.data) != length:
        raise InvalidInputError(
            field, f"expected shape [{length}] (the length of model_input), got {shape}"
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
        position = int((~torch.isfinite(tensor)).nonzero()[0])
        raise InvalidInputError(
            field, f"non-finite value {tensor[position].item()} at position {position}"
        )
    return tensor


def _check_tokens(field: str, tokens: torch.Tensor, vocab_size: int) -> None:
    bad = (tokens < 0) | (tokens >= vocab_size)
    if bad.any():
        position = int(bad.nonzero()[0])
        raise InvalidInputError(
            field,
            f"token id {int(tokens[position])} at position {position} is outside the "
            f"vocabulary [0, {vocab_size})",
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
    data: Sequence[Datum], objective: Objective | None, vocab_size: int, max_length: int
) -> PackedBatch:
    """Validate `data` for `objective` (None: a custom loss) and pack it.

    Raises InvalidInputError naming the field.
    """
    _check_shape_of_batch(data, objective)
    rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    columns: dict[str, list[torch.Tensor]] = {}
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
        for key, value in datum.loss_fn_inputs.items():
            field = f"{where}.loss_fn_inputs[{key!r}]"
            tensor = _tensor(field, key, value, len(tokens), custom=objective is None)
            if key == "target_tokens":
                _check_tokens(field, tensor, vocab_size)
                targets.append(tensor)
            else:
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
    return pack_sequences(rows, targets, inputs)
