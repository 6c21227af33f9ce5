"""Crash-safe folders: build in a temporary folder beside the target, fsync, rename into place.

A reader (or a process restarted after `kill -9`) sees either the old folder or the complete new
one, never a half-written one under the real name. Staging folders are named `.<name>.tmp-*`.

Replacing a folder takes two renames (the old one aside, the new one in). A caller that records
folders elsewhere (the server's database) passes `keep_previous=<token>`: the old folder is then
renamed to `.<name>.old-<token>` and kept until the caller has recorded the new one and calls
`remove_previous`, so a crash at any instant leaves a complete copy that start-up can recover.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush the files of `folder` and the folder itself, so a power cut leaves no empty files."""
    for entry in [*folder.iterdir(), folder]:
        fsync_path(entry)


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"


def previous_name(target: Path, token: str) -> Path:
    """Where `atomic_folder(target, keep_previous=token)` keeps the folder it replaced."""
    return target.parent / f".{target.name}.old-{token}"


def remove_previous(target: Path, token: str) -> None:
    """Delete the folder that a `keep_previous=token` replacement of `target` kept, if any."""
    shutil.rmtree(previous_name(target, token), ignore_errors=True)


def remove_folder(path: Path) -> None:
    """Rename out of the way before deleting, so no reader sees a half-deleted folder."""
    trash = _aside(path)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def remove_stale_staging(target: Path) -> None:
    """Delete staging folders a crashed writer of `target` left behind (call under a lock)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextmanager
def atomic_folder(target: Path, keep_previous: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces `target` atomically.

    If the block raises, the staging folder is removed and `target` is left as it was. With
    `keep_previous`, a replaced `target` is kept at `previous_name(target, keep_previous)` (the
    caller removes it with `remove_previous` once the new folder is recorded); if the second
    rename fails, the old folder is put back.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _aside(target)
    staging.mkdir()
    previous = None
    try:
        yield staging
        fsync_tree(staging)
        if target.exists():
            previous = previous_name(target, keep_previous) if keep_previous else _aside(target)
            os.replace(target, previous)
            fsync_path(target.parent)
        try:
            os.replace(staging, target)
        except BaseException:
            if previous is not None and not target.exists():
                os.replace(previous, target)  # the old copy stays the real one
                previous = None
            raise
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None and keep_previous is None:
        shutil.rmtree(previous, ignore_errors=True)
