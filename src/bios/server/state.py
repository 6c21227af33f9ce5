"""What one `bios serve` process holds: the engine, the database, futures, ordering, samplers."""

from __future__ import annotations

import shutil
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from bios.checkpoints.paths import KINDS, CheckpointPath
from bios.engine.engine import Engine
from bios.errors import InvalidInputError, NotFoundError
from bios.server.futures import Entry, FutureTable
from bios.server.sequencer import Sequencer
from bios.server.store import Store

SERVER_RESTARTED = "the server restarted while this request was in flight; submit it again"
RESULT_LOST = (
    "the server restarted after this request finished and its result was not kept; "
    "saved checkpoints are intact"
)


class QuotaExceeded(Exception):
    """A tenant asked for more than its quota (answered with 403)."""


@dataclass
class ServerConfig:
    home: Path
    models: list[str] = field(default_factory=list)  # empty: any model the machine has
    auth: bool = False  # require API keys (`bios serve` turns it on beyond loopback)
    max_runs_per_tenant: int = 64  # runs held in memory at once
    max_checkpoint_bytes_per_tenant: int = 100 * 2**30
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
        self._remove_unacknowledged_checkpoints()
        self.futures = FutureTable()
        self.futures.on_done = self._record_done
        self.sequencer = Sequencer()
        # Model loading and run creation take seconds: off the event loop, in order.
        self.control = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bios-control")
        self.samplers: dict[str, object] = {}  # sampler id -> SamplingSession (kept alive here)
        self._lock = threading.Lock()

    def _remove_unacknowledged_checkpoints(self) -> None:
        """After a crash: staging folders, and folders renamed into place whose row was never
        written (their save was never acknowledged), would only block a retry of the save."""
        for kind_folder in (self.config.home / "runs").glob("*/*"):
            if kind_folder.name not in KINDS:
                continue
            run_id = kind_folder.parent.name
            for folder in kind_folder.iterdir():
                if (
                    folder.name.startswith(".")
                    or self.store.checkpoint(run_id, kind_folder.name, folder.name) is None
                ):
                    shutil.rmtree(folder, ignore_errors=True)

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

    def check_run_quota(self, tenant: str | None) -> None:
        rows, _ = self.store.runs(tenant, limit=1_000_000, offset=0)
        live = sum(self.engine.has_run(row["run_id"]) for row in rows)
        if live >= self.config.max_runs_per_tenant:
            raise QuotaExceeded(
                f"runs: {live} runs are open, the quota is {self.config.max_runs_per_tenant}; "
                "unload one (unload_model) first"
            )

    def check_checkpoint_quota(self, tenant: str | None) -> None:
        used = self.store.checkpoint_bytes(tenant)
        if used >= self.config.max_checkpoint_bytes_per_tenant:
            raise QuotaExceeded(
                f"checkpoints: {used:,} bytes are stored, the quota is "
                f"{self.config.max_checkpoint_bytes_per_tenant:,}; delete some first"
            )

    def live_run(self, model_id: str, tenant: str | None) -> dict:
        """The run's row, with the run in memory: a run the server no longer holds (it restarted,
        or the run was unloaded) resumes from its latest training checkpoint."""
        row = self.run_row(model_id, tenant)
        with self._lock:
            if not self.engine.has_run(model_id):
                latest = self.store.latest_checkpoint(model_id, "weights")
                if latest is None:
                    raise NotFoundError(
                        f"model_id: run {model_id!r} is no longer in memory (the server restarted "
                        "or it was unloaded) and has no saved state to resume from"
                    )
                path = CheckpointPath(model_id, "weights", latest["name"]).uri()
                self.engine.create_run_from_state(path, with_optimizer=True, run_id=model_id)
        return row

    def run_row(self, model_id: str, tenant: str | None) -> dict:
        """The run's database row; another tenant's run is reported as missing."""
        row = self.store.run(model_id) if isinstance(model_id, str) else None
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"model_id: no training run {model_id!r}")
        return row

    def submit(self, future: Future, kind: str, model_id: str | None, tenant: str | None) -> str:
        request_id = self.futures.add(future, kind, model_id, tenant)
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


async def get_state(request: Request) -> ServerState:
    """The route dependency: the `ServerState` that `create_app` put on the application."""
    return request.app.state.bios


State = Annotated[ServerState, Depends(get_state)]
"""What a route declares to get the server's state (`state: State`), as `Tenant` for the tenant."""
