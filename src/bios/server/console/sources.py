"""What the console shows, read from `bios serve`'s own records (`ServerSource`).

A source answers, for a tenant: its runs (`runs`), one run (`run`: another tenant's is not
found), a run's curves (`curves`), its checkpoints and their folders, and, where it is not
read-only, deletes a checkpoint and samples (`playground`). `bios console` has a source of the
same shape over local run folders (bios.commands.console). Runs and checkpoints are plain dicts:

    run:        id, base_model, training ("LoRA rank 8" / "full"), steps, tokens, created,
                last_activity, status, status_detail, metadata
    checkpoint: kind, name, path, size_bytes, created, expires
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from bios.checkpoints.paths import ALL_KINDS, CheckpointPath
from bios.errors import NotFoundError
from bios.server import routes_checkpoints, run_metrics
from bios.server.auth import hash_key
from bios.server.console import playground
from bios.server.openai_models import HeldSamplers
from bios.server.state import ServerState

MAX_POINTS = 1000  # a curve's points sent to the browser (`run_metrics.downsample`)


class Source(Protocol):
    read_only: bool
    needs_key: bool

    def tenant_of_key(self, key: str) -> str | None: ...
    def runs(self, tenant: str | None) -> list[dict[str, Any]]: ...
    def run(self, tenant: str | None, run_id: str) -> dict[str, Any]: ...
    def curves(self, tenant: str | None, run_id: str, max_points: int) -> dict[str, Any]: ...
    def checkpoints(self, tenant: str | None, run_id: str) -> list[dict[str, Any]]: ...
    def checkpoint_folder(self, tenant: str | None, run_id: str, kind: str, name: str) -> Path: ...


def training_of(lora_rank: int | None) -> str:
    return f"LoRA rank {lora_rank}" if lora_rank is not None else "full"


def curves_of(points: list[dict[str, float]], version: int, max_points: int) -> dict[str, Any]:
    """What a run page's charts draw: the columns of `points`, downsampled, and a version that
    changes whenever a point is added (the page redraws only then)."""
    columns = run_metrics.downsample(run_metrics.columns_of(points), max_points)
    return {"version": version, "points": len(points), "columns": columns}


class ServerSource:
    """The console over `bios serve`: its database, its metrics log and its engine."""

    read_only = False
    sample_body = playground.SampleBody

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.held = HeldSamplers()  # the playground's samplers, one per tenant and weights
        self.metrics = run_metrics.log_for(state.config.home)
        self.started = time.time()  # runs created before this were there before a restart
        # Each run's curves as last read: a page's poll reads only the rows recorded since.
        self._steps: dict[str, run_metrics.Steps] = {}
        self._steps_lock = threading.Lock()

    @property
    def needs_key(self) -> bool:
        return self.state.config.auth

    def tenant_of_key(self, key: str) -> str | None:
        return self.state.store.tenant_of_key(hash_key(key))

    # ---- runs ---------------------------------------------------------------------------------

    def runs(self, tenant: str | None) -> list[dict[str, Any]]:
        rows, _ = self.state.store.runs(tenant, limit=1_000_000, offset=0)
        summaries = self.metrics.summaries([row["run_id"] for row in rows])
        return [self._run_of(row, summaries.get(row["run_id"], {})) for row in rows]

    def run(self, tenant: str | None, run_id: str) -> dict[str, Any]:
        row = self.state.run_row(run_id, tenant)  # another tenant's: not found
        return self._run_of(row, self.metrics.summaries([run_id]).get(run_id, {}))

    def _run_of(self, row: dict, summary: dict) -> dict[str, Any]:
        status, detail = self.status_of(row)
        last = max(row["last_request"] or 0.0, summary.get("last") or 0.0)
        return {
            "id": row["run_id"],
            "base_model": row["base_model"],
            "training": training_of(row["lora_rank"]),
            "steps": summary.get("steps") or 0,
            "tokens": summary.get("tokens") or 0,
            "created": row["created"],
            "last_activity": last,
            "status": status,
            "status_detail": detail,
            "metadata": json.loads(row["user_metadata"] or "{}") or {},
            "session_id": row["session_id"],
        }

    def status_of(self, row: dict) -> tuple[str, str]:
        """(status, detail): `finished` with the reason its session's client gave, `copy` of a
        checkpoint, `active`, `restored` (in memory again after a restart, from its latest
        checkpoint), `crashed` (the server restarted; resumes on its next request if it saved a
        training checkpoint), or `unloaded`."""
        session = self.state.store.session(row["session_id"]) if row["session_id"] else None
        if session is not None and session["finished"] is not None:
            return "finished", session["finish_reason"] + (
                f": {session['finish_detail']}" if session["finish_detail"] else ""
            )
        if row["copied_from"] is not None:
            return "copy", f"of {row['copied_from']}"
        before_restart = row["created"] < self.started
        if self.state.engine.has_run(row["run_id"]):
            if before_restart:
                return "restored", "reloaded from its latest checkpoint after a server restart"
            return "active", ""
        if before_restart:
            resumable = self.state.store.latest_checkpoint(row["run_id"], "weights") is not None
            then = "resumes from its latest checkpoint on its next request"
            return "crashed", then if resumable else "the server restarted; no checkpoint to resume"
        return "unloaded", "not in memory (unload_model)"

    def curves(self, tenant: str | None, run_id: str, max_points: int) -> dict[str, Any]:
        self.state.run_row(run_id, tenant)
        with self._steps_lock:
            steps = self._steps.setdefault(run_id, run_metrics.Steps())
            steps.last_id, rows = self.metrics.rows(run_id, steps.last_id)
            steps.add(rows)
            return curves_of(steps.points, steps.rows, max_points)

    # ---- checkpoints --------------------------------------------------------------------------

    def checkpoints(self, tenant: str | None, run_id: str) -> list[dict[str, Any]]:
        self.state.run_row(run_id, tenant)
        self.state.sweep_expired()
        return [
            {
                "kind": row["kind"],
                "name": row["name"],
                "path": CheckpointPath(row["run_id"], row["kind"], row["name"]).uri("tinker://"),
                "size_bytes": row["size_bytes"],
                "created": row["created"],
                "expires": row["expires"],
            }
            for row in reversed(self.state.store.checkpoints(tenant, run_id))
        ]

    def checkpoint_folder(self, tenant: str | None, run_id: str, kind: str, name: str) -> Path:
        routes_checkpoints.owned(self.state, run_id, kind, name, tenant, ALL_KINDS)
        folder = CheckpointPath(run_id, kind, name).folder(self.state.engine.home)
        if not folder.is_dir():
            raise NotFoundError(f"checkpoint_id: no checkpoint {kind}/{name} in run {run_id!r}")
        return folder

    def delete_checkpoint(self, tenant: str | None, run_id: str, kind: str, name: str) -> None:
        """As the API's `DELETE .../checkpoints/{kind}/{name}` does."""
        routes_checkpoints.delete_checkpoint(run_id, kind, name, self.state, tenant)

    # ---- playground ---------------------------------------------------------------------------

    def playground_models(self, tenant: str | None) -> list[dict[str, str]]:
        return playground.models(self.state, tenant)

    def sample(self, tenant: str | None, body: playground.SampleBody) -> dict[str, Any]:
        return playground.sample(self.state, self.held, tenant, body)
