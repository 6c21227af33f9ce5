"""Exports for use outside Bios: `save_weights_external` and its per-file download URLs, the only
download path of SDK ≥ 0.38 (`tinker checkpoint download`, the cookbook's `weights.download`).

An export is a checkpoint of kind `external_weights` (type `external`): a LoRA run's adapter as
a PEFT folder (`adapter_config.json`, `adapter_model.safetensors`; load it with
`peft.PeftModel.from_pretrained(base, folder)`), or a full fine-tuning run's weights as a Hugging
Face model folder (`model.safetensors` and the base model's `config.json`). With
`age_encryption_recipients` (at most 10 `age1…` keys or SSH public keys) every file is encrypted
to them with age (`pyrage`) and stored as `<file>.age`; the plain files never reach the disk
under the export's name. `external_weights_urls` signs one URL per file, on this server, valid
for an hour; the download route takes no API key, the signature is the credential.
"""

from __future__ import annotations

import hmac
import shutil
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import Field

from bios.checkpoints.layout import FULL_WEIGHTS_FILE, STATE_FILE
from bios.checkpoints.paths import EXTERNAL_KIND, CheckpointPath, check_name
from bios.concurrency import then
from bios.errors import InvalidInputError, NotFoundError
from bios.fsutil import atomic_folder
from bios.server.auth import Tenant
from bios.server.futures import new_request_id
from bios.server.lifetimes import check_ttl
from bios.server.routes_checkpoints import URL_LIFETIME_SECONDS, UrlSecret, iso, readable, sign
from bios.server.routes_training import sequenced
from bios.server.state import ServerState, State
from bios.server.wire import Body

MAX_RECIPIENTS = 10
AGE_SUFFIX = ".age"
FILE_KIND = "external_file"  # in a file URL's signed message, so it cannot sign anything else


class SaveWeightsExternalBody(Body):
    """SDK 0.38's `SaveWeightsExternalRequest`."""

    model_id: str
    path: str
    seq_id: int | None = None
    ttl_seconds: int | None = None
    age_encryption_recipients: Annotated[list[str] | None, Field(max_length=MAX_RECIPIENTS)] = None


def age_recipients(keys: list[str] | None) -> list | None:
    """The `age` recipients of the keys (native `age1…` or SSH public keys), or None."""
    if keys is None:
        return None
    import pyrage  # the `serve` extra's; imported here so that the rest of Bios needs none

    if not keys:
        raise InvalidInputError(
            "age_encryption_recipients", "give at least one recipient, or null for plain files"
        )
    recipients = []
    for index, key in enumerate(keys):
        kind = pyrage.ssh if key.startswith(("ssh-", "ecdsa-")) else pyrage.x25519
        try:
            recipients.append(kind.Recipient.from_str(key))
        except pyrage.RecipientError as error:
            raise InvalidInputError(
                f"age_encryption_recipients[{index}]",
                f"not an age recipient (an age1… key or an SSH public key): {error}",
            ) from None
    return recipients


def write_export(run, folder: Path, base_model_folder: Path, recipients: list | None) -> None:
    """The run's weights as an export in `folder` (a staging folder, renamed into place after)."""
    run.save(folder, with_optimizer=False)
    (folder / STATE_FILE).unlink()  # Bios's own record: an export is for other tools
    if (folder / FULL_WEIGHTS_FILE).exists():
        shutil.copy2(base_model_folder / "config.json", folder / "config.json")
    if recipients is not None:
        import pyrage

        for file in sorted(folder.iterdir()):
            pyrage.encrypt_file(str(file), str(file) + AGE_SUFFIX, recipients)
            file.unlink()


router = APIRouter()


@router.post("/save_weights_external")
def save_weights_external(body: SaveWeightsExternalBody, state: State, tenant: Tenant) -> dict:
    """Queue an export. Its request is checked in its `seq_id` turn (so a refused one still
    takes its turn and the run's later requests do not wait for it)."""
    row = state.live_run(body.model_id, tenant)
    release = state.reserve_checkpoint(
        tenant, state.checkpoint_estimate(body.model_id, "sampler_weights")
    )
    request_id = new_request_id()
    base_model_folder = state.engine.worker(row["base_model"]).loaded.path

    def action() -> Future:
        path = CheckpointPath(body.model_id, EXTERNAL_KIND, check_name(body.path, "path"))
        ttl = check_ttl(body.ttl_seconds)
        recipients = age_recipients(body.age_encryption_recipients)
        folder = path.folder(state.engine.home)
        if folder.exists():
            raise InvalidInputError("path", f"{path.uri('tinker://')} already exists")
        run = state.engine.run(body.model_id)

        def export() -> None:
            if folder.exists():  # made by a request queued before this one
                raise InvalidInputError("path", f"{path.uri('tinker://')} already exists")
            with atomic_folder(folder) as staging:
                write_export(run, staging, Path(base_model_folder), recipients)

        future = state.engine.worker_of(body.model_id).submit(export, lane=body.model_id)
        return then(future, lambda _: recorded(state, path, tenant, request_id, ttl))

    return sequenced(
        state,
        body.model_id,
        body.seq_id,
        "save_weights_external",
        tenant,
        action,
        request_id,
        on_done=release,
    )


def recorded(
    state: ServerState, path: CheckpointPath, tenant, request_id: str, ttl: int | None
) -> dict:
    """Record the export, and its request as done, in one transaction."""
    folder = path.folder(state.engine.home)
    size = sum(file.stat().st_size for file in folder.iterdir())
    state.store.add_checkpoint(
        path.run_id,
        path.kind,
        path.name,
        tenant,
        size,
        request=(request_id, path.run_id, "save_weights_external"),
        ttl_seconds=ttl,
    )
    return {"path": path.uri("tinker://"), "size_bytes": size, "type": "save_weights_external"}


@router.get("/training_runs/{run_id}/checkpoints/{kind}/{name}/external_weights_urls")
def external_weights_urls(
    run_id: str,
    kind: str,
    name: str,
    request: Request,
    state: State,
    secret: UrlSecret,
    tenant: Tenant,
) -> dict:
    if kind != EXTERNAL_KIND:
        raise InvalidInputError(
            "checkpoint_id",
            f"expected {EXTERNAL_KIND}/<name> (an export made by save_weights_external), "
            f"got {kind}/{name}",
        )
    readable(state, run_id, kind, name, tenant)
    folder = CheckpointPath(run_id, kind, name).folder(state.engine.home)
    expires = int(time.time()) + URL_LIFETIME_SECONDS
    urls = {}
    for file in sorted(folder.iterdir()):
        token = sign(secret, run_id, FILE_KIND, f"{name}/{file.name}", expires)
        url = request.url_for("download_external_file", run_id=run_id, name=name, file=file.name)
        urls[file.name] = f"{url}?expires={expires}&signature={token}"
    return {"urls": urls, "expires": iso(expires)}


# No tenant: the SDK fetches these URLs without its API key; the signature is the key.
@router.get("/external_files/{run_id}/{name}/{file}", name="download_external_file")
def download_external_file(
    run_id: str,
    name: str,
    file: str,
    expires: int,
    signature: str,
    state: State,
    secret: UrlSecret,
) -> FileResponse:
    expected = sign(secret, run_id, FILE_KIND, f"{name}/{file}", expires).encode()
    if expires < time.time() or not hmac.compare_digest(signature.encode(), expected):
        raise NotFoundError("signature: the download link is invalid or expired")
    if state.store.checkpoint(run_id, EXTERNAL_KIND, name) is None:
        raise NotFoundError(f"checkpoint_id: no checkpoint {EXTERNAL_KIND}/{name}")
    folder = CheckpointPath(run_id, EXTERNAL_KIND, name).folder(state.engine.home)
    target = folder / file
    if target.parent != folder or not target.is_file():
        raise NotFoundError(f"file: no file {file!r} in {EXTERNAL_KIND}/{name}")
    return FileResponse(target, media_type="application/octet-stream")
