"""Checking a batch of `Datum`s against an objective, and packing it into tensors.

Validation runs before any computation, so a rejected request changes no state. Every error
names the field (`data[3].loss_fn_inputs['weights']`) and what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from bios.errors import InvalidInputError
from bios.objectives import OBJECTIVES, Objective
from bios.types import Datum, TensorData

_INT_KEYS = {"target_tokens"}


@dataclass
class PackedBatch:
    """A right-padded batch plus the objective's inputs flattened over the real tokens.

    Right padding needs no attention mask: under the causal mask a real token never attends to
    the padding that follows it.
    """

    input_ids: torch.Tensor  # (B, T) int64, padded with 0
    targets: torch.Tensor  # (B, T) int64, padded with 0
    mask: torch.Tensor  # (B, T) bool, True on real tokens
    lengths: list[int]
    inputs: dict[str, torch.Tensor]  # each (sum of lengths,), in datum order

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-datum pieces of a tensor flattened over the real tokens."""
        return list(torch.split(flat, self.lengths))


def resolve_objective(loss_fn: str) -> Objective:
    if not isinstance(loss_fn, str) or loss_fn not in OBJECTIVES:
        known = ", ".join(sorted(OBJECTIVES))
        raise InvalidInputError("loss_fn", f"unknown loss {loss_fn!r}; expected one of: {known}")
    return OBJECTIVES[loss_fn]


def resolve_config(objective: Objective, config: Mapping[str, float] | None) -> dict[str, float]:
    """`loss_fn_config` with defaults filled in; unknown, missing or non-finite keys rejected."""
    config = dict(config or {})
    for key, value in config.items():
        if key not in objective.config:
            accepted = ", ".join(sorted(objective.config)) or "none"
            raise InvalidInputError(
                f"loss_fn_config[{key!r}]",
                f"not a setting of loss_fn {objective.name!r} (accepted: {accepted})",
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidInputError(
                f"loss_fn_config[{key!r}]", f"expected a finite number, got {value!r}"
            )
    resolved: dict[str, float] = {}
    for key, default in objective.config.items():
        if key in config:
            resolved[key] = float(config[key])
        elif default is None:
            raise InvalidInputError(
                f"loss_fn_config[{key!r}]", f"required by loss_fn {objective.name!r}"
            )
        else:
            resolved[key] = default
    return resolved


def _tensor(field: str, key: str, data: TensorData, length: int) -> torch.Tensor:
    expected_dtype = "int64" if key in _INT_KEYS else "float32"
    if data.dtype != expected_dtype:
        raise InvalidInputError(field, f"expected dtype {expected_dtype}, got {data.dtype}")
    shape = data.shape if data.shape is not None else [len(data.data)]
    if len(shape) != 1 or shape[0] != length or len(data.data) != length:
        raise InvalidInputError(
            field, f"expected shape [{length}] (the length of model_input), got {shape}"
        )
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


def pack_batch(
    data: Sequence[Datum],
    objective: Objective,
    vocab_size: int,
    max_length: int,
    require_targets: bool = True,
) -> PackedBatch:
    """Validate `data` for `objective` and pack it; raises InvalidInputError naming the field."""
    if not isinstance(data, Sequence) or len(data) == 0:
        raise InvalidInputError("data", "expected a non-empty list of Datum")
    rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    columns: dict[str, list[torch.Tensor]] = {}
    for index, datum in enumerate(data):
        where = f"data[{index}]"
        if not isinstance(datum, Datum):
            raise InvalidInputError(where, f"expected a Datum, got {type(datum).__name__}")
        tokens = torch.tensor(datum.model_input.to_ints(), dtype=torch.int64)
        length = len(tokens)
        if length == 0:
            raise InvalidInputError(f"{where}.model_input", "is empty")
        if length > max_length:
            raise InvalidInputError(
                f"{where}.model_input",
                f"length {length} exceeds the model's context of {max_length}",
            )
        _check_tokens(f"{where}.model_input", tokens, vocab_size)
        given = datum.loss_fn_inputs
        for key in given:
            if key not in objective.accepted_inputs:
                accepted = ", ".join(objective.accepted_inputs)
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs[{key!r}]",
                    f"not an input of loss_fn {objective.name!r} (accepted: {accepted})",
                )
        needed = (("target_tokens",) if require_targets else ()) + objective.required_inputs
        for key in needed:
            if key not in given:
                raise InvalidInputError(
                    f"{where}.loss_fn_inputs",
                    f"missing key {key!r} required by loss_fn {objective.name!r}",
                )
        for key, value in given.items():
            tensor = _tensor(f"{where}.loss_fn_inputs[{key!r}]", key, value, length)
            if key == "target_tokens":
                _check_tokens(f"{where}.loss_fn_inputs['target_tokens']", tensor, vocab_size)
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
    input_ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    padded_targets = (
        torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
        if targets
        else torch.zeros_like(input_ids)
    )
    inputs = {key: torch.cat(pieces) for key, pieces in columns.items()}
    return PackedBatch(input_ids, padded_targets, mask, lengths, inputs)
