"""Checkpoint lifetimes: time-to-live bounds, which expired checkpoints are kept, and the sweep
that deletes the others.

As in Tinker, a checkpoint saved with `ttl_seconds` (or given one with `PUT .../ttl`) expires
that many seconds later; `ttl_seconds` is 1 hour to 10 years, or None for never. An expired
checkpoint is deleted, its row first and then its folder, by the sweep `bios serve` runs every
`SWEEP_SECONDS` and before any listing or checkpoint lookup. One is kept though expired:

    the newest training-state (`weights/`) checkpoint of a run that is still live,

because that is what the run resumes from (after a restart, or an `unload_model`). A run is live
while its session is open (or, without a session, for ever), and is not a `copy_weights` copy,
which is never trained. The kept checkpoint goes at the first sweep after its run's session
finishes or a newer training checkpoint of the run is saved. An explicit `DELETE` removes any
checkpoint at once: that is how a user asks for one a run still needs to go.
"""

from __future__ import annotations

import time
from pathlib import Path

from bios.checkpoints.paths import CheckpointPath
from bios.errors import InvalidInputError
from bios.fsutil import remove_folder
from bios.server.store import Store

MIN_TTL_SECONDS = 3600  # 1 hour, Tinker's bound
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600  # 10 years of 365 days
SWEEP_SECONDS = 60.0


def check_ttl(ttl_seconds: object, field: str = "ttl_seconds") -> int | None:
    """`ttl_seconds` if it is None or a whole number of seconds in [1 hour, 10 years]."""
    if ttl_seconds is None:
        return None
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int):
        raise InvalidInputError(field, f"expected a whole number of seconds, got {ttl_seconds!r}")
    if not MIN_TTL_SECONDS <= ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidInputError(
            field,
            f"{ttl_seconds:,} is outside [{MIN_TTL_SECONDS:,}, {MAX_TTL_SECONDS:,}] seconds "
            "(1 hour to 10 years); send null for a checkpoint that never expires",
        )
    return ttl_seconds


def run_is_live(store: Store, run_id: str) -> bool:
    """Whether the run may still train (and so resume): not a copy, its session not finished."""
    run = store.run(run_id)
    if run is None or run["copied_from"] is not None:
        return False
    session = store.session(run["session_id"]) if run["session_id"] else None
    return session is None or session["finished"] is None


def kept_though_expired(store: Store, row: dict) -> bool:
    """Whether an expired checkpoint is kept: the newest training state of a live run."""
    if row["kind"] != "weights":
        return False
    latest = store.latest_checkpoint(row["run_id"], "weights")
    return (
        latest is not None and latest["name"] == row["name"] and run_is_live(store, row["run_id"])
    )


def is_expired(store: Store, row: dict, now: float | None = None) -> bool:
    """Whether the sweep deletes this checkpoint (past its expiry and not kept)."""
    now = time.time() if now is None else now
    return (
        row["expires"] is not None and row["expires"] <= now and not kept_though_expired(store, row)
    )


def sweep(store: Store, home: Path, now: float | None = None) -> list[str]:
    """Delete every expired checkpoint that is not kept; answers their `bios://` paths.

    The row goes only if it is still the one found expired (a save that replaced it since has
    its own expiry), and before the folder: a crash in between leaves an unlisted folder, which
    start-up removes, never a listed checkpoint without files."""
    now = time.time() if now is None else now
    deleted = []
    for row in store.expired_checkpoints(now):
        if kept_though_expired(store, row):
            continue
        if not store.delete_checkpoint_if(row["run_id"], row["kind"], row["name"], row["created"]):
            continue
        path = CheckpointPath(row["run_id"], row["kind"], row["name"])
        folder = path.folder(home)
        if folder.exists():
            remove_folder(folder)
        deleted.append(path.uri())
    return deleted
