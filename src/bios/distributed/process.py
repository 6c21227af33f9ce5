"""The engine of this process, decided once: the embedded client, `bios launch` and `bios serve`
all get theirs from `process_engine()`, so the engine itself knows nothing of ranks.

In one process it is a plain `Engine`. Under torchrun (or any env:// launcher) with several
ranks, rank 0 gets a `DistributedEngine` that runs every request on all ranks, and every other
rank follows rank 0's commands instead, then exits.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch

from bios.distributed import ops, sampling  # noqa: F401  (they register the ops followers run)
from bios.distributed.group import Group, env_world_size
from bios.distributed.leader import DistributedEngine
from bios.distributed.protocol import follow
from bios.engine.devices import (
    DEVICE_ENV,
    DTYPE_ENV,
    choose_dtype,
    dtype_name,
    resolve_device,
    resolve_precision,
)
from bios.engine.engine import Engine
from bios.errors import InvalidInputError

_engine: Engine | None = None
_lock = threading.Lock()


def spans_ranks() -> bool:
    """Whether this process is one rank of several (the launcher set WORLD_SIZE above 1)."""
    return env_world_size() > 1


def process_engine(
    home: Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> Engine:
    """This process's engine, made on the first call (with `home`, `device`, `dtype`: see
    `bios.engine.devices`) and the same one after, so every `ServiceClient()` shares its base
    weights. A later call that names another device or dtype than the engine has is an
    `InvalidInputError`: a process has one engine (None asks for nothing).

    One process: a plain `Engine`. One rank of several: on rank 0 a `DistributedEngine`; on every
    other rank this call runs rank 0's commands until rank 0 stops, then exits the process with
    their status (it never returns there). Under several ranks the device and dtype come from
    `$BIOS_DEVICE` / `$BIOS_DTYPE` (the same on every rank) or the defaults, each rank on its
    own GPU (`cuda:$LOCAL_RANK`).
    """
    global _engine
    with _lock:
        if _engine is not None:
            _check_same_precision(_engine, device, dtype)
        else:
            resolve_precision(device, dtype)  # a device that is not there fails before anything
            if not spans_ranks():
                _engine = Engine(home, device, dtype)
            else:
                group = Group()
                if not group.is_leader:
                    sys.exit(follow(group))
                _engine = DistributedEngine(home=home, group=group)
                _check_same_precision(_engine, device, dtype)
        return _engine


def _check_same_precision(
    engine: Engine, device: str | torch.device | None, dtype: str | torch.dtype | None
) -> None:
    """The engine there is the one asked for: same device (if named) and dtype (if named)."""
    has = f"this process's engine runs on {engine.device} in {dtype_name(engine.dtype)}"
    one = "a process has one engine: name the same or none"
    if spans_ranks():
        one = f"under several ranks choose them with ${DEVICE_ENV} and ${DTYPE_ENV}"
    if device is not None and resolve_device(device) != engine.device:
        raise InvalidInputError("device", f"{device!r} asked for, but {has}; {one}")
    if dtype is not None and not (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        wanted, _ = choose_dtype(dtype, engine.device)
        if wanted != engine.dtype:
            raise InvalidInputError(
                "dtype", f"{dtype!r} ({dtype_name(wanted)}) asked for, but {has}; {one}"
            )


def shutdown_process_engine() -> None:
    """At the end of `bios launch`'s script or of `bios serve`: release the other ranks (they
    leave their loop and exit). A plain engine has nothing to release."""
    with _lock:
        engine = _engine
    if isinstance(engine, DistributedEngine):
        engine.shutdown()
