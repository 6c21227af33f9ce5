"""Which examples each step trains on: a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted one would, with no sampler state to save.

The examples are read as an endless stream of epochs; epoch e is a permutation of all examples
drawn from `numpy.random.default_rng([seed, e])`. Step s (0-based) takes positions
s·B … s·B + B − 1 of the stream, so a batch may straddle two epochs.

A step's batch is sent in pieces of at most `tokens_per_request` tokens (`token_chunks`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from bios.types import Datum


@lru_cache(maxsize=8)
def epoch_order(num_examples: int, seed: int, epoch: int) -> tuple[int, ...]:
    """The permutation of example indices for one epoch."""
    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_examples))


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Indices of the examples of step `step` (0-based)."""
    if num_examples < 1 or batch_size < 1 or step < 0:
        raise ValueError(
            f"need num_examples, batch_size >= 1 and step >= 0, got "
            f"{num_examples}, {batch_size}, {step}"
        )
    start = step * batch_size
    return [
        epoch_order(num_examples, seed, position // num_examples)[position % num_examples]
        for position in range(start, start + batch_size)
    ]


def holdout_indices(num_examples: int, count: int, seed: int) -> list[int]:
    """The `count` examples held out for eval when a run has no eval file: the first `count`
    of a permutation from `numpy.random.default_rng([seed, 0, 1])` (a stream no epoch uses),
    in ascending order."""
    if not 0 <= count < num_examples:
        raise ValueError(f"holdout: expected 0 to {num_examples - 1} examples, got {count}")
    order = np.random.default_rng([seed, 0, 1]).permutation(num_examples)
    return sorted(int(i) for i in order[:count])


def epochs_done(num_examples: int, batch_size: int, steps: int) -> float:
    """Passes over the data after `steps` steps."""
    return steps * batch_size / num_examples


def steps_for_epochs(num_examples: int, batch_size: int, epochs: float) -> int:
    """Steps needed for `epochs` passes over the data (at least 1)."""
    return max(1, math.ceil(epochs * num_examples / batch_size - 1e-9))


def token_chunks(data: list[Datum], max_tokens: int, group: int = 1) -> list[list[Datum]]:
    """`data` in consecutive pieces of at most `max_tokens` model-input tokens each, never
    splitting a group of `group` data (DPO's chosen/rejected pairs); a group larger than
    `max_tokens` is a piece of its own. Sent as one request each, the pieces bound the memory of
    a step, and their gradients add up to those of the whole batch."""
    pieces: list[list[Datum]] = []
    current: list[Datum] = []
    tokens = 0
    for start in range(0, len(data), group):
        members = data[start : start + group]
        size = sum(d.model_input.length for d in members)
        if current and tokens + size > max_tokens:
            pieces.append(current)
            current, tokens = [], 0
        current += members
        tokens += size
    return [*pieces, current] if current else pieces
