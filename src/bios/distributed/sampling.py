"""Sampling over N ranks: every rank decodes its share of the samples, rank 0 merges them.

A drained batch of requests is R rows (each request's `num_samples`). Rank r decodes rows
[rR/N, (r+1)R/N), which may cut a request into parts on neighbouring ranks. A part keeps its
request's seed and draws from the whole request's random stream (`SampleRequest.first_sample`,
`total_samples`), so the merged response is the one a single process decodes: the same tokens,
with logprobs equal up to float rounding in batches of different shapes. The prompt's logprobs
are computed by the rank that has the request's first sample.

Every rank holds the session's weights whole (a frozen copy of the adapter, or of the full
model, gathered from the FSDP2 shards when the snapshot was taken), so decoding needs no
communication until the results are gathered.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator

from bios.distributed.protocol import Replica, call, op
from bios.engine.decoding import SampleRequest, generate
from bios.engine.sampling_sessions import SamplingSession
from bios.types import SampleResponse

Part = tuple[int, SampleRequest]  # (index of the request in the batch, the part)


def split_requests(requests: list[SampleRequest], world: int) -> list[list[Part]]:
    """Each rank's parts: contiguous row ranges of about R/world rows."""
    total = sum(r.num_samples for r in requests)
    bounds = [total * rank // world for rank in range(world + 1)]
    shares: list[list[Part]] = []
    for rank in range(world):
        low, high = bounds[rank], bounds[rank + 1]
        parts: list[Part] = []
        first_row = 0
        for index, request in enumerate(requests):
            start = max(low, first_row) - first_row
            stop = min(high, first_row + request.num_samples) - first_row
            if stop > start:
                first = start + request.first_sample
                parts.append(
                    (
                        index,
                        dataclasses.replace(
                            request,
                            num_samples=stop - start,
                            first_sample=first,
                            total_samples=request.total_samples or request.num_samples,
                            prompt_logprobs=request.prompt_logprobs and start == 0,
                            topk_prompt_logprobs=request.topk_prompt_logprobs if start == 0 else 0,
                            on_progress=None,  # rank 0's listener; ranks decode in one go
                        ),
                    )
                )
            first_row += request.num_samples
        shares.append(parts)
    return shares


def merge_responses(
    requests: list[SampleRequest], gathered: list[list[tuple[int, SampleResponse]]]
) -> list[SampleResponse]:
    """One response per request from the ranks' parts (rank order = sample order)."""
    merged = [SampleResponse(sequences=[]) for _ in requests]
    for parts in gathered:
        for index, response in parts:
            target = merged[index]
            target.sequences.extend(response.sequences)
            if response.prompt_logprobs is not None:
                target.prompt_logprobs = response.prompt_logprobs
            if response.topk_prompt_logprobs is not None:
                target.topk_prompt_logprobs = response.topk_prompt_logprobs
    return merged


class DistributedSamplingSession(SamplingSession):
    """Rank 0's session: the same weights are held by every rank under the same session id."""

    replica: Replica | None = None

    def attach(self, replica: Replica, session_id: str) -> DistributedSamplingSession:
        """Take the id the other ranks know this session by; they drop it when this one goes."""
        self.session_id = session_id
        self.replica = replica
        weakref.finalize(self, replica.drop_later, session_id)
        return self

    def _decode(self, requests: list[SampleRequest]) -> list[SampleResponse]:
        assert self.replica is not None
        shares = split_requests(requests, self.replica.group.world)
        gathered = call(self.replica, "sample", self.session_id, shares, local=self)
        return merge_responses(requests, gathered)

    def _decode_turns(self, requests: list[SampleRequest]) -> Iterator[list[SampleResponse]]:
        """In one turn: every rank decodes its share at once (a collective cannot pause)."""
        yield self._decode(requests)


@op("sample")
def _sample(
    replica: Replica, session_id: str, parts: list[Part], session: SamplingSession | None
) -> list | None:
    session = session if session is not None else replica.sessions[session_id]
    results: list[tuple[int, SampleResponse]] = []
    if parts:
        with session.model() as model:
            responses = generate(model, [p for _, p in parts], session.tokenizer)
        results = [(index, r) for (index, _), r in zip(parts, responses, strict=True)]
    return replica.group.gather(results, f"sample {session_id}: collecting samples")
