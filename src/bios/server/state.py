"""What one `bios serve` process holds: the engine, the database, futures, ordering, samplers
(`samplers.py`), quotas, sessions' ends, checkpoint expiry (`lifetimes.py`), and the start-up
recovery of checkpoints."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request

from bios.checkpoints.layout import is_checkpoint
from bios.checkpoints.paths import ALL_KINDS, CheckpointPath
from bios.engine.engine import Engine
from bios.errors import InvalidInputError, NotFoundError
from bios.models.loading import DEFAULT_MODEL, hf_hub_cache, resolve_model_path
from bios.server import lifetimes
from bios.server.config import ServerConfig
from bios.server.futures import Entry, FutureTable
from bios.server.samplers import QuotaExceeded, SamplerTable
from bios.server.sequencer import Sequencer
from bios.server.store import Store

SERVER_RESTARTED = "the server restarted while this request was in flight; submit it again"
RESULT_LOST = (
    "the server restarted after this request finished and its result was not kept; "
    "saved checkpoints are intact"
)


MODEL_NOT_LOADABLE = (
    "{name!r} is not a model this server loads: name a model in its Hugging Face cache, the "
    "bundled default, or a folder under one of the server's --model-dir folders"
)
# One message whether the folder is missing, not a model or outside the allowed folders: a
# tenant learns nothing about the server's filesystem from it.


class SessionFinished(Exception):
    """A request in (or heartbeat of) a session its client has finished: answered with 410,
    which is what the SDK's heartbeat loop takes as "this session is over"."""


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
        # The engine holds sessions weakly: a sampler lives while it is in this table.
        self.samplers = SamplerTable(config, self.store)
        self._lock = threading.Lock()
        # Checkpoint bytes promised to saves in progress, per tenant (see reserve_checkpoint).
        self._reserved: dict[str | None, int] = {}
        self._quota_lock = threading.Lock()
        self.sweep_expired()
        self._stopped = threading.Event()
        sweeper = threading.Thread(target=self._sweep_loop, name="bios-expiry", daemon=True)
        sweeper.start()

    def sweep_expired(self) -> list[str]:
        """Delete the expired checkpoints that no live run needs (`lifetimes.py`)."""
        return lifetimes.sweep(self.store, self.config.home)

    def _sweep_loop(self) -> None:
        while not self._stopped.wait(lifetimes.SWEEP_SECONDS):
            try:
                self.sweep_expired()
            except Exception:  # a busy or closed database: the next round tries again
                if self._stopped.is_set():
                    return

    def stop(self) -> None:
        """Stop the expiry sweep (the process is ending)."""
        self._stopped.set()

    def open_session(self, session_id: str, tenant: str | None) -> dict:
        """The row of a session of `tenant` that has not finished."""
        row = self.store.session(session_id) if isinstance(session_id, str) else None
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"session_id: no session {session_id!r}")
        if row["finished"] is not None:
            raise SessionFinished(
                f"session_id: session {session_id!r} finished ({row['finish_reason']}); "
                "start a new session (a new ServiceClient)"
            )
        return row

    def finish_session(self, session_id: str, tenant: str | None, reason: str, detail) -> bool:
        """End the session (first reason wins: False if it had ended) and free what it held:
        its runs' weights in memory and their snapshot samplers. Its checkpoints stay."""
        row = self.store.session(session_id) if isinstance(session_id, str) else None
        if row is None or row["tenant"] != tenant:
            raise NotFoundError(f"session_id: no session {session_id!r}")
        if not self.store.finish_session(session_id, reason, detail):
            return False
        runs = [run["run_id"] for run in self.store.session_runs(session_id)]

        def free() -> None:
            for run_id in runs:
                if self.engine.has_run(run_id):
                    self.engine.drop_run(run_id)
                self.samplers.free_run_snapshots(run_id)

        # On the control thread, after any create of the session's runs still queued there.
        self.control.submit(free)
        return True

    def readable_checkpoint(self, path: CheckpointPath, tenant: str | None, field: str) -> dict:
        """The row of a checkpoint `tenant` may read: its own, or one another tenant published;
        an expired one is deleted first (`lifetimes.py`) and reported missing."""
        row = self.store.checkpoint(path.run_id, path.kind, path.name)
        if row is not None and lifetimes.is_expired(self.store, row):
            self.sweep_expired()
            row = None
        if row is None or (row["tenant"] != tenant and not row["public"]):
            raise NotFoundError(f"{field}: no checkpoint at {path.uri('tinker://')}")
        return row

    def _remove_unacknowledged_checkpoints(self) -> None:
        """After a crash: recover the recorded copy of a checkpoint an overwrite was replacing;
        then delete staging folders, and folders renamed into place whose row was never written
        (their save was never acknowledged), which would only block a retry of the save."""
        for kind_folder in (self.config.home / "runs").glob("*/*"):
            if kind_folder.name not in ALL_KINDS:
                continue
            run_id = kind_folder.parent.name
            for kept in sorted(kind_folder.glob(".*.old-*")):
                self._recover_overwritten(run_id, kind_folder, kept)
            self._recover_legacy_overwrite(run_id, kind_folder)
            for folder in kind_folder.iterdir():
                if (
                    folder.name.startswith(".")
                    or self.store.checkpoint(run_id, kind_folder.name, folder.name) is None
                ):
                    shutil.rmtree(folder, ignore_errors=True)

    def _recover_overwritten(self, run_id: str, kind_folder: Path, kept: Path) -> None:
        """`kept` is `.<name>.old-<generation>`: the copy an overwrite by save `generation` moved
        aside. Unless that save was recorded (the row's generation is its own) and its folder is
        in place, the kept copy is the recorded one: put it back."""
        name, _, generation = kept.name[1:].rpartition(".old-")
        row = self.store.checkpoint(run_id, kind_folder.name, name)
        target = kind_folder / name
        if row is not None and (row["generation"] != generation or not target.exists()):
            if target.exists():  # the new copy, complete but never recorded nor acknowledged
                shutil.rmtree(target)
            kept.rename(target)
        else:
            shutil.rmtree(kept, ignore_errors=True)

    def _recover_legacy_overwrite(self, run_id: str, kind_folder: Path) -> None:
        """Servers before generations moved an overwritten folder to `.<name>.tmp-*`: where a
        row names a missing folder, put back the complete aside copy written before the row."""
        for row in self.store.checkpoints_of_run(run_id, kind_folder.name):
            if (kind_folder / row["name"]).exists():
                continue
            candidates = [
                folder
                for folder in kind_folder.glob(f".{row['name']}.tmp-*")
                if is_checkpoint(folder) and folder.stat().st_mtime <= row["created"]
            ]
            if candidates:
                newest = max(candidates, key=lambda folder: folder.stat().st_mtime)
                newest.rename(kind_folder / row["name"])

    def preload(self) -> None:
        for model in self.config.models:
            self.engine.worker(model)

    def check_model(self, base_model: str) -> str:
        if self.config.models and base_model not in self.config.models:
            served = ", ".join(self.config.models)
            raise InvalidInputError(
                "base_model", f"{base_model!r} is not served here (served: {served})"
            )
        if not self.config.models and not self.model_loadable(base_model):
            raise InvalidInputError("base_model", MODEL_NOT_LOADABLE.format(name=base_model))
        return base_model

    def model_loadable(self, name: str) -> bool:
        """Whether `name` resolves to a model in the Hugging Face cache, the bundled default, or
        a folder under an allowed `--model-dir` (always, without `model_dirs`)."""
        if self.config.model_dirs is None:
            return True
        roots = [Path(d).expanduser().resolve() for d in self.config.model_dirs]

        def allowed(path: Path) -> bool:
            return any(path.resolve().is_relative_to(root) for root in roots)

        # A GGUF file is converted (written out) as it resolves: only one from an allowed folder.
        if name.lower().endswith(".gguf") and not allowed(Path(name).expanduser()):
            return False
        try:
            path = resolve_model_path(name)
        except (OSError, ValueError, NotFoundError):
            return False
        is_default = name.strip().lower() in (
            DEFAULT_MODEL.lower(),
            DEFAULT_MODEL.split("/")[1].lower(),
        )
        return (
            is_default or allowed(path) or path.resolve().is_relative_to(hf_hub_cache().resolve())
        )

    def check_run_quota(self, tenant: str | None) -> None:
        rows, _ = self.store.runs(tenant, limit=1_000_000, offset=0)
        live = sum(self.engine.has_run(row["run_id"]) for row in rows)
        if live >= self.config.max_runs_per_tenant:
            raise QuotaExceeded(
                f"runs: {live} runs are open, the quota is {self.config.max_runs_per_tenant}; "
                "unload one (unload_model) first"
            )

    def checkpoint_estimate(self, run_id: str, kind: str) -> int:
        """The bytes a checkpoint of the run will take: its trainable weights, and for a training
        checkpoint their two AdamW moments, plus the files' headers and metadata."""
        run = self.engine.run(run_id)
        parameters = getattr(run, "parameters", None)
        if isinstance(parameters, dict) and parameters:
            copies = 3 if kind == "weights" else 1
            weights = sum(p.numel() * p.element_size() for p in parameters.values())
            return copies * (weights + 256 * len(parameters)) + 16 * 1024
        latest = self.store.latest_checkpoint(run_id, kind)  # a run that shows no tensors here
        return int(latest["size_bytes"]) if latest else 0

    def reserve_checkpoint(self, tenant: str | None, estimate: int) -> Callable[[], None]:
        """Promise `estimate` bytes of the tenant's checkpoint quota to a save about to be
        queued, or raise QuotaExceeded; answers the release (idempotent), to call once the save
        failed or its row (with the real size) was written. Concurrent saves thus never store
        more than the quota between them."""
        quota = self.config.max_checkpoint_bytes_per_tenant
        with self._quota_lock:
            stored = self.store.checkpoint_bytes(tenant)
            reserved = self._reserved.get(tenant, 0)
            if stored + reserved + estimate > quota:
                raise QuotaExceeded(
                    f"checkpoints: {stored:,} bytes are stored and {reserved:,} reserved by "
                    f"saves in progress; this save needs about {estimate:,} and the quota is "
                    f"{quota:,}; delete some first"
                )
            self._reserved[tenant] = reserved + estimate
        released = threading.Event()

        def release() -> None:
            with self._quota_lock:
                if not released.is_set():
                    released.set()
                    self._reserved[tenant] = self._reserved.get(tenant, 0) - estimate

        return release

    def live_run(self, model_id: str, tenant: str | None) -> dict:
        """The run's row, with the run in memory: a run the server no longer holds (it restarted,
        or the run was unloaded) resumes from its latest training checkpoint."""
        row = self.run_row(model_id, tenant)
        if row["copied_from"] is not None:
            raise InvalidInputError(
                "model_id",
                f"run {model_id!r} is a copy of {row['copied_from']} (copy_weights) and cannot be "
                "trained; load the copy into a new run (create_training_client_from_state)",
            )
        if row["session_id"] is not None:
            session = self.store.session(row["session_id"])
            if session is not None and session["finished"] is not None:
                raise SessionFinished(
                    f"model_id: run {model_id!r} belongs to session {row['session_id']!r}, "
                    f"which finished ({session['finish_reason']}); load its checkpoint into a "
                    "run of a new session"
                )
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

    def submit(
        self,
        future: Future,
        kind: str,
        model_id: str | None,
        tenant: str | None,
        request_id: str | None = None,
    ) -> str:
        """List the request (under `request_id` when the caller chose it beforehand, as a save
        does to record itself done together with its checkpoint) and answer its id."""
        request_id = self.futures.add(future, kind, model_id, tenant, request_id)
        self.store.add_future(request_id, tenant, model_id, kind)
        if future.done():
            self._record_done(request_id, self.futures.get(request_id))
        return request_id

    def _record_done(self, request_id: str, entry: Entry | None) -> None:
        if entry is None or not entry.future.done() or self.store.future(request_id) is None:
            return
        error = entry.future.exception()
        self.store.finish_future(request_id, None if error is None else str(error))


async def get_state(request: Request) -> ServerState:
    """The route dependency: the `ServerState` that `create_app` put on the application."""
    return request.app.state.bios


State = Annotated[ServerState, Depends(get_state)]
"""What a route declares to get the server's state (`state: State`), as `Tenant` for the tenant."""
