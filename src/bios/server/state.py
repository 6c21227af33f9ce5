"""What one `bios serve` process holds: the engine, the database, futures, ordering, samplers."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bios.engine.engine import Engine
from bios.errors import InvalidInputError, NotFoundError
from bios.server.futures import Entry, FutureTable
from bios.server.sequencer import Sequencer
from bios.server.store import Store

SERVER_RESTARTED = "the server restarted while this request was in flight; submit it again"


@dataclass
class ServerConfig:
    home: Path
    models: list[str] = field(default_factory=list)  # empty: any model the machine has
    poll_seconds: float = 20.0
    # Keep a forward's graph for the backward that follows (custom losses at built-in cost).
    keep_graphs: bool = True
    max_body_bytes: int = 256 * 1024 * 1024


class ServerState:
    def __init__(self, config: ServerConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else Engine(home=config.home)
        self.store = Store(config.home / "bios.sqlite3")
        self.store.abandon_pending_futures(SERVER_RESTARTED)
        self.futures = FutureTable()
        self.futures.on_done = self._record_done
        self.sequencer = Sequencer()
        # Model loading and run creation take seconds: off the event loop, in order.
        self.control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bios-control")
        self.samplers: dict[str, object] = {}  # sampler id -> SamplingSession (kept alive here)
        self._lock = threading.Lock()

    def preload(self) -> None:
        for model in self.config.models:
            self.engine.worker(model)

    def check_model(self, base_model: str) -> str:
        if self.config.models and base_model not in self.config.models:
            served = ", ".join(self.config.models)
            raise InvalidInputError(
                "base_model", f"{base_model!r} is not served here (served: {served})"
            )
        return base_model

    def run_row(self, model_id: str, tenant: str | None) -> dict:
        """The run's database row; another tenant's run is reported as missing."""
        row = self.store.run(model_id) if isinstance(model_id, str) else None
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"model_id: no training run {model_id!r}")
        return row

    def submit(
        self, future: Future, kind: str, model_id: str | None, tenant: str | None, **extra
    ) -> str:
        request_id = self.futures.add(future, kind, model_id, tenant, **extra)
        self.store.add_future(request_id, tenant, model_id, kind)
        if future.done():
            self._record_done(request_id, self.futures.get(request_id))
        return request_id

    def _record_done(self, request_id: str, entry: Entry | None) -> None:
        if entry is None or not entry.future.done() or self.store.future(request_id) is None:
            return
        error = entry.future.exception()
        self.store.finish_future(request_id, None if error is None else str(error))

    def add_sampler(
        self, session, tenant: str | None, model_path: str | None, run_id: str | None
    ) -> str:
        sampler_id = f"sampler-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.samplers[sampler_id] = session
        self.store.add_sampler(sampler_id, tenant, session.base_model, model_path, run_id)
        return sampler_id

    def sampler(self, sampler_id: str, tenant: str | None):
        row = self.store.sampler(sampler_id) if isinstance(sampler_id, str) else None
        session = self.samplers.get(sampler_id)
        if row is None or row["tenant"] != tenant or session is None:
            raise NotFoundError(f"sampling_session_id: no sampling session {sampler_id!r}")
        return session
