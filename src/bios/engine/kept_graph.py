"""A forward pass kept alive for the backward pass that follows it.

Over HTTP, Tinker's SDK runs a custom objective as two requests: a forward (`forward_only`,
`cross_entropy`), then — after computing dL/dlogprobs on the client — a `forward_backward`
(`cross_entropy`, weights = −dL/dlogprobs) on the same data. Keeping the first request's autograd
graph lets the second run only the backward pass, so a custom objective costs what a built-in
costs. At most one forward is kept per run; it is used only if the next request of the run is
that backward on identical tokens with unchanged weights, and it is dropped after
`KEEP_SECONDS` or by any other request, which bounds the memory it holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from bios.engine.batch import PackedBatch

KEEP_SECONDS = 60.0


@dataclass
class KeptForward:
    input_ids: torch.Tensor
    targets: torch.Tensor
    lengths: list[int]
    logprobs: torch.Tensor  # flat target logprobs, still attached to the graph
    weights_version: int
    expires: float = field(default_factory=lambda: time.monotonic() + KEEP_SECONDS)

    @classmethod
    def of(cls, batch: PackedBatch, logprobs: torch.Tensor, weights_version: int) -> KeptForward:
        return cls(batch.input_ids, batch.targets, batch.lengths, logprobs, weights_version)

    def serves(self, batch: PackedBatch, weights_version: int) -> bool:
        """True if this forward is exactly the one `batch` would compute now."""
        return (
            self.weights_version == weights_version
            and time.monotonic() < self.expires
            and self.lengths == batch.lengths
            and torch.equal(self.input_ids, batch.input_ids)
            and torch.equal(self.targets, batch.targets)
        )
