"""The in-process transport: the client calls the engine directly, no server, no network."""

from __future__ import annotations

from bios.distributed import process_engine
from bios.engine.engine import Engine


def local_engine() -> Engine:
    """The process-wide engine, shared by every `ServiceClient()` so runs share base weights
    (under torchrun, rank 0's DistributedEngine: bios.distributed.process)."""
    return process_engine()
