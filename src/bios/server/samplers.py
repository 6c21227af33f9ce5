"""The samplers `bios serve` holds for its tenants, and when it lets them go.

The engine holds sampling sessions weakly, so a sampler lives while it is in this table. One is
freed when its run is unloaded (snapshots), when a newer snapshot of the same run is made and it
has been idle `snapshot_replaced_idle_seconds` (a sample in flight counts as use, so an
asynchronous RL client still sampling an older policy keeps it), or after `sampler_idle_seconds`
unused; a freed id then answers 404 saying why. Each tenant may hold `max_samplers_per_tenant`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from bios.errors import NotFoundError
from bios.server.config import ServerConfig
from bios.server.store import Store

FREED_REMEMBERED = 100_000  # freed sampler ids whose reason a later request is still told


class QuotaExceeded(Exception):
    """A tenant asked for more than its quota (answered with 403)."""


@dataclass
class Sampler:
    """A sampling session the server holds for a tenant, and when it was last used."""

    session: object  # bios.engine.sampling_sessions.SamplingSession
    tenant: str | None
    run_id: str | None
    snapshot: bool  # an unnamed `save_weights_for_sampler`: the run's weights of that moment
    weight_bytes: int
    last_used: float = field(default_factory=time.monotonic)
    in_flight: int = 0

    def idle_for(self, now: float) -> float:
        return 0.0 if self.in_flight else now - self.last_used


class SamplerTable:
    """Sampler id -> `Sampler`, with the freeing rules above; safe from any thread."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self._config, self._store = config, store
        self._held: dict[str, Sampler] = {}
        self._freed: OrderedDict[str, str] = OrderedDict()  # freed sampler id -> why
        self._lock = threading.Lock()

    def __getitem__(self, sampler_id: str) -> Sampler:
        with self._lock:
            return self._held[sampler_id]

    def add(
        self,
        session,
        tenant: str | None,
        model_path: str | None,
        run_id: str | None,
        snapshot: bool = False,
    ) -> str:
        sampler_id = f"sampler-{uuid.uuid4().hex[:16]}"
        if snapshot:
            self.free_replaced_snapshots(run_id)
        self.free_idle()
        entry = Sampler(session, tenant, run_id, snapshot, session.weight_bytes)
        with self._lock:
            self._held[sampler_id] = entry
        self._store.add_sampler(sampler_id, tenant, session.base_model, model_path, run_id)
        return sampler_id

    def session(self, sampler_id: str, tenant: str | None):
        """The session of a sampler `tenant` holds (its use restarts its idle clock)."""
        row = self._store.sampler(sampler_id) if isinstance(sampler_id, str) else None
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"sampling_session_id: no sampling session {sampler_id!r}")
        now = time.monotonic()
        with self._lock:
            entry = self._held.get(sampler_id)
            timeout = self._config.sampler_idle_seconds
            if entry is not None and timeout and entry.idle_for(now) >= timeout:
                self._free(sampler_id, self._idle_reason())
                entry = None
            if entry is None:
                why = self._freed.get(sampler_id, "the server restarted since it was made")
                raise NotFoundError(
                    f"sampling_session_id: sampling session {sampler_id!r} was freed ({why}); "
                    "make a new sampling client"
                )
            entry.last_used = now
        return entry.session

    def used(self, sampler_id: str, future: Future) -> None:
        """A sample is in flight on the sampler: it is not idle until the sample is done."""
        with self._lock:
            entry = self._held.get(sampler_id)
            if entry is None:
                return
            entry.in_flight += 1

        def done(_: Future) -> None:  # by id: a done future keeps its callbacks (and so this)
            with self._lock:
                entry = self._held.get(sampler_id)
                if entry is not None:
                    entry.in_flight -= 1
                    entry.last_used = time.monotonic()

        future.add_done_callback(done)

    def _free(self, sampler_id: str, why: str) -> None:
        """Drop a sampler (with `_sampler_lock` held); in-flight samples still finish."""
        del self._held[sampler_id]
        self._freed[sampler_id] = why
        while len(self._freed) > FREED_REMEMBERED:
            self._freed.popitem(last=False)

    def _idle_reason(self) -> str:
        seconds = self._config.sampler_idle_seconds
        return f"unused for {seconds:g} s (bios serve --sampler-idle-minutes)"

    def free_run_snapshots(self, run_id: str, why: str = "its run was unloaded") -> None:
        with self._lock:
            for sampler_id in [
                i for i, e in self._held.items() if e.snapshot and e.run_id == run_id
            ]:
                self._free(sampler_id, why)

    def free_replaced_snapshots(self, run_id: str | None) -> None:
        grace = self._config.snapshot_replaced_idle_seconds
        why = f"a newer snapshot of its run was made after it had been unused for {grace:g} s"
        now = time.monotonic()
        with self._lock:
            for sampler_id in [
                i
                for i, e in self._held.items()
                if e.snapshot and e.run_id == run_id and e.idle_for(now) >= grace
            ]:
                self._free(sampler_id, why)

    def free_idle(self) -> None:
        timeout = self._config.sampler_idle_seconds
        if not timeout:
            return
        now = time.monotonic()
        with self._lock:
            for sampler_id in [i for i, e in self._held.items() if e.idle_for(now) >= timeout]:
                self._free(sampler_id, self._idle_reason())

    def check_quota(self, tenant: str | None, snapshot_of: str | None = None) -> None:
        """Before a new sampler: what the new one would free is freed first, then counted."""
        if snapshot_of is not None:
            self.free_replaced_snapshots(snapshot_of)
        self.free_idle()
        with self._lock:
            held = sum(e.tenant == tenant for e in self._held.values())
        if held >= self._config.max_samplers_per_tenant:
            raise QuotaExceeded(
                f"samplers: {held} sampling sessions are held, the quota is "
                f"{self._config.max_samplers_per_tenant}; unused ones are freed after "
                f"{self._config.sampler_idle_seconds:g} s, a run's snapshots when it is unloaded"
            )

    def metrics(self, tenant: str | None) -> dict:
        """Samplers held and the memory their own weights take: the tenant's, and the server's."""
        self.free_idle()
        with self._lock:
            entries = list(self._held.values())

        def figures(chosen: list[Sampler]) -> dict:
            snapshots = [e for e in chosen if e.snapshot]
            return {
                "samplers": len(chosen),
                "sampler_bytes": sum(e.weight_bytes for e in chosen),
                "snapshots": len(snapshots),
                "snapshot_bytes": sum(e.weight_bytes for e in snapshots),
            }

        mine = figures([e for e in entries if e.tenant == tenant])
        mine["max_samplers"] = self._config.max_samplers_per_tenant
        return {"tenant": mine, "server": figures(entries)}
