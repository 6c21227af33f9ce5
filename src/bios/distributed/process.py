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

from bios.distributed import ops, sampling  # noqa: F401  (they register the ops followers run)
from bios.distributed.group import Group, env_world_size
from bios.distributed.leader import DistributedEngine
from bios.distributed.protocol import follow
from bios.engine.engine import Engine

_engine: Engine | None = None
_lock = threading.Lock()


def spans_ranks() -> bool:
    """Whether this process is one rank of several (the launcher set WORLD_SIZE above 1)."""
    return env_world_size() > 1


def process_engine(home: Path | None = None) -> Engine:
    """This process's engine, made on the first call (with `home`) and the same one after, so
    every `ServiceClient()` shares its base weights.

    One process: a plain `Engine`. One rank of several: on rank 0 a `DistributedEngine`; on every
    other rank this call runs rank 0's commands until rank 0 stops, then exits the process with
    their status (it never returns there).
    """
    global _engine
    with _lock:
        if _engine is None:
            if not spans_ranks():
                _engine = Engine(home)
            else:
                group = Group()
                if not group.is_leader:
                    sys.exit(follow(group))
                _engine = DistributedEngine(home=home, group=group)
        return _engine


def shutdown_process_engine() -> None:
    """At the end of `bios launch`'s script or of `bios serve`: release the other ranks (they
    leave their loop and exit). A plain engine has nothing to release."""
    with _lock:
        engine = _engine
    if isinstance(engine, DistributedEngine):
        engine.shutdown()
