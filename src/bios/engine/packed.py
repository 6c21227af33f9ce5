"""Linear layers with prepacked weights for decoding batches of rows (oneDNN, CPU).

A decode step multiplies a few rows (one per sample) by every weight matrix of the model. oneDNN
can lay a weight out once in the blocked format its GEMM wants ("prepacking"); at a few rows that
beats `F.linear` on the plain layout. Measured on SmolLM2-135M, one CPU thread, 46-token prompt,
64 new tokens, tokens per CPU-second: 16 rows 145 packed vs 119 plain (+21%); 4 rows 53 vs 44;
2 rows 28 vs 34 and 1 row 14 vs 18 (slower), hence `MIN_ROWS`.

Cost: one packed copy of the model's linear weights, per model (the shared base model, or a full
fine-tuning snapshot), made on first use and shared by every sampler on it; never per LoRA
snapshot. Set `BIOS_PACKED_DECODE=0` to turn it off. Numerics: another summation order, so
logits differ from `F.linear`'s by float32 rounding, as any change of batch shape does.

Installing replaces each `nn.Linear`'s `forward` on the instance for the duration of a decode;
forward hooks (the LoRA adapters of `AdapterHost`) still run on the output. Only the model's
worker thread runs the model, so nothing else sees the swap.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import ClassVar

import torch
from torch import nn

MIN_ROWS = 4


def pack(weight: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def _forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedLinears:
    """The packed weights of one model's `nn.Linear` layers."""

    _cache: ClassVar[weakref.WeakKeyDictionary[nn.Module, PackedLinears | None]] = (
        weakref.WeakKeyDictionary()
    )
    _lock = threading.Lock()

    def __init__(self, model: nn.Module) -> None:
        # Weak references: the cache below is keyed weakly by the model, so nothing here may keep
        # the model (e.g. a dropped full fine-tuning snapshot) alive.
        self._layers = [
            (weakref.ref(module), pack(module.weight.detach(), None))
            for module in model.modules()
            if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32
        ]

    @classmethod
    def of(cls, model: nn.Module) -> PackedLinears | None:
        """The packed weights of `model` (packed on first call), or None where unavailable."""
        with cls._lock:
            if model not in cls._cache:
                cls._cache[model] = cls._pack(model)
            return cls._cache[model]

    @classmethod
    def _pack(cls, model: nn.Module) -> PackedLinears | None:
        if os.environ.get("BIOS_PACKED_DECODE", "1") == "0":
            return None
        if not torch.backends.mkldnn.is_available() or not hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        ):
            return None
        try:
            packed = cls(model)
            module, weight = packed._layers[0][0](), packed._layers[0][1]
            assert module is not None
            _forward(weight, module.bias, torch.zeros(2, module.in_features))  # it runs here
        except (RuntimeError, IndexError, AttributeError):
            return None
        return packed

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The model's linear layers use the packed weights inside this block."""
        modules = [(reference(), weight) for reference, weight in self._layers]
        for module, weight in modules:
            module.forward = partial(_forward, weight, module.bias)
        try:
            yield
        finally:
            for module, _ in modules:
                del module.forward
