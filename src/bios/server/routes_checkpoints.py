"""Training runs and checkpoints: list, inspect, delete, expire, publish, copy, download as a
tar archive (SDK ≤ 0.37; 0.38 downloads exports: `routes_external.py`).

A checkpoint id is `weights/<name>`, `sampler_weights/<name>` or `external_weights/<name>`, as in
Tinker. Downloads go through a signed URL (an HMAC of the checkpoint and an expiry time, keyed by
a secret kept in the server's home), because the SDK's downloader fetches the URL without its API
key. Expiry (`ttl_seconds`, `PUT .../ttl`) follows `lifetimes.py`; expired checkpoints are swept
before every listing and lookup. A published checkpoint is readable by the server's other
tenants by its path (load, sample from, weights_info, download its export), never changed or
deleted by them, nor listed among their runs. `copy_weights` makes a new run that holds a copy of
one checkpoint (hard links: no bytes are duplicated on disk, the quota counts them) and cannot
be trained.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
import shutil
import tarfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import Response
from pydantic import ConfigDict

from bios.checkpoints.layout import STATE_FILE
from bios.checkpoints.paths import ALL_KINDS, KINDS, CheckpointPath
from bios.errors import InvalidInputError, NotFoundError
from bios.fsutil import atomic_folder, remove_folder
from bios.server.auth import Tenant
from bios.server.lifetimes import check_ttl
from bios.server.state import ServerState, State
from bios.server.wire import Body

URL_LIFETIME_SECONDS = 3600
MAX_OFFSET = 2**31  # SQLite integers are 64-bit; any real listing is far shorter
_CHECKPOINT_TYPES = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def owner_name(tenant: str | None) -> str:
    """How a tenant is named to clients (`model_owner`, a session's `owner`)."""
    return tenant or "local"


def _checkpoint_json(row: dict) -> dict:
    path = CheckpointPath(row["run_id"], row["kind"], row["name"])
    return {
        "checkpoint_id": f"{row['kind']}/{row['name']}",
        "checkpoint_type": _CHECKPOINT_TYPES[row["kind"]],
        "time": iso(row["created"]),
        "tinker_path": path.uri("tinker://"),
        "size_bytes": row["size_bytes"],
        "public": bool(row["public"]),
        "user_metadata": json.loads(row["user_metadata"]) if row["user_metadata"] else None,
        "expires_at": iso(row["expires"]) if row["expires"] is not None else None,
    }


def check_page(limit: int, offset: int) -> None:
    if not 1 <= limit <= 1000 or not 0 <= offset <= MAX_OFFSET:
        raise InvalidInputError(
            "limit", f"expected 1 <= limit <= 1000 and 0 <= offset <= {MAX_OFFSET}"
        )


def _archive(folder: Path) -> bytes:
    """The checkpoint's files plus the `checkpoint_complete` marker the SDK's CLI checks for."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=file.name)
        marker = tarfile.TarInfo("checkpoint_complete")
        tar.addfile(marker, io.BytesIO(b""))
    return buffer.getvalue()


def url_secret_of(home: Path) -> bytes:
    """The key that signs download links, created in the server's home the first time."""
    secret_file = home / "archive-url.key"
    if not secret_file.exists():
        secret_file.write_bytes(secrets.token_bytes(32))
        secret_file.chmod(0o600)
    return secret_file.read_bytes()


async def get_url_secret(request: Request) -> bytes:
    """The route dependency: the signing key `create_app` read with `url_secret_of`."""
    return request.app.state.archive_url_secret


UrlSecret = Annotated[bytes, Depends(get_url_secret)]


def sign(secret: bytes, run_id: str, kind: str, name: str, expires: int) -> str:
    message = f"{run_id}/{kind}/{name}/{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def check_kind(kind: str, name: str, kinds: tuple[str, ...] = ALL_KINDS) -> None:
    if kind not in kinds:
        expected = " or ".join(f"{k}/<name>" for k in kinds)
        raise InvalidInputError("checkpoint_id", f"expected {expected}, got {kind}/{name}")


def owned(state: ServerState, run_id: str, kind: str, name: str, tenant, kinds=ALL_KINDS) -> dict:
    """The row of a checkpoint `tenant` owns (expired ones are swept first)."""
    check_kind(kind, name, kinds)
    state.sweep_expired()
    row = state.store.checkpoint(run_id, kind, name)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"checkpoint_id: no checkpoint {kind}/{name} in run {run_id!r}")
    return row


def readable(state: ServerState, run_id: str, kind: str, name: str, tenant) -> dict:
    """The row of a checkpoint `tenant` owns or another tenant published."""
    check_kind(kind, name)
    return state.readable_checkpoint(CheckpointPath(run_id, kind, name), tenant, "checkpoint_id")


def run_json(state: ServerState, row: dict, tenant) -> dict:
    checkpoints = state.store.checkpoints(tenant, row["run_id"])
    last = {
        kind: next((c for c in reversed(checkpoints) if c["kind"] == kind), None) for kind in KINDS
    }
    return {
        "training_run_id": row["run_id"],
        "base_model": row["base_model"],
        "model_owner": owner_name(row["tenant"]),
        "is_lora": row["lora_rank"] is not None,
        "corrupted": False,
        "lora_rank": row["lora_rank"],
        "last_request_time": iso(row["last_request"]),
        "last_checkpoint": _checkpoint_json(last["weights"]) if last["weights"] else None,
        "last_sampler_checkpoint": (
            _checkpoint_json(last["sampler_weights"]) if last["sampler_weights"] else None
        ),
        # Stored as JSON text, `{}` when the creator gave none (the SDK's null).
        "user_metadata": json.loads(row["user_metadata"] or "{}") or None,
        "session_id": row["session_id"],  # Bios's addition: the session the run belongs to
        "copied_from": row["copied_from"],  # Bios's addition: the source of a copy_weights run
    }


router = APIRouter()


@router.get("/training_runs")
def training_runs(state: State, tenant: Tenant, limit: int = 20, offset: int = 0) -> dict:
    check_page(limit, offset)
    state.sweep_expired()
    rows, total = state.store.runs(tenant, limit, offset)
    return {
        "training_runs": [run_json(state, row, tenant) for row in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
def training_run(run_id: str, state: State, tenant: Tenant) -> dict:
    state.sweep_expired()
    return run_json(state, state.run_row(run_id, tenant), tenant)


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, state: State, tenant: Tenant) -> dict:
    state.run_row(run_id, tenant)
    state.sweep_expired()
    return {"checkpoints": [_checkpoint_json(r) for r in state.store.checkpoints(tenant, run_id)]}


@router.get("/checkpoints")
def user_checkpoints(state: State, tenant: Tenant, limit: int = 100, offset: int = 0) -> dict:
    check_page(limit, offset)
    state.sweep_expired()
    rows = state.store.checkpoints(tenant)
    page = rows[offset : offset + limit]
    return {
        "checkpoints": [_checkpoint_json(r) for r in page],
        "cursor": {"offset": offset, "limit": limit, "total_count": len(rows)},
    }


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}")
def delete_checkpoint(run_id: str, kind: str, name: str, state: State, tenant: Tenant) -> dict:
    owned(state, run_id, kind, name, tenant)
    # The row goes first: a crash in between leaves an unlisted folder, never a dangling row.
    state.store.delete_checkpoint(run_id, kind, name)
    folder = CheckpointPath(run_id, kind, name).folder(state.engine.home)
    if folder.exists():
        remove_folder(folder)
    return {}


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/archive")
def archive_url(
    run_id: str,
    kind: str,
    name: str,
    request: Request,
    state: State,
    secret: UrlSecret,
    tenant: Tenant,
) -> dict:
    readable(state, run_id, kind, name, tenant)
    check_kind(kind, name, KINDS)
    expires = int(time.time()) + URL_LIFETIME_SECONDS
    token = sign(secret, run_id, kind, name, expires)
    url = request.url_for("download_archive", run_id=run_id, kind=kind, name=name)
    return {"url": f"{url}?expires={expires}&signature={token}", "expires": iso(expires)}


# No tenant: the SDK's downloader fetches the URL without its API key; the signature is the key.
@router.get("/archives/{run_id}/{kind}/{name}.tar", name="download_archive")
def download_archive(
    run_id: str,
    kind: str,
    name: str,
    expires: int,
    signature: str,
    state: State,
    secret: UrlSecret,
) -> Response:
    expected = sign(secret, run_id, kind, name, expires).encode()
    if expires < time.time() or not hmac.compare_digest(signature.encode(), expected):
        raise NotFoundError("signature: the download link is invalid or expired")
    if state.store.checkpoint(run_id, kind, name) is None:
        raise NotFoundError(f"checkpoint_id: no checkpoint {kind}/{name} in run {run_id!r}")
    folder = CheckpointPath(run_id, kind, name).folder(state.engine.home)
    return Response(_archive(folder), media_type="application/x-tar")


class TtlBody(Body):
    model_config = ConfigDict(**Body.model_config, strict=True)

    ttl_seconds: int | None  # required, as the SDK always sends it: null removes the expiry


@router.put("/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl")
def set_ttl(run_id: str, kind: str, name: str, body: TtlBody, state: State, tenant: Tenant) -> dict:
    """The checkpoint expires `ttl_seconds` from now (null: never)."""
    ttl = check_ttl(body.ttl_seconds)
    owned(state, run_id, kind, name, tenant)
    state.store.set_expiry(run_id, kind, name, time.time() + ttl if ttl is not None else None)
    return {}


@router.post("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def publish(run_id: str, kind: str, name: str, state: State, tenant: Tenant) -> dict:
    owned(state, run_id, kind, name, tenant)
    state.store.set_public(run_id, kind, name, True)
    return {}


@router.delete("/training_runs/{run_id}/checkpoints/{kind}/{name}/publish")
def unpublish(run_id: str, kind: str, name: str, state: State, tenant: Tenant) -> dict:
    owned(state, run_id, kind, name, tenant)
    state.store.set_public(run_id, kind, name, False)
    return {}


class CopyWeightsBody(Body):
    """SDK 0.38's `CopyWeightsRequest` (its `weights_access_token` travels as a header)."""

    session_id: str | None = None
    model_seq_id: int | None = None
    destination_project_id: str | None = None
    source_path: str
    ttl_seconds: int | None = None


def link_or_copy(source: Path, target: Path) -> None:
    """`target` shares `source`'s bytes where the filesystem allows (a hard link: checkpoint
    files are never written in place, a save writes a new folder), else is a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


@router.post("/copy_weights")
def copy_weights(
    body: CopyWeightsBody,
    state: State,
    tenant: Tenant,
    x_idempotency_key: Annotated[str | None, Header()] = None,
    x_tinker_weights_access_token: Annotated[str | None, Header()] = None,
) -> dict:
    """A new run, of the source's base model and settings, holding a copy of the checkpoint
    under the same kind and name. A retried request (same `X-Idempotency-Key`) answers the
    first copy."""
    if x_tinker_weights_access_token is not None:
        raise InvalidInputError(
            "weights_access_token",
            "Bios has no weight access tokens: copy your own checkpoints or published ones",
        )
    source = CheckpointPath.parse(body.source_path, "source_path")
    if x_idempotency_key is not None:
        earlier = state.store.run_by_copy_key(tenant, x_idempotency_key)
        if earlier is not None:
            copied = CheckpointPath.parse(earlier["copied_from"], "source_path")
            path = CheckpointPath(earlier["run_id"], copied.kind, copied.name)
            return {"tinker_path": path.uri("tinker://")}
    ttl = check_ttl(body.ttl_seconds)
    row = state.readable_checkpoint(source, tenant, "source_path")
    if body.session_id is not None:
        if body.destination_project_id is not None:
            raise InvalidInputError(
                "destination_project_id",
                "give a destination project or a session (whose project the copy takes), not both",
            )
        if body.model_seq_id is None:
            raise InvalidInputError("model_seq_id", "required with session_id")
        session = state.open_session(body.session_id, tenant)
        run_id = f"{body.session_id}:train:{body.model_seq_id}"
        project = session["project_id"]
    elif body.destination_project_id is not None:
        run_id, project = f"copy-{uuid.uuid4().hex[:16]}", body.destination_project_id
    else:
        raise InvalidInputError(
            "destination_project_id", "give a destination project, or session_id and model_seq_id"
        )
    if state.store.run(run_id) is not None or state.engine.has_run(run_id):
        raise InvalidInputError("model_seq_id", f"run {run_id!r} already exists")
    source_run = state.store.run(source.run_id)
    release = state.reserve_checkpoint(tenant, int(row["size_bytes"] or 0))
    try:
        target = CheckpointPath(run_id, source.kind, source.name)
        with atomic_folder(target.folder(state.engine.home)) as staging:
            for file in source.folder(state.engine.home).iterdir():
                if file.name == STATE_FILE:  # rewritten: the copy names its own run
                    saved = json.loads(file.read_text())
                    (staging / STATE_FILE).write_text(json.dumps({**saved, "run_id": run_id}))
                else:
                    link_or_copy(file, staging / file.name)
        state.store.add_run(
            run_id,
            tenant,
            body.session_id,
            source_run["base_model"],
            json.loads(source_run["lora"] or "null"),
            None,
            copied_from=source.uri("tinker://"),
            copy_key=x_idempotency_key,
            project_id=project,
        )
        state.store.add_checkpoint(
            run_id, source.kind, source.name, tenant, row["size_bytes"], ttl_seconds=ttl
        )
    finally:
        release()
    return {"tinker_path": target.uri("tinker://")}
