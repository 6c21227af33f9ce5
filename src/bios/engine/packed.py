"""Linear layers with prepacked weights for decoding batches of rows (oneDNN, CPU; float32, and
bf16 where the CPU has native bf16 kernels).

A decode step multiplies a few rows (one per sample) by every weight matrix of the model. oneDNN
can lay a weight out once in the blocked format its GEMM wants ("prepacking"); at a few rows that
beats `F.linear` on the plain layout. Measured on SmolLM2-135M, one CPU thread, 46-token prompt,
64 new tokens, tokens per CPU-second: 16 rows 145 packed vs 119 plain (+21%); 4 rows 53 vs 44;
2 rows 28 vs 34 and 1 row 14 vs 18 (slower), hence `MIN_ROWS`.

In bf16 (a 2-core AMD EPYC with `avx512_bf16`, `benchmarks/sampling_throughput.py`, 1 prompt × 16
samples of 128 tokens): 191 tokens/s packed against 124 with `F.linear`; one row stays faster
plain (11 ms against 18 for the linear layers of one token), so `MIN_ROWS` holds for both.

Cost: one packed copy of the model's linear weights, per model (the shared base model, or a full
fine-tuning snapshot), made on first use and shared by every sampler on it; never per LoRA
snapshot. Set `BIOS_PACKED_DECODE=0` to turn it off. Numerics: another summation order, so
logits differ from `F.linear`'s by float32 rounding, as any change of batch shape does.

Sibling projections of one input are fused into one GEMM: an attention block's q/k/v and an MLP's
gate/up (`FUSED_GROUPS`). One larger multiplication streams the same weights with fewer calls:
measured at 16 rows on SmolLM2-135M, 94 ms per decode step instead of 97 (the fused outputs equal
the separate ones exactly, as oneDNN computes each output column alone). The first projection of
a group computes all of them and keeps the others' outputs for their own calls; a sibling called
with another input than the first's (a model that does not follow the pattern) computes alone.

Installing replaces each `nn.Linear`'s `forward` on the instance for the duration of a decode;
forward hooks (the LoRA adapters of `AdapterHost`) still run on each projection's own output.
Only the model's worker thread runs the model, so nothing else sees the swap.

Fewer rows than `MIN_ROWS` of a 16-bit model (`native_gemv`): torch's own matrix-vector kernel
instead of oneDNN's. oneDNN multiplies one or two bf16 rows at a fraction of the memory
bandwidth (SmolLM2-135M's linear layers, one row, weights not in cache: 27.5 ms a token against
10.1 with torch's kernel; the 49k × 576 unembedding 6.0 ms against 2.7), while prepacking does
not pay at so few rows (above). Measured on a 2-core AMD EPYC with `avx512_bf16`, a whole 1 × 1
decode of 128 tokens: 36–40 tokens/s against 20 (2 rows: 54 against 38; at 16 rows, prepacked,
torch's kernel was 7% slower, so it is for the few-row case only). The switch is torch's
process-wide `torch.backends.mkldnn` flag, held off while such a decode step runs (counted, so
decodes on two models' workers overlap safely): a 16-bit CPU matrix product another thread runs
meanwhile takes torch's kernel too, its values within rounding of oneDNN's (both accumulate in
float32). `BIOS_NATIVE_GEMV=0` leaves oneDNN on.
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
NATIVE_GEMV_DTYPES = (torch.bfloat16, torch.float16)


def pack(weight: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def _forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """float32, and bf16 where oneDNN has native bf16 kernels on this CPU (it refuses to prepack
    bf16 elsewhere)."""
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def _packable(module: nn.Module | None) -> bool:
    """A float32 (or bf16, `packable_dtypes`) linear layer on the CPU: the layouts prepacked here
    (a GPU model has none, and decodes with its own kernels)."""
    return (
        isinstance(module, nn.Linear)
        and module.weight.dtype in packable_dtypes()
        and module.weight.device.type == "cpu"
    )


_native_lock = threading.Lock()
_native_users = 0
_onednn_before = True


def wants_native_gemv(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a decode of fewer than `MIN_ROWS` rows of a `dtype` model on `device` should run
    under `native_gemv`: a 16-bit model on the CPU, unless `BIOS_NATIVE_GEMV=0`."""
    return (
        device.type == "cpu"
        and dtype in NATIVE_GEMV_DTYPES
        and os.environ.get("BIOS_NATIVE_GEMV", "1") != "0"
    )


@contextmanager
def native_gemv() -> Iterator[None]:
    """Inside the block, 16-bit CPU matrix products run on torch's own kernels, not oneDNN's
    (the module docstring says why, and what else it touches); nested or overlapping blocks keep
    the switch off until the last one ends, which restores what it was before the first."""
    global _native_users, _onednn_before
    with _native_lock:
        if _native_users == 0:
            _onednn_before = torch.backends.mkldnn.enabled
            torch._C._set_mkldnn_enabled(False)
        _native_users += 1
    try:
        yield
    finally:
        with _native_lock:
            _native_users -= 1
            if _native_users == 0:
                torch._C._set_mkldnn_enabled(_onednn_before)


class _FusedGroup:
    """Sibling projections of one input, multiplied together; each member returns its part."""

    def __init__(self, members: list[nn.Linear]) -> None:
        self.members = [weakref.ref(module) for module in members]
        self.weight = pack(torch.cat([module.weight.detach() for module in members]), None)
        has_bias = [module.bias is not None for module in members]
        self.bias = None
        if any(has_bias):
            self.bias = torch.cat(
                [
                    module.bias.detach()
                    if module.bias is not None
                    else module.weight.new_zeros(module.out_features)
                    for module in members
                ]
            )
        self.sizes = [module.out_features for module in members]
        self._input: torch.Tensor | None = None
        self._outputs: list[torch.Tensor] = []

    def forward(self, index: int, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self._input = x
            self._outputs = list(_forward(self.weight, self.bias, x).split(self.sizes, dim=-1))
        elif x is not self._input:  # not called as siblings of one input: compute alone
            return torch.nn.functional.linear(x, module.weight, module.bias)
        output = self._outputs[index]
        if index == len(self.sizes) - 1:
            self._input, self._outputs = None, []
        return output


def _fused_groups(model: nn.Module) -> list[list[nn.Linear]]:
    groups = []
    for parent in model.modules():
        for names in FUSED_GROUPS:
            members = [getattr(parent, name, None) for name in names]
            if all(_packable(m) for m in members) and len({m.in_features for m in members}) == 1:
                groups.append(members)
    return groups


class PackedLinears:
    """The packed weights of one model's `nn.Linear` layers (sibling projections fused)."""

    _cache: ClassVar[weakref.WeakKeyDictionary[nn.Module, PackedLinears | None]] = (
        weakref.WeakKeyDictionary()
    )
    _lock = threading.Lock()

    def __init__(self, model: nn.Module) -> None:
        # Weak references: the cache below is keyed weakly by the model, so nothing here may keep
        # the model (e.g. a dropped full fine-tuning snapshot) alive.
        self._groups = [_FusedGroup(members) for members in _fused_groups(model)]
        fused = {id(ref()) for group in self._groups for ref in group.members}
        self._layers = [
            (weakref.ref(module), pack(module.weight.detach(), None))
            for module in model.modules()
            if _packable(module) and id(module) not in fused
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
            probe = torch.zeros(2, module.in_features, dtype=module.weight.dtype)
            _forward(weight, module.bias, probe)  # it runs here
        except (RuntimeError, IndexError, AttributeError):
            return None
        return packed

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The model's linear layers use the packed weights inside this block."""
        modules = []
        for reference, weight in self._layers:
            module = reference()
            module.forward = partial(_forward, weight, module.bias)
            modules.append(module)
        for group in self._groups:
            for index, reference in enumerate(group.members):
                module = reference()
                module.forward = partial(group.forward, index, module)
                modules.append(module)
        try:
            yield
        finally:
            for module in modules:
                del module.forward
