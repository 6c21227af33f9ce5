"""The server's records in SQLite (WAL): sessions, runs, checkpoints, samplers and futures.

Weights live in checkpoint folders beside the database; the database says which exist, who owns
them and what state requests were in. A row for a checkpoint is written only after its folder was
renamed into place, so every listed checkpoint is complete. The row and the status of the request
that saved it are written in one transaction (`record_checkpoint`), so no crash can leave a saved
checkpoint whose request reads "submit it again". A row's `generation` names the save that wrote
its folder: start-up uses it to tell, after a crash inside an overwrite, which copy was recorded.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY, tenant TEXT, created REAL, last_heartbeat REAL,
    sdk_version TEXT, tags TEXT, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, tenant TEXT, session_id TEXT, base_model TEXT, lora_rank INTEGER,
    lora TEXT, created REAL, last_request REAL, user_metadata TEXT);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT, kind TEXT, name TEXT, tenant TEXT, size_bytes INTEGER, created REAL,
    generation TEXT, PRIMARY KEY (run_id, kind, name));
CREATE TABLE IF NOT EXISTS samplers (
    sampler_id TEXT PRIMARY KEY, tenant TEXT, base_model TEXT, model_path TEXT, run_id TEXT,
    created REAL);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash TEXT PRIMARY KEY, key_prefix TEXT, tenant TEXT, created REAL, revoked REAL);
CREATE TABLE IF NOT EXISTS futures (
    request_id TEXT PRIMARY KEY, tenant TEXT, model_id TEXT, kind TEXT, status TEXT,
    created REAL, finished REAL, error TEXT);
"""


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._tx() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # an acknowledged row survives a power cut
            db.executescript(SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(checkpoints)")}
            if "generation" not in columns:  # a database from before generations
                db.execute("ALTER TABLE checkpoints ADD COLUMN generation TEXT")

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db

    def _one(self, sql: str, *args: Any) -> dict | None:
        with self._tx() as db:
            row = db.execute(sql, args).fetchone()
        return dict(row) if row is not None else None

    def _all(self, sql: str, *args: Any) -> list[dict]:
        with self._tx() as db:
            return [dict(row) for row in db.execute(sql, args).fetchall()]

    def _exec(self, sql: str, *args: Any) -> None:
        with self._tx() as db:
            db.execute(sql, args)

    # ---- sessions -----------------------------------------------------------------------------

    def add_session(
        self,
        session_id: str,
        tenant: str | None,
        sdk_version: str | None,
        tags: list[str],
        user_metadata: dict,
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
            session_id,
            tenant,
            now,
            now,
            sdk_version,
            json.dumps(tags),
            json.dumps(user_metadata),
        )

    def session(self, session_id: str) -> dict | None:
        return self._one("SELECT * FROM sessions WHERE session_id = ?", session_id)

    def heartbeat(self, session_id: str) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE sessions SET last_heartbeat = ? WHERE session_id = ?",
                (time.time(), session_id),
            )
            return cursor.rowcount > 0

    # ---- runs ---------------------------------------------------------------------------------

    def add_run(
        self,
        run_id: str,
        tenant: str | None,
        session_id: str | None,
        base_model: str,
        lora: dict | None,
        user_metadata: dict | None,
    ) -> None:
        now = time.time()
        rank = lora["rank"] if lora else None
        self._exec(
            "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            run_id,
            tenant,
            session_id,
            base_model,
            rank,
            json.dumps(lora),
            now,
            now,
            json.dumps(user_metadata or {}),
        )

    def touch_run(self, run_id: str) -> None:
        self._exec("UPDATE runs SET last_request = ? WHERE run_id = ?", time.time(), run_id)

    def run(self, run_id: str) -> dict | None:
        return self._one("SELECT * FROM runs WHERE run_id = ?", run_id)

    def runs(self, tenant: str | None, limit: int, offset: int) -> tuple[list[dict], int]:
        rows = self._all(
            "SELECT * FROM runs WHERE tenant IS ? ORDER BY created DESC LIMIT ? OFFSET ?",
            tenant,
            limit,
            offset,
        )
        total = self._one("SELECT COUNT(*) AS n FROM runs WHERE tenant IS ?", tenant)
        return rows, total["n"] if total else 0

    # ---- checkpoints --------------------------------------------------------------------------

    def add_checkpoint(
        self,
        run_id: str,
        kind: str,
        name: str,
        tenant: str | None,
        size_bytes: int,
        generation: str | None = None,
        request: tuple[str, str | None, str] | None = None,
    ) -> None:
        """Record a checkpoint whose folder is in place and, in the same transaction, the request
        `(request_id, model_id, kind)` that saved it as done (whether or not its row exists)."""
        now = time.time()
        with self._tx() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO checkpoints "
                    "(run_id, kind, name, tenant, size_bytes, created, generation) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run_id, kind, name, tenant, size_bytes, now, generation),
                )
                if request is not None:
                    request_id, model_id, request_kind = request
                    db.execute(
                        "INSERT INTO futures VALUES (?, ?, ?, ?, 'done', ?, ?, NULL) "
                        "ON CONFLICT(request_id) DO UPDATE SET status = 'done', "
                        "finished = excluded.finished, error = NULL",
                        (request_id, tenant, model_id, request_kind, now, now),
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def checkpoint(self, run_id: str, kind: str, name: str) -> dict | None:
        return self._one(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?",
            run_id,
            kind,
            name,
        )

    def checkpoints(self, tenant: str | None, run_id: str | None = None) -> list[dict]:
        if run_id is None:
            return self._all(
                "SELECT * FROM checkpoints WHERE tenant IS ? ORDER BY created DESC", tenant
            )
        return self._all(
            "SELECT * FROM checkpoints WHERE tenant IS ? AND run_id = ? ORDER BY created",
            tenant,
            run_id,
        )

    def checkpoints_of_run(self, run_id: str, kind: str) -> list[dict]:
        """Every tenant's: for start-up, which checks folders against rows."""
        return self._all("SELECT * FROM checkpoints WHERE run_id = ? AND kind = ?", run_id, kind)

    def delete_checkpoint(self, run_id: str, kind: str, name: str) -> None:
        self._exec(
            "DELETE FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ?", run_id, kind, name
        )

    # ---- samplers -----------------------------------------------------------------------------

    def add_sampler(
        self,
        sampler_id: str,
        tenant: str | None,
        base_model: str,
        model_path: str | None,
        run_id: str | None,
    ) -> None:
        self._exec(
            "INSERT INTO samplers VALUES (?, ?, ?, ?, ?, ?)",
            sampler_id,
            tenant,
            base_model,
            model_path,
            run_id,
            time.time(),
        )

    def sampler(self, sampler_id: str) -> dict | None:
        return self._one("SELECT * FROM samplers WHERE sampler_id = ?", sampler_id)

    # ---- API keys -----------------------------------------------------------------------------

    def add_key(self, key_hash: str, key_prefix: str, tenant: str) -> None:
        self._exec(
            "INSERT INTO api_keys VALUES (?, ?, ?, ?, NULL)",
            key_hash,
            key_prefix,
            tenant,
            time.time(),
        )

    def tenant_of_key(self, key_hash: str) -> str | None:
        row = self._one(
            "SELECT tenant FROM api_keys WHERE key_hash = ? AND revoked IS NULL", key_hash
        )
        return row["tenant"] if row else None

    def revoke_keys(self, key_prefix: str) -> int:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked = ? WHERE key_prefix = ? AND revoked IS NULL",
                (time.time(), key_prefix),
            )
            return cursor.rowcount

    def keys(self) -> list[dict]:
        return self._all(
            "SELECT key_prefix, tenant, created, revoked FROM api_keys ORDER BY created"
        )

    # ---- quotas -------------------------------------------------------------------------------

    def checkpoint_bytes(self, tenant: str | None) -> int:
        row = self._one(
            "SELECT COALESCE(SUM(size_bytes), 0) AS n FROM checkpoints WHERE tenant IS ?", tenant
        )
        return int(row["n"]) if row else 0

    def latest_checkpoint(self, run_id: str, kind: str = "weights") -> dict | None:
        return self._one(
            "SELECT * FROM checkpoints WHERE run_id = ? AND kind = ? ORDER BY created DESC LIMIT 1",
            run_id,
            kind,
        )

    # ---- futures ------------------------------------------------------------------------------

    def add_future(
        self, request_id: str, tenant: str | None, model_id: str | None, kind: str
    ) -> None:
        self._exec(
            # OR IGNORE: a save may have recorded itself done before its request was listed.
            "INSERT OR IGNORE INTO futures VALUES (?, ?, ?, ?, 'pending', ?, NULL, NULL)",
            request_id,
            tenant,
            model_id,
            kind,
            time.time(),
        )

    def finish_future(self, request_id: str, error: str | None) -> None:
        self._exec(
            "UPDATE futures SET status = ?, finished = ?, error = ? WHERE request_id = ?",
            "failed" if error else "done",
            time.time(),
            error,
            request_id,
        )

    def future(self, request_id: str) -> dict | None:
        return self._one("SELECT * FROM futures WHERE request_id = ?", request_id)

    def abandon_pending_futures(self, reason: str) -> int:
        """Mark requests that were in flight when the server stopped as failed."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE futures SET status = 'failed', finished = ?, error = ? "
                "WHERE status = 'pending'",
                (time.time(), reason),
            )
            return cursor.rowcount

    def close(self) -> None:
        with self._tx() as db:
            db.close()
