"""The in-process transport: the client calls the engine directly, no server, no network."""

from __future__ import annotations

from bios.distributed import process_engine
from bios.engine.engine import Engine


def local_engine(device: str | None = None, dtype: str | None = None) -> Engine:
    """The process-wide engine, shared by every `ServiceClient()` so runs share base weights
    (under torchrun, rank 0's DistributedEngine: bios.distributed.process). `device` and
    `dtype` place it the first time (`bios.engine.devices`); later calls may repeat them."""
    return process_engine(device=device, dtype=dtype)
