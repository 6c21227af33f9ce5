"""Commands: rank 0 sends each request to every rank, and every rank runs the same step.

Each rank holds a `Replica`: the base models (one `ModelWorker` each), the runs and the sampling
sessions of the job, under the same ids as rank 0's engine. A command is the name of an op, a
small header that every rank gets (broadcast), optionally one payload per rank (scatter: each
rank's share of a batch), and on rank 0 only, `local` arguments that never travel (the full
batch, the objective, a user's loss function). Every rank then runs `OPS[name]`, which does its
own collectives (gathering logprobs, all-reducing gradients, ...) and returns rank 0's answer.

Rank 0 checks and prepares a request before sending it (validation, reading checkpoint files),
so the other ranks only ever receive commands that succeed on well-behaved hardware. Ops keep
the ranks in step themselves: when rank 0 rejects something mid-op (a custom loss that returned
garbage), it tells the others before anyone goes on.

While idle, rank 0 sends a `ping` (a monitored barrier) every quarter of the deadline, so the
other ranks never wait longer than the deadline for a command, and a rank that died while the
job was idle is found (and named) before the next request.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bios.distributed.group import DistributedError, Group
from bios.engine.devices import resolve_precision
from bios.engine.runs import TrainingRun
from bios.engine.sampling_sessions import SamplingSession
from bios.engine.worker import ModelWorker
from bios.models.loading import load_model, resolve_model_path
from bios.models.lora import LoRAAdapter

Op = Callable[["Replica", Any, Any, Any], Any]
OPS: dict[str, Op] = {}


class RaisedInStep(Exception):
    """An op rejected its request on every rank together (rank 0 decided and told the others):
    the ranks are still in step; rank 0 raises `error` to its caller."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        OPS[name] = fn
        return fn

    return register


@dataclass
class Replica:
    """What one rank holds of the job; `worker_of` gives the base model's worker (rank 0: the
    engine's own workers)."""

    group: Group
    worker_of: Callable[[str], ModelWorker]
    runs: dict[str, TrainingRun] = field(default_factory=dict)
    sessions: dict[str, SamplingSession] = field(default_factory=dict)
    references: dict[str, LoRAAdapter] = field(default_factory=dict)
    # Rank 0: sessions dropped by their owners, to drop on every rank with the next command
    # (a deque: the garbage collector appends from any thread, without a lock to deadlock on).
    dropped_sessions: deque[str] = field(default_factory=deque)
    last_command: float = field(default_factory=time.monotonic)

    def drop_later(self, session_id: str) -> None:
        """Called by the garbage collector (any thread): drop this session everywhere, soon."""
        self.dropped_sessions.append(session_id)


def follower_workers() -> Callable[[str], ModelWorker]:
    """A follower's base models: loaded the first time a command names them."""
    workers: dict[str, ModelWorker] = {}

    def worker_of(base_model: str) -> ModelWorker:
        key = str(resolve_model_path(base_model))
        if key not in workers:
            # The same environment and LOCAL_RANK as the leader's engine: the ranks agree.
            precision = resolve_precision()
            workers[key] = ModelWorker(load_model(base_model, precision.dtype, precision.device))
        return workers[key]

    return worker_of


# ---- rank 0 -------------------------------------------------------------------------------------


def call(
    replica: Replica,
    name: str,
    header: Any = None,
    shards: list[Any] | None = None,
    local: Any = None,
) -> Any:
    """Run op `name` on every rank (rank 0 included) and return rank 0's result."""
    group = replica.group
    with group.lock:
        group.check()
        dropped = []
        while replica.dropped_sessions:
            dropped.append(replica.dropped_sessions.popleft())
        replica.last_command = time.monotonic()
        group.broadcast((name, header, dropped, shards is not None), f"sending {name!r}")
        shard = group.scatter(shards, f"{name}: sending each rank its share") if shards else None
        try:
            return OPS[name](replica, header, shard, local)
        except RaisedInStep as raised:
            raise raised.error from None
        except DistributedError:
            raise  # the group is already marked broken
        except BaseException as error:
            group.fail(f"{name} (rank 0 raised {type(error).__name__}: {error})")
            raise
        finally:
            replica.last_command = time.monotonic()


def start_heartbeat(replica: Replica) -> threading.Thread:
    """Rank 0: ping the other ranks whenever the job has been idle for a quarter deadline."""
    group = replica.group
    interval = max(0.5, group.timeout / 4)

    def beat() -> None:
        while group.broken is None:
            time.sleep(min(1.0, interval / 4))
            if time.monotonic() - replica.last_command < interval:
                continue
            if not group.lock.acquire(blocking=False):
                continue
            try:
                if group.broken is None and time.monotonic() - replica.last_command >= interval:
                    call(replica, "ping")
            except DistributedError:
                return
            finally:
                group.lock.release()

    thread = threading.Thread(target=beat, name="bios-dist-heartbeat", daemon=True)
    thread.start()
    return thread


def stop_followers(replica: Replica) -> None:
    """Rank 0, at exit: let the other ranks leave their loop."""
    group = replica.group
    if group.broken is None:
        try:
            with group.lock:
                group.broadcast(("stop", None, [], False), "sending 'stop'")
        except DistributedError:
            pass
        group.broken = "the job has shut down"
        group.close()


@op("ping")
def _ping(replica: Replica, header: None, shard: None, local: None) -> None:
    replica.group.monitored_barrier("an idle check of the ranks (ping)")


# ---- the other ranks ----------------------------------------------------------------------------


def follow(group: Group) -> int:
    """A follower's life: run rank 0's commands until it says stop; the exit status."""
    replica = Replica(group, follower_workers())
    while True:
        try:
            name, header, dropped, sharded = group.broadcast(None, "waiting for a command")
            for session_id in dropped:
                replica.sessions.pop(session_id, None)
            if name == "stop":
                group.close()
                return 0
            shard = group.scatter(None, f"{name}: receiving this rank's share") if sharded else None
            OPS[name](replica, header, shard, None)
        except DistributedError as error:
            print(f"bios rank {group.rank}: {error}", file=sys.stderr, flush=True)
            return 1
        except RaisedInStep:
            continue  # rank 0 raised it too, in step with us
        except BaseException:
            # Anything else leaves this rank out of step: say so and leave, which closes our
            # sockets, so rank 0's pending collective fails at once with "connection closed".
            print(f"bios rank {group.rank}: failed running {name!r}:", file=sys.stderr)
            traceback.print_exc()
            return 1
