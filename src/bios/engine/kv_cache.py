"""The decode batch's KV cache: prompts' caches combined, and appended to in place.

`batch_cache` turns the batch-1 caches of the prompts (one prefill each) into the cache of a
decode batch, on their device, in their dtype or the one asked for (float32 for a 16-bit model on
the CPU, `bios.models.attention.cache_dtype`): prompt j's keys and values fill `counts[j]`
consecutive rows, left-padded with zeros to the longest prompt, and an attention mask (1 = real,
0 = padding) hides the padding. Zeros, not uninitialised memory, so a masked position is finite:
attention weights it by exactly 0, and 0 · NaN would still be NaN.

The layers are `DynamicLayer`s (so the model treats the cache as the `DynamicCache` it is) that
append into buffers with room to spare. A plain `DynamicLayer` appends with `torch.cat`, copying
the layer's whole cache at every step: measured at 20-30% of a decode step with 16 rows of
SmolLM2-135M on CPU. Here a step writes one position, and a full buffer doubles (amortised O(1)
per token), never past the longest prompt + `steps` positions the batch can reach: at most
`cache_bytes` (`bios.engine.memory`) when every row runs to its end.

A static cache (`static=True`, `StaticLayer`) is the one a CUDA graph can replay
(`bios.engine.decode_graph`): its buffers hold every position the batch can reach from the start
(zeros: `cache_bytes` at once), a step writes the position a device tensor names (`write_at`,
shared by every layer, set before each step), and attention reads a fixed window of the buffer
from its first position, so neither a tensor's address nor a shape changes from one step to the
next within a window.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

INITIAL_ROOM = 256  # decode positions allocated up front; more are added by doubling


class BufferLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys` / `values` are views of the filled part of larger buffers."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, length: int, limit: int | None = None
    ) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self._buffers, self._length = [keys, values], length
        self._limit = limit  # the most positions a buffer grows to (unless asked for more)
        self._expose()

    def _expose(self) -> None:
        self.keys = self._buffers[0][:, :, : self._length]
        self.values = self._buffers[1][:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        for index, states in enumerate((key_states, value_states)):
            buffer = self._buffers[index]
            if end > buffer.shape[-2]:
                rows, heads, room, dim = buffer.shape
                doubled = 2 * room if self._limit is None else min(2 * room, self._limit)
                grown = buffer.new_empty(rows, heads, max(end, doubled), dim)
                grown[:, :, : self._length] = buffer[:, :, : self._length]
                self._buffers[index] = buffer = grown
            buffer[:, :, self._length : end] = states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._buffers = [buffer[indices] for buffer in self._buffers]
        self._expose()


class StaticLayer(DynamicLayer):
    """A `DynamicLayer` over buffers of every position the batch can reach: `update` writes the
    new keys and values at position `write_at` (a (1,) device tensor) and returns the buffers'
    first `window` positions. `length` (the positions filled) and `window` are plain ints, kept
    by whoever runs the steps (`bios.engine.decode_graph.StaticDecodeStep`)."""

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, length: int, write_at: torch.Tensor
    ) -> None:
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.buffers, self.length, self.write_at = [keys, values], length, write_at
        self.window = keys.shape[-2]
        self._expose()

    def _expose(self) -> None:
        self.keys = self.buffers[0][:, :, : self.window]
        self.values = self.buffers[1][:, :, : self.window]

    def set_window(self, window: int) -> None:
        self.window = window
        self._expose()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        for buffer, states in zip(self.buffers, (key_states, value_states), strict=True):
            buffer.index_copy_(2, self.write_at, states.to(buffer.dtype))
        return self.keys, self.values

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.buffers = [buffer[indices] for buffer in self.buffers]
        self._expose()


def batch_cache(
    caches: list[DynamicCache],
    counts: list[int],
    steps: int,
    dtype: torch.dtype | None = None,
    static: bool = False,
) -> tuple[DynamicCache, torch.Tensor | None]:
    """The cache of a decode batch (`counts[j]` rows of prompt j) and its attention mask; its
    keys and values in `dtype` (default: the prompts'), the new positions cast to it as they are
    written. `static`: `StaticLayer`s with room for all `steps` positions at once.

    The mask has room for `steps` more positions and is None when every prompt has the same
    length (then nothing is padded and attention needs no mask).
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest, rows = max(lengths), sum(counts)
    starts = [sum(counts[:j]) for j in range(len(counts))]
    combined = DynamicCache()
    device = caches[0].layers[0].keys.device
    # The position every static layer writes at (its steps set it).
    write_at = torch.zeros(1, dtype=torch.int64, device=device) if static else None
    for index in range(len(caches[0].layers)):
        buffers = []
        for name in ("keys", "values"):
            first = getattr(caches[0].layers[index], name)
            room = longest + (steps if static else min(steps, INITIAL_ROOM))
            shape = (rows, first.shape[1], room, first.shape[3])
            buffer = first.new_empty(shape, dtype=dtype or first.dtype)
            # A static buffer is read whole (masked) from the first step: zeros everywhere.
            buffer[:, :, : room if static else longest] = 0
            for cache, start, count, length in zip(caches, starts, counts, lengths, strict=True):
                prompt = getattr(cache.layers[index], name)
                buffer[start : start + count, :, longest - length : longest] = prompt
            buffers.append(buffer)
        if static:
            combined.layers.append(StaticLayer(*buffers, length=longest, write_at=write_at))
        else:
            combined.layers.append(BufferLayer(*buffers, length=longest, limit=longest + steps))
    if min(lengths) == longest:
        return combined, None
    mask = torch.ones(rows, longest + steps, dtype=torch.int64, device=device)
    for start, count, length in zip(starts, counts, lengths, strict=True):
        mask[start : start + count, : longest - length] = 0
    return combined, mask
