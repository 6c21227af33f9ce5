"""What a sampler records of each sampled sequence (`record_stability_info`), and what a datum's
provenance spans resolve to at training time.

A record is kept under the sequence's id with its owner (the tenant that sampled it: only the
same owner can train on it), the prompt's length, the sampled tokens and, for each, log μ(x_t),
its logprob under the distribution it was drawn from. Records are bounded in memory: at most
`max_tokens` sampled tokens in all (8 bytes each; the least recently used record goes first), and
each expires `ttl_seconds` after its last use (being sampled, or named by a training request),
one day by default, as Tinker's do.

`resolve` turns a datum's spans into the per-token inputs of an objective with `provenance`
(`bios.objectives.SAMPLER_LOGPROBS`, `SAMPLED`): on each target row a sampled span covers, the
recorded log μ and 1; elsewhere 0. Sampled spans are checked against the record (the tokens they
claim must be the ones sampled), prompt spans against the prompt's length.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bios.errors import InvalidInputError
from bios.types import ProvenanceSpan, SampleResponse

MAX_TOKENS = 16_000_000  # 128 MB of tokens and logprobs
TTL_SECONDS = 24 * 3600.0


@dataclass
class SampledRecord:
    owner: str | None
    prompt_length: int
    tokens: np.ndarray  # int64, the sampled tokens
    logprobs: np.ndarray  # float32, log μ of each
    last_used: float


Lookup = Callable[[str], SampledRecord | None]


class SampledSequences:
    """sequence id -> `SampledRecord`, bounded as the module docstring says; thread-safe."""

    def __init__(
        self,
        max_tokens: int = MAX_TOKENS,
        ttl_seconds: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_tokens, self.ttl_seconds, self._clock = max_tokens, ttl_seconds, clock
        self._records: OrderedDict[str, SampledRecord] = OrderedDict()  # least recent first
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def tokens(self) -> int:
        return self._tokens

    def record(
        self,
        owner: str | None,
        sequence_id: str,
        prompt_length: int,
        tokens: Sequence[int],
        logprobs: Sequence[float],
    ) -> None:
        record = SampledRecord(
            owner,
            prompt_length,
            np.asarray(tokens, dtype=np.int64),
            np.asarray(logprobs, dtype=np.float32),
            self._clock(),
        )
        with self._lock:
            self._drop(sequence_id)
            self._records[sequence_id] = record
            self._tokens += len(record.tokens)
            self._expire()
            while self._tokens > self.max_tokens and len(self._records) > 1:
                self._drop(next(iter(self._records)))

    def record_response(
        self,
        owner: str | None,
        sequence_ids: Sequence[str],
        prompt_length: int,
        response: SampleResponse,
    ) -> None:
        """Record every sequence of a sample response under its id."""
        for sequence_id, sequence in zip(sequence_ids, response.sequences, strict=True):
            if sequence.logprobs is not None:  # Bios's sampler always reports them
                self.record(owner, sequence_id, prompt_length, sequence.tokens, sequence.logprobs)

    def lookup(self, owner: str | None, sequence_id: str) -> SampledRecord | None:
        """The record of `owner`'s sequence (its use restarts its lifetime), or None."""
        with self._lock:
            self._expire()
            record = self._records.get(sequence_id)
            if record is None or record.owner != owner:
                return None
            record.last_used = self._clock()
            self._records.move_to_end(sequence_id)
            return record

    def _drop(self, sequence_id: str) -> None:
        record = self._records.pop(sequence_id, None)
        if record is not None:
            self._tokens -= len(record.tokens)

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_seconds
        while self._records:
            oldest_id, oldest = next(iter(self._records.items()))
            if oldest.last_used > deadline:
                break
            self._drop(oldest_id)


def check_tiling(
    where: str,
    model_input_spans: Sequence[ProvenanceSpan] | None,
    loss_fn_input_spans: Sequence[ProvenanceSpan] | None,
    input_length: int,
    target_rows: int,
) -> None:
    """Spans come as a pair, and each list tiles its field exactly."""
    if (model_input_spans is None) != (loss_fn_input_spans is None):
        missing = "loss_fn_input_spans" if loss_fn_input_spans is None else "model_input_spans"
        raise InvalidInputError(
            f"{where}.{missing}", "provenance comes as a pair: give both span lists or neither"
        )
    for name, spans, length, what in (
        ("model_input_spans", model_input_spans, input_length, "the model_input's tokens"),
        ("loss_fn_input_spans", loss_fn_input_spans, target_rows, "the target_tokens rows"),
    ):
        covered = sum(span.length for span in spans or ())
        if spans is not None and covered != length:
            raise InvalidInputError(
                f"{where}.{name}",
                f"spans cover {covered} positions but there are {length} ({what}); "
                "the runs must tile the field exactly",
            )


def _record_of(field: str, span: ProvenanceSpan, lookup: Lookup) -> SampledRecord:
    record = lookup(span.sequence_id)
    if record is None:
        hours = TTL_SECONDS / 3600
        raise InvalidInputError(
            f"{field}.sequence_id",
            f"{span.sequence_id!r} names no recorded sequence: sample it with "
            f"record_stability_info=True, with this API key; records expire {hours:g} h after "
            "their last use",
        )
    available = len(record.tokens) if span.type == "sampled" else record.prompt_length
    if span.offset + span.length > available:
        part = "sampled tokens" if span.type == "sampled" else "prompt tokens"
        raise InvalidInputError(
            field,
            f"positions [{span.offset}, {span.offset + span.length}) are outside sequence "
            f"{span.sequence_id!r}, which has {available} {part}",
        )
    return record


def _check_tokens(field: str, given: torch.Tensor, record: SampledRecord, span, start: int):
    recorded = torch.from_numpy(record.tokens[span.offset : span.offset + span.length])
    differ = (given != recorded).nonzero()
    if len(differ):
        i = int(differ[0])
        raise InvalidInputError(
            field,
            f"position {start + i} is token {int(given[i])}, but sequence {span.sequence_id!r} "
            f"sampled {int(recorded[i])} at its position {span.offset + i} (as the spans claim)",
        )


def resolve(
    where: str,
    model_input_spans: Sequence[ProvenanceSpan] | None,
    loss_fn_input_spans: Sequence[ProvenanceSpan] | None,
    tokens: torch.Tensor,
    targets: torch.Tensor,
    lookup: Lookup,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log μ, sampled) per target row of one datum, from its (tiling) spans and the records."""
    if loss_fn_input_spans is None:
        raise InvalidInputError(
            f"{where}.loss_fn_input_spans",
            "missing: this loss trains on what the sampler recorded, so every datum names its "
            "sampled sequences (Datum.with_provenance)",
        )
    start = 0
    for index, span in enumerate(model_input_spans or ()):
        field = f"{where}.model_input_spans[{index}]"
        record = _record_of(field, span, lookup)
        if span.type == "sampled":
            piece = tokens[start : start + span.length]
            _check_tokens(f"{where}.model_input", piece, record, span, start)
        start += span.length
    sampler_logprobs = torch.zeros(len(targets), dtype=torch.float32)
    sampled = torch.zeros(len(targets), dtype=torch.float32)
    start = 0
    for index, span in enumerate(loss_fn_input_spans):
        field = f"{where}.loss_fn_input_spans[{index}]"
        record = _record_of(field, span, lookup)
        if span.type == "sampled":
            stop = start + span.length
            piece = targets[start:stop]
            _check_tokens(f"{where}.loss_fn_inputs['target_tokens']", piece, record, span, start)
            recorded = record.logprobs[span.offset : span.offset + span.length]
            sampler_logprobs[start:stop] = torch.from_numpy(recorded.copy())
            sampled[start:stop] = 1.0
        start += span.length
    return sampler_logprobs, sampled
