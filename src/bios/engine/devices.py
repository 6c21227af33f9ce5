"""Where a base model lives and in which dtype: chosen once per engine, with the reason.

Device (`resolve_device`): the one named (`"cpu"`, `"cuda"`, `"cuda:1"`, `"mps"`), else
`$BIOS_DEVICE`, else CUDA when torch sees a GPU, else the CPU. One rank of several (torchrun sets
`WORLD_SIZE` and `LOCAL_RANK`) takes `cuda:LOCAL_RANK` for a plain `"cuda"`, so each rank of a node
has its own GPU. A device that is not there is an `InvalidInputError("device", ...)` that names it
and what this machine has.

Dtype (`resolve_dtype`): the one named (`"bf16"`/`"bfloat16"`, `"fp32"`/`"float32"`; `"auto"` or
None: the default), else `$BIOS_DTYPE`, else the faster of the two on the hardware in hand:

- CUDA: bfloat16 where the GPU computes it natively (compute capability 8.0 and later: A100, H100,
  RTX 30xx and newer), float32 on older GPUs, which only emulate it.
- CPU: bfloat16 where the CPU has native bf16 matrix instructions (x86 `avx512_bf16` or
  `amx_bf16`, ARM `bf16`, and oneDNN able to use them), else float32. Elsewhere torch still runs
  bf16 (that is what the tests use), but emulated, slower than float32.

float16 is refused: Bios does no loss scaling, so gradients flowing back through float16
activations underflow to zero, and the activations of several model families overflow float16's
largest value (65504). bfloat16 costs the same memory with float32's range.

The dtype is the base model's: LoRA factors, AdamW moments, full fine-tuning's master weights,
logprobs and every objective's arithmetic stay float32 whatever it is.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bios.errors import InvalidInputError

DEVICE_ENV, DTYPE_ENV = "BIOS_DEVICE", "BIOS_DTYPE"
DEVICE_TYPES = ("cpu", "cuda", "mps")

DTYPE_NAMES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
REFUSED_DTYPES = ("fp16", "float16", "half")
_FP16_REASON = (
    "float16 is not supported: without loss scaling its gradients underflow, and some models' "
    "activations overflow its range (65504); use bf16 (the same memory, float32's range) or fp32"
)
# /proc/cpuinfo flags of native bf16 matrix arithmetic (x86: AVX-512 BF16, AMX; ARM: FEAT_BF16).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


@dataclass(frozen=True)
class Precision:
    """A base model's device and dtype, and why that dtype (for the CLI to print)."""

    device: torch.device
    dtype: torch.dtype
    reason: str

    def describe(self) -> str:
        return f"{self.device}, {dtype_name(self.dtype)} ({self.reason})"


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


def available_devices() -> list[str]:
    """The devices this process can use, in the form `resolve_device` accepts."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def _local_rank() -> int | None:
    """This process's GPU index on its node when it is one rank of several, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return int(os.environ.get("LOCAL_RANK", "0"))
    return None


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device named (see the module docstring), checked to be on this machine."""
    source = ""  # where the name came from, when not from the caller
    if name is None:
        name = os.environ.get(DEVICE_ENV) or None
        source = f" (from ${DEVICE_ENV})"
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, (str, torch.device)):
        raise InvalidInputError(
            "device", f"expected a device name such as 'cpu' or 'cuda:0', got {name!r}"
        )
    available = ", ".join(available_devices())
    try:
        device = torch.device(name.strip().lower() if isinstance(name, str) else name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(
            "device", f"{name!r}{source} is not a device name; this machine has: {available}"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        return _cuda_device(device, source, available)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise InvalidInputError(
                "device", f"'mps'{source} is not available on this machine; it has: {available}"
            )
        return torch.device("mps")
    raise InvalidInputError(
        "device",
        f"{str(device)!r}{source}: Bios runs on {', '.join(DEVICE_TYPES)}; "
        f"this machine has: {available}",
    )


def _cuda_device(device: torch.device, source: str, available: str) -> torch.device:
    if not torch.cuda.is_available():
        raise InvalidInputError(
            "device",
            f"{str(device)!r}{source} asked for, but torch sees no CUDA GPU here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            f"this machine has: {available}",
        )
    index = device.index
    if index is None:
        local = _local_rank()
        index = local if local is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise InvalidInputError(
            "device",
            f"'cuda:{index}'{source} is not there: this machine has {count} GPU(s): {available}",
        )
    return torch.device("cuda", index)


@functools.cache
def cpu_bf16_instructions() -> tuple[str, ...]:
    """The native bf16 instructions of this CPU that oneDNN can use (empty where there are none,
    or where that cannot be told: no /proc/cpuinfo, torch built without oneDNN)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    found = tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)
    try:
        usable = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        usable = False
    return found if usable else ()


def _cuda_native_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def default_dtype(device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype that is fastest on `device`, and why (see the module docstring)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if _cuda_native_bf16(device):
            return torch.bfloat16, f"the default on a GPU with native bf16 ({name})"
        major, minor = torch.cuda.get_device_capability(device)
        return torch.float32, (
            f"{name} (compute capability {major}.{minor}) only emulates bf16, so float32 is faster"
        )
    if device.type == "cpu":
        found = cpu_bf16_instructions()
        if found:
            return torch.bfloat16, f"this CPU has native bf16 matrix instructions ({found[0]})"
        return torch.float32, (
            "this CPU has no native bf16 matrix instructions (avx512_bf16, amx_bf16), where "
            "bf16 is emulated and slower than float32"
        )
    return torch.float32, f"the default on {device.type}"


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The dtype of a base model on `device`: the one named, `$BIOS_DTYPE`, or the default."""
    return choose_dtype(name, device)[0]


def choose_dtype(name: str | torch.dtype | None, device: torch.device) -> tuple[torch.dtype, str]:
    """`resolve_dtype` and why it is that dtype."""
    source, reason = "", "asked for"
    if name is None and os.environ.get(DTYPE_ENV):
        name = os.environ[DTYPE_ENV]
        reason = f"${DTYPE_ENV}={name}"
        source = f" (from {reason})"
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        return default_dtype(device)
    return _named_dtype(name, source), reason


def _named_dtype(name: str | torch.dtype, source: str) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name in (torch.float32, torch.bfloat16):
            return name
        if name == torch.float16:
            raise InvalidInputError("dtype", _FP16_REASON)
        raise InvalidInputError("dtype", f"{name}: expected bfloat16 or float32")
    if not isinstance(name, str):
        raise InvalidInputError("dtype", f"expected 'bf16', 'fp32' or 'auto', got {name!r}")
    key = name.strip().lower().removeprefix("torch.")
    if key in REFUSED_DTYPES:
        raise InvalidInputError("dtype", f"{name!r}{source}: {_FP16_REASON}")
    if key not in DTYPE_NAMES:
        raise InvalidInputError(
            "dtype", f"{name!r}{source} is not a dtype Bios offers; expected bf16, fp32 or auto"
        )
    return DTYPE_NAMES[key]


def resolve_precision(
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
) -> Precision:
    """The device and dtype of an engine's base models; raises before anything is loaded."""
    where = resolve_device(device)
    chosen, reason = choose_dtype(dtype, where)
    return Precision(where, chosen, reason)
