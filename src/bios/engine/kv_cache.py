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


def batch_cache(
    caches: list[DynamicCache], counts: list[int], steps: int, dtype: torch.dtype | None = None
) -> tuple[DynamicCache, torch.Tensor | None]:
    """The cache of a decode batch (`counts[j]` rows of prompt j) and its attention mask; its
    keys and values in `dtype` (default: the prompts'), the new positions cast to it as they are
    written.

    The mask has room for `steps` more positions and is None when every prompt has the same
    length (then nothing is padded and attention needs no mask).
    """
    lengths = [cache.get_seq_length() for cache in caches]
    longest, rows = max(lengths), sum(counts)
    starts = [sum(counts[:j]) for j in range(len(counts))]
    combined = DynamicCache()
    for index in range(len(caches[0].layers)):
        buffers = []
        for name in ("keys", "values"):
            first = getattr(caches[0].layers[index], name)
            room = longest + min(steps, INITIAL_ROOM)
            shape = (rows, first.shape[1], room, first.shape[3])
            buffer = first.new_empty(shape, dtype=dtype or first.dtype)
            buffer[:, :, :longest] = 0
            for cache, start, count, length in zip(caches, starts, counts, lengths, strict=True):
                prompt = getattr(cache.layers[index], name)
                buffer[start : start + count, :, longest - length : longest] = prompt
            buffers.append(buffer)
        combined.layers.append(BufferLayer(*buffers, length=longest, limit=longest + steps))
    if min(lengths) == longest:
        return combined, None
    device = caches[0].layers[0].keys.device
    mask = torch.ones(rows, longest + steps, dtype=torch.int64, device=device)
    for start, count, length in zip(starts, counts, lengths, strict=True):
        mask[start : start + count, : longest - length] = 0
    return combined, mask
