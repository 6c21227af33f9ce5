"""A checkpoint folder as a tar archive, streamed: no more than one chunk is held at a time."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

CHUNK = 1 << 20
BLOCK = tarfile.BLOCKSIZE  # 512: members are padded to it; two zero blocks end the archive


def tar_chunks(folder: Path) -> Iterator[bytes]:
    """The files of `folder` (not its subfolders), in name order, as a POSIX tar."""
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        info = tarfile.TarInfo(file.name)
        stat = file.stat()
        info.size, info.mtime, info.mode = stat.st_size, int(stat.st_mtime), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(file, "rb") as handle:
            while chunk := handle.read(CHUNK):
                yield chunk
        if info.size % BLOCK:
            yield b"\0" * (BLOCK - info.size % BLOCK)
    yield b"\0" * (2 * BLOCK)
