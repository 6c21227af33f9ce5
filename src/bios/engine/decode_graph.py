"""A decode step over a static KV cache, replayed as a CUDA graph on a GPU.

Why: a decode step of a few rows is some hundreds of small kernels (each layer's norms,
projections, rotary embedding, attention, the LoRA hooks' products), and on a GPU launching them
from Python costs more than running them. Measured on an H200 (`benchmarks/gpu_check.py`,
2026-12-04), a random-weight model of Llama-3.2-1B's shape in bf16, 1 prompt × 16 samples of 128
tokens: 10.5 ms a step with the eager step, 1,523 tokens/s, as slow as transformers `generate`
(1,586). A CUDA graph records the step's kernels once and replays them with one launch: in a
second run (another machine of the kind, whose slower host made eager steps 783 tokens/s and
`generate` 939), 2,970 tokens/s.

What a graph needs: every tensor it reads or writes at the same address at each replay, and no
shape that changes. So the step's inputs are static tensors copied into before each replay (the
newest tokens and their position ids); the cache is `bios.engine.kv_cache.StaticLayer`s, where a
step writes the position the device tensor `write_at` names; and attention reads a fixed window
of the cache, its first `window` positions (a power of two, at least `MIN_WINDOW`, at most the
buffer), under a boolean mask (rows, 1, 1, window) that is True on the positions filled so far
that are not a shorter prompt's padding. The mask goes to the model as a prepared 4-D mask, which
transformers hands to every layer's attention as it is.

A window's graph is captured at its first step (a warm-up run on a side stream first, as CUDA
graphs need) and replayed for every step inside it; the next window, or fewer rows (finished
rows dropped, `select`), captures anew, so a decode captures a handful of graphs. Capture errors
are thread-local: another worker thread's CUDA calls meanwhile are not disturbed. Should a
capture fail all the same, the step says so in the log and goes on eagerly, with the same result.

Numerics: a replay runs the kernels the capture recorded, on the same inputs as the eager step.
On the H200, graphed and eager decodes gave the same tokens and logprobs bit for bit in float32
(tiny models, 8 samples × 32 tokens, and greedy) and in bf16 at 1 sample × 128 tokens; in bf16 at
16 samples the tokens differed, not yet explained (cuBLAS promises the same bits only while one
stream is active, and the capture runs on a second; `gpu_check.py` prints a diagnosis). Against
the dynamic cache (`bios.engine.kv_cache.BufferLayer`) attention also sums the masked positions'
zero weights: another summation order only.

Off the GPU, and with `BIOS_CUDA_GRAPHS=0`, the same step runs eagerly (the tests run it on the
CPU against the dynamic cache).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn
from transformers import DynamicCache

from bios.engine.kv_cache import StaticLayer

log = logging.getLogger(__name__)

MIN_WINDOW = 256  # cache positions attention reads at least
WARMUP_RUNS = 1  # eager runs before a capture (lazy initialisation, cuBLAS workspaces)


def graphs_enabled(device: torch.device) -> bool:
    """Whether decode steps on `device` replay CUDA graphs: on a GPU, unless
    `BIOS_CUDA_GRAPHS=0`."""
    return device.type == "cuda" and os.environ.get("BIOS_CUDA_GRAPHS", "1") != "0"


def window_for(positions: int, room: int) -> int:
    """The cache positions attention reads when `positions` are filled: the smallest power of
    two of at least `MIN_WINDOW` that holds them, at most `room` (the buffer's)."""
    window = MIN_WINDOW
    while window < positions:
        window *= 2
    return min(window, room)


class StaticDecodeStep:
    """One decode step of a batch over a static cache (`batch_cache(..., static=True)`), as a
    CUDA graph when `graphed`; `mask` is the batch's (rows, positions) padding mask or None."""

    def __init__(
        self, model: nn.Module, cache: DynamicCache, mask: torch.Tensor | None, graphed: bool
    ) -> None:
        self.model, self.cache, self.graphed = model, cache, graphed
        self.layers: list[StaticLayer] = list(cache.layers)
        first = self.layers[0]
        rows, _, self.room, _ = first.buffers[0].shape
        device = first.buffers[0].device
        self.length = first.length  # positions filled (the prompts', left-padded)
        self.visible = torch.zeros(rows, 1, 1, self.room, dtype=torch.bool, device=device)
        if mask is None:
            self.visible[..., : self.length] = True
        else:
            self.visible[:, 0, 0, : self.length] = mask[:, : self.length].bool()
        self.write_at = first.write_at
        self.tokens = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed each row its newest token (`tokens`, (rows,)) at `positions` (rows,); returns
        the logits (rows, V) in float32, a tensor of the caller's."""
        window = window_for(self.length + 1, self.room)
        if window != self.layers[0].window:
            for layer in self.layers:
                layer.set_window(window)
        self.visible[..., self.length] = True
        self.write_at.fill_(self.length)
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        logits = self._replay(window) if self.graphed else self._run(window)
        self.length += 1
        for layer in self.layers:
            layer.length = self.length
        return logits.to(torch.float32, copy=True)  # a replay overwrites the graph's output

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (finished rows dropped): a batch of another size, new graphs."""
        self.cache.batch_select_indices(keep)
        self.visible, self.tokens, self.positions = (
            x[keep] for x in (self.visible, self.tokens, self.positions)
        )
        self.graphs.clear()

    def _run(self, window: int) -> torch.Tensor:
        return self.model(
            input_ids=self.tokens,
            attention_mask=self.visible[..., :window],
            position_ids=self.positions,
            past_key_values=self.cache,
            use_cache=True,
        ).logits[:, -1]

    def _replay(self, window: int) -> torch.Tensor:
        # Streams and replays belong to the current device: the model's (cuda:1, say) even
        # where the thread's current device is another.
        with torch.cuda.device(self.write_at.device):
            entry = self.graphs.get(window)
            if entry is None:
                self.graphs.clear()  # windows only grow: an earlier window's graph is done with
                try:
                    entry = self.graphs[window] = self._capture(window)
                except Exception as error:  # torch reports a failed capture as a RuntimeError
                    log.warning("decode step: CUDA graph capture failed (%s); eager steps", error)
                    self.graphed = False
                    return self._run(window)
            graph, output = entry
            graph.replay()
            return output

    def _capture(self, window: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream, then record the step there. Both write the same keys and
        values at the same position as the replay that follows: the cache is as one step leaves
        it. `torch.cuda.graph` would first synchronise the device and empty the allocator's cache
        (every worker's on this GPU, whose next steps would allocate afresh), and in some torch
        versions collect Python's garbage; the capture itself is these same calls."""
        side = torch.cuda.Stream(device=self.write_at.device)
        side.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._run(window)
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                output = self._run(window)
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        return graph, output
