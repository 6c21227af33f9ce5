"""Session routes: create, heartbeat, finish, list, get, search.

A session is what one `ServiceClient` opens; its runs and samplers belong to it. SDK 0.38's
`ServiceClient.close(status)` (and the exit of `with ServiceClient(...)`) finishes it with the
reason `success`, `errored` or `interrupted` and an optional detail: the first reason is kept,
with its time, and the session is terminal: its heartbeat, new runs and samplers in it, and
requests to its runs get 410 (the SDK's heartbeat loop stops on a 410), and its runs' weights are
freed from memory (their checkpoints stay). Finishing again changes nothing and answers 200.

Bios has tenants, not organizations: a tenant sees its own sessions only, whatever the
`access_scope` or search `owner` asks ("accessible" is the caller's own). Projects are labels
a session is created with (`project_id`, `default` without one); they grant no access.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import AwareDatetime, Field

from bios.errors import InvalidInputError, NotFoundError
from bios.server.auth import Tenant
from bios.server.routes_checkpoints import check_page, iso, owner_name
from bios.server.state import State
from bios.server.wire import Body, HeartbeatBody, SessionBody

DEFAULT_PROJECT = "default"
ACTIVE_SECONDS = 60.0  # a session heartbeating within this is "active" (the SDK beats every 10 s)
MAX_DETAIL_CHARS = 10_000

FinishReason = Literal["success", "errored", "interrupted"]


class FinishReasonBody(Body):
    type: FinishReason


class FinishSessionBody(Body):
    """`ClientSessionFinished`'s request: `{"reason": {"type": ...}, "detail": ...}`."""

    reason: FinishReasonBody
    detail: str | None = Field(default=None, max_length=MAX_DETAIL_CHARS)


class SearchOwnerBody(Body):
    type: Literal["own", "accessible", "user"] = "own"
    owner_urns: list[str] | None = Field(default=None, min_length=1, max_length=10)


class StatusQueryBody(Body):
    type: Literal["active", "cancelled", "failed", "client_finished"]
    reasons: list[FinishReason] | None = Field(default=None, min_length=1)


class SearchCursorBody(Body):
    last_created_at: AwareDatetime
    last_session_id: str


class SessionSearchBody(Body):
    """SDK 0.38's `SessionSearchRequest`."""

    session_id: str | None = None
    project_ids: list[str] | None = None
    user_metadata: dict[str, str] = Field(default_factory=dict)
    display_name: str | None = Field(default=None, min_length=1)
    owner: SearchOwnerBody = SearchOwnerBody()
    statuses: list[StatusQueryBody] | None = Field(default=None, min_length=1)
    limit: int = Field(default=50, ge=1, le=200)
    cursor: SearchCursorBody | None = None


router = APIRouter()


@router.post("/create_session")
def create_session(body: SessionBody, state: State, tenant: Tenant) -> dict:
    session_id = f"session-{uuid.uuid4().hex[:16]}"
    state.store.add_session(
        session_id,
        tenant,
        body.sdk_version,
        body.tags,
        body.user_metadata or {},
        display_name=body.display_name,
        project_id=body.project_id,
    )
    return {"type": "create_session", "session_id": session_id}


@router.post("/session_heartbeat")
def session_heartbeat(body: HeartbeatBody, state: State, tenant: Tenant) -> dict:
    state.open_session(body.session_id, tenant)
    if not state.store.heartbeat(body.session_id):
        state.open_session(body.session_id, tenant)  # it finished in between: the 410
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, body: FinishSessionBody, state: State, tenant: Tenant) -> dict:
    state.finish_session(session_id, tenant, body.reason.type, body.detail)
    return {}


def check_scope(access_scope: str) -> None:
    if access_scope not in ("owned", "accessible"):
        raise InvalidInputError(
            "access_scope", f"expected 'owned' or 'accessible', got {access_scope!r}"
        )


@router.get("/sessions")
def list_sessions(
    state: State, tenant: Tenant, limit: int = 20, offset: int = 0, access_scope: str = "owned"
) -> dict:
    check_page(limit, offset)
    check_scope(access_scope)
    rows = state.store.sessions(tenant)[offset : offset + limit]
    return {"sessions": [row["session_id"] for row in rows]}


def session_row(state, session_id: str, tenant) -> dict:
    row = state.store.session(session_id)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"session_id: no session {session_id!r}")
    return row


def status_of(row: dict, now: float) -> dict | None:
    """Tinker's `SessionStatus`: finished by its client (with the reason), active (heartbeat
    within `ACTIVE_SECONDS`), or None, neither finished nor known to be running."""
    if row["finished"] is not None:
        return {
            "type": "client_finished",
            "reason": {"type": row["finish_reason"]},
            "detail": row["finish_detail"],
        }
    if now - row["last_heartbeat"] <= ACTIVE_SECONDS:
        return {"type": "active"}
    return None


@router.get("/sessions/{session_id}")
def get_session(session_id: str, state: State, tenant: Tenant, access_scope: str = "owned") -> dict:
    check_scope(access_scope)
    row = session_row(state, session_id, tenant)
    return {
        "training_run_ids": [run["run_id"] for run in state.store.session_runs(session_id)],
        "sampler_ids": state.store.session_samplers(session_id),
        "user_metadata": metadata_of(row),
        "display_name": row["display_name"],
        # Bios's additions (the SDK's response type keeps extra fields): how it ended.
        "project_id": row["project_id"] or DEFAULT_PROJECT,
        "created_at": iso(row["created"]),
        "status": status_of(row, time.time()),
        "finished_at": iso(row["finished"]) if row["finished"] is not None else None,
    }


def metadata_of(row: dict) -> dict | None:
    return json.loads(row["user_metadata"] or "{}") or None


def summary_of(state, row: dict, now: float) -> dict:
    """Tinker's `SessionSummary` of a session row."""
    checkpoints = [
        checkpoint
        for run in state.store.session_runs(row["session_id"])
        for checkpoint in state.store.checkpoints(row["tenant"], run["run_id"])
    ]
    return {
        "session_id": row["session_id"],
        "created_at": iso(row["created"]),
        "owner": owner_name(row["tenant"]),
        "project_id": row["project_id"] or DEFAULT_PROJECT,
        "status": status_of(row, now),
        "checkpoints_count": len(checkpoints),
        "display_name": row["display_name"],
        "user_metadata": metadata_of(row),
        "checkpoint_storage_bytes": sum(c["size_bytes"] or 0 for c in checkpoints),
    }


def matches(body: SessionSearchBody, row: dict, now: float) -> bool:
    """Whether a session matches every filter of the search (`SessionSearchRequest`'s rules)."""
    name = (row["display_name"] or "").lower()
    by_id = body.session_id is not None and row["session_id"] == body.session_id
    by_name = body.display_name is not None and all(
        word in name for word in body.display_name.lower().split()
    )
    if (body.session_id is not None or body.display_name is not None) and not (by_id or by_name):
        return False
    project = row["project_id"] or DEFAULT_PROJECT
    if body.project_ids is not None and project not in body.project_ids:
        return False
    metadata = metadata_of(row) or {}
    if any(metadata.get(key) != value for key, value in body.user_metadata.items()):
        return False
    if body.statuses is not None:
        status = status_of(row, now)
        kind = status["type"] if status else None
        # Bios never cancels or fails a session, so those statuses match none.
        if not any(
            query.type == kind
            and (
                query.reasons is None
                or kind != "client_finished"
                or row["finish_reason"] in query.reasons
            )
            for query in body.statuses
        ):
            return False
    return True


@router.post("/sessions/search")
def search_sessions(body: SessionSearchBody, state: State, tenant: Tenant) -> dict:
    if body.owner.type == "user" and any(
        urn != owner_name(tenant) for urn in body.owner.owner_urns or []
    ):
        raise InvalidInputError(
            "owner.owner_urns",
            f"a tenant sees only its own sessions (owner {owner_name(tenant)!r}) on Bios",
        )
    if body.owner.type == "user" and not body.owner.owner_urns:
        raise InvalidInputError("owner.owner_urns", "required with owner type 'user'")
    now = time.time()
    rows = state.store.sessions(tenant)  # newest first, then by id (descending)
    if body.cursor is not None:
        after = (body.cursor.last_created_at.astimezone(UTC), body.cursor.last_session_id)
        rows = [
            row
            for row in rows
            if (datetime.fromtimestamp(row["created"], UTC), row["session_id"]) < after
        ]
    found = [row for row in rows if matches(body, row, now)]
    page = found[: body.limit]
    cursor = None
    if len(found) > body.limit:
        last = page[-1]
        cursor = {"last_created_at": iso(last["created"]), "last_session_id": last["session_id"]}
    return {"sessions": [summary_of(state, row, now) for row in page], "next_cursor": cursor}
