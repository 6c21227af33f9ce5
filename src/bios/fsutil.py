"""Crash-safe folders: build in a temporary folder beside the target, fsync, rename into place.

A reader (or a process restarted after `kill -9`) sees either the old folder or the complete new
one, never a half-written one under the real name. Staging folders are named `.<name>.tmp-*`.
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
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder; when the block succeeds it replaces `target` atomically.

    If the block raises, the staging folder is removed and `target` is left as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _aside(target)
    staging.mkdir()
    try:
        yield staging
        fsync_tree(staging)
        previous = None
        if target.exists():
            previous = _aside(target)
            os.replace(target, previous)
        os.replace(staging, target)
        fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
