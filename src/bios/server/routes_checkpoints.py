"""Training runs and checkpoints: list, inspect, delete, download as a tar archive.

A checkpoint id is `weights/<name>` or `sampler_weights/<name>`, as in Tinker. Downloads go
through a signed URL (an HMAC of the checkpoint and an expiry time, keyed by a secret kept in the
server's home), because the SDK's downloader fetches the URL without its API key.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import secrets
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from bios.checkpoints.paths import KINDS, CheckpointPath
from bios.errors import InvalidInputError, NotFoundError
from bios.fsutil import remove_folder
from bios.server.auth import Tenant
from bios.server.state import ServerState, State

URL_LIFETIME_SECONDS = 3600
MAX_OFFSET = 2**31  # SQLite integers are 64-bit; any real listing is far shorter
_CHECKPOINT_TYPES = {"weights": "training", "sampler_weights": "sampler"}


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()


def _checkpoint_json(row: dict) -> dict:
    path = CheckpointPath(row["run_id"], row["kind"], row["name"])
    return {
        "checkpoint_id": f"{row['kind']}/{row['name']}",
        "checkpoint_type": _CHECKPOINT_TYPES[row["kind"]],
        "time": _iso(row["created"]),
        "tinker_path": path.uri("tinker://"),
        "size_bytes": row["size_bytes"],
        "public": False,
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


def owned(state: ServerState, run_id: str, kind: str, name: str, tenant) -> dict:
    if kind not in KINDS:
        raise InvalidInputError(
            "checkpoint_id",
            f"expected weights/<name> or sampler_weights/<name>, got {kind}/{name}",
        )
    row = state.store.checkpoint(run_id, kind, name)
    if row is None or row["tenant"] != tenant:
        raise NotFoundError(f"checkpoint_id: no checkpoint {kind}/{name} in run {run_id!r}")
    return row


def run_json(state: ServerState, row: dict, tenant) -> dict:
    checkpoints = state.store.checkpoints(tenant, row["run_id"])
    last = {
        kind: next((c for c in reversed(checkpoints) if c["kind"] == kind), None) for kind in KINDS
    }
    return {
        "training_run_id": row["run_id"],
        "base_model": row["base_model"],
        "model_owner": row["tenant"] or "local",
        "is_lora": row["lora_rank"] is not None,
        "corrupted": False,
        "lora_rank": row["lora_rank"],
        "last_request_time": _iso(row["last_request"]),
        "last_checkpoint": _checkpoint_json(last["weights"]) if last["weights"] else None,
        "last_sampler_checkpoint": (
            _checkpoint_json(last["sampler_weights"]) if last["sampler_weights"] else None
        ),
        # Stored as JSON text, `{}` when the creator gave none (the SDK's null).
        "user_metadata": json.loads(row["user_metadata"] or "{}") or None,
    }


router = APIRouter()


@router.get("/training_runs")
def training_runs(state: State, tenant: Tenant, limit: int = 20, offset: int = 0) -> dict:
    check_page(limit, offset)
    rows, total = state.store.runs(tenant, limit, offset)
    return {
        "training_runs": [run_json(state, row, tenant) for row in rows],
        "cursor": {"offset": offset, "limit": limit, "total_count": total},
    }


@router.get("/training_runs/{run_id}")
def training_run(run_id: str, state: State, tenant: Tenant) -> dict:
    return run_json(state, state.run_row(run_id, tenant), tenant)


@router.get("/training_runs/{run_id}/checkpoints")
def list_checkpoints(run_id: str, state: State, tenant: Tenant) -> dict:
    state.run_row(run_id, tenant)
    return {"checkpoints": [_checkpoint_json(r) for r in state.store.checkpoints(tenant, run_id)]}


@router.get("/checkpoints")
def user_checkpoints(state: State, tenant: Tenant, limit: int = 100, offset: int = 0) -> dict:
    check_page(limit, offset)
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
    owned(state, run_id, kind, name, tenant)
    expires = int(time.time()) + URL_LIFETIME_SECONDS
    token = sign(secret, run_id, kind, name, expires)
    url = request.url_for("download_archive", run_id=run_id, kind=kind, name=name)
    return {"url": f"{url}?expires={expires}&signature={token}", "expires": _iso(expires)}


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
