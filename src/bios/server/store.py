"""The server's records in SQLite (WAL): sessions, runs, checkpoints, samplers and futures.

Weights live in checkpoint folders beside the database; the database says which exist, who owns
them and what state requests were in. A row for a checkpoint is written only after its folder was
renamed into place, so every listed checkpoint is complete. The row and the status of the request
that saved it are written in one transaction (`record_checkpoint`), so no crash can leave a saved
checkpoint whose request reads "submit it again". A row's `generation` names the save that wrote
its folder: start-up uses it to tell, after a crash inside an overwrite, which copy was recorded.

A session ends once (`finish_session`: the first reason the client gives is kept, with its detail
and time). A checkpoint's `expires` (a Unix time, NULL: never) is when it may be deleted
(`server/lifetimes.py` decides which expired ones are kept); `public` makes it readable by the
server's other tenants. Columns added since the first release are added to an older database
when it is opened (`COLUMNS`).
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
CREATE TABLE IF NOT EXISTS session_samplers (
    session_id TEXT, sampler_id TEXT PRIMARY KEY);
"""

# Columns added after a table's first release: (table, column, SQL type), added when missing.
COLUMNS = (
    ("checkpoints", "generation", "TEXT"),
    ("sessions", "display_name", "TEXT"),
    ("sessions", "project_id", "TEXT"),
    # When the session ended, with the reason its client gave (`success`, `errored`,
    # `interrupted`) and the detail, both as sent.
    ("sessions", "finished", "REAL"),
    ("sessions", "finish_reason", "TEXT"),
    ("sessions", "finish_detail", "TEXT"),
    ("checkpoints", "expires", "REAL"),
    ("checkpoints", "public", "INTEGER NOT NULL DEFAULT 0"),
    ("checkpoints", "user_metadata", "TEXT"),
    # A run made by `copy_weights`: the checkpoint it copies (it cannot be trained), the
    # idempotency key of the request that made it, and its destination project.
    ("runs", "copied_from", "TEXT"),
    ("runs", "copy_key", "TEXT"),
    ("runs", "project_id", "TEXT"),
)


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
            for table, column, kind in COLUMNS:  # a database from before the column
                present = {row["name"] for row in db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

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
        display_name: str | None = None,
        project_id: str | None = None,
    ) -> None:
        now = time.time()
        self._exec(
            "INSERT INTO sessions (session_id, tenant, created, last_heartbeat, sdk_version, "
            "tags, user_metadata, display_name, project_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            session_id,
            tenant,
            now,
            now,
            sdk_version,
            json.dumps(tags),
            json.dumps(user_metadata),
            display_name,
            project_id,
        )

    def session(self, session_id: str) -> dict | None:
        return self._one("SELECT * FROM sessions WHERE session_id = ?", session_id)

    def sessions(self, tenant: str | None) -> list[dict]:
        """The tenant's sessions, newest first."""
        return self._all(
            "SELECT * FROM sessions WHERE tenant IS ? ORDER BY created DESC, session_id DESC",
            tenant,
        )

    def heartbeat(self, session_id: str) -> bool:
        """Record a heartbeat of an open session; False if there is no open session by the id."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE sessions SET last_heartbeat = ? WHERE session_id = ? AND finished IS NULL",
                (time.time(), session_id),
            )
            return cursor.rowcount > 0

    def finish_session(self, session_id: str, reason: str, detail: str | None) -> bool:
        """End the session with `reason`; False (and nothing changed) if it had already ended:
        the first reason is the one kept."""
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE sessions SET finished = ?, finish_reason = ?, finish_detail = ? "
                "WHERE session_id = ? AND finished IS NULL",
                (time.time(), reason, detail, session_id),
            )
            return cursor.rowcount > 0

    def session_runs(self, session_id: str) -> list[dict]:
        return self._all("SELECT * FROM runs WHERE session_id = ? ORDER BY created", session_id)

    def link_sampler(self, session_id: str, sampler_id: str) -> None:
        """Record that the session made the sampler (`create_sampling_session`)."""
        self._exec("INSERT OR IGNORE INTO session_samplers VALUES (?, ?)", session_id, sampler_id)

    def session_samplers(self, session_id: str) -> list[str]:
        """The samplers the session made: by `create_sampling_session`, or as snapshots and
        checkpoint samplers of its runs."""
        rows = self._all(
            "SELECT sampler_id, created FROM samplers WHERE sampler_id IN "
            "(SELECT sampler_id FROM session_samplers WHERE session_id = ?) "
            "OR run_id IN (SELECT run_id FROM runs WHERE session_id = ?) ORDER BY created",
            session_id,
            session_id,
        )
        return [row["sampler_id"] for row in rows]

    # ---- runs ---------------------------------------------------------------------------------

    def add_run(
        self,
        run_id: str,
        tenant: str | None,
        session_id: str | None,
        base_model: str,
        lora: dict | None,
        user_metadata: dict | None,
        copied_from: str | None = None,
        copy_key: str | None = None,
        project_id: str | None = None,
    ) -> None:
        now = time.time()
        rank = lora["rank"] if lora else None
        self._exec(
            "INSERT INTO runs (run_id, tenant, session_id, base_model, lora_rank, lora, created, "
            "last_request, user_metadata, copied_from, copy_key, project_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            run_id,
            tenant,
            session_id,
            base_model,
            rank,
            json.dumps(lora),
            now,
            now,
            json.dumps(user_metadata or {}),
            copied_from,
            copy_key,
            project_id,
        )

    def run_by_copy_key(self, tenant: str | None, copy_key: str) -> dict | None:
        return self._one("SELECT * FROM runs WHERE tenant IS ? AND copy_key = ?", tenant, copy_key)

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
        ttl_seconds: float | None = None,
        user_metadata: dict | None = None,
    ) -> None:
        """Record a checkpoint whose folder is in place and, in the same transaction, the request
        `(request_id, model_id, kind)` that saved it as done (whether or not its row exists).
        It expires `ttl_seconds` after now (None: never); an overwritten one starts private."""
        now = time.time()
        expires = now + ttl_seconds if ttl_seconds is not None else None
        metadata = json.dumps(user_metadata) if user_metadata is not None else None
        with self._tx() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT OR REPLACE INTO checkpoints "
                    "(run_id, kind, name, tenant, size_bytes, created, generation, expires, "
                    "public, user_metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                    (run_id, kind, name, tenant, size_bytes, now, generation, expires, metadata),
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

    def delete_checkpoint_if(self, run_id: str, kind: str, name: str, created: float) -> bool:
        """Delete the row if it is still the one written at `created` (not since replaced)."""
        with self._tx() as db:
            cursor = db.execute(
                "DELETE FROM checkpoints WHERE run_id = ? AND kind = ? AND name = ? "
                "AND created = ?",
                (run_id, kind, name, created),
            )
            return cursor.rowcount > 0

    def set_expiry(self, run_id: str, kind: str, name: str, expires: float | None) -> None:
        self._exec(
            "UPDATE checkpoints SET expires = ? WHERE run_id = ? AND kind = ? AND name = ?",
            expires,
            run_id,
            kind,
            name,
        )

    def set_public(self, run_id: str, kind: str, name: str, public: bool) -> None:
        self._exec(
            "UPDATE checkpoints SET public = ? WHERE run_id = ? AND kind = ? AND name = ?",
            int(public),
            run_id,
            kind,
            name,
        )

    def expired_checkpoints(self, now: float) -> list[dict]:
        """Every tenant's checkpoints whose expiry is at or before `now`, oldest expiry first."""
        return self._all(
            "SELECT * FROM checkpoints WHERE expires IS NOT NULL AND expires <= ? ORDER BY expires",
            now,
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

    def key(self, key_hash: str) -> dict | None:
        """A live key's row, with its number (`key_id`, for `GET /auth/apikey/me`)."""
        return self._one(
            "SELECT rowid AS key_id, key_prefix, tenant, created FROM api_keys "
            "WHERE key_hash = ? AND revoked IS NULL",
            key_hash,
        )

    def revoke_key(self, key_hash: str) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "UPDATE api_keys SET revoked = ? WHERE key_hash = ? AND revoked IS NULL",
                (time.time(), key_hash),
            )
            return cursor.rowcount > 0

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
