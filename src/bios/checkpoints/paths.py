"""Checkpoint paths: parsing, validation, and where they live on disk.

`bios://<run_id>/weights/<name>` is a training state (weights and optimizer);
`bios://<run_id>/sampler_weights/<name>` holds weights only. `tinker://` is accepted as a synonym.
A third kind, `external_weights/<name>`, is an export for use outside Bios (`bios serve`'s
`save_weights_external`): listed, downloaded and deleted like the others, never loaded.
On disk all are folders under `<home>/runs/<run_id>/<kind>/<name>/`, written with
`bios.fsutil.atomic_folder` so a crash never leaves a half-written checkpoint under a real name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from bios.errors import InvalidInputError, NotFoundError

KINDS = ("weights", "sampler_weights")  # the kinds a run can load or sample from
EXTERNAL_KIND = "external_weights"
ALL_KINDS = (*KINDS, EXTERNAL_KIND)
SCHEMES = ("bios://", "tinker://")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, field: str = "name") -> str:
    """Checkpoint and run names: 1-128 of letters, digits, `.`, `_`, `-`; no `..`."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidInputError(
            field,
            f"expected 1-128 characters of letters, digits, '.', '_' or '-' (not starting with "
            f"a symbol, no '..'), got {name!r}",
        )
    return name


_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def check_run_id(run_id: str, field: str = "model_id") -> str:
    """Run ids: like names, plus `:` (Tinker's ids look like `<session>:train:0`)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise InvalidInputError(
            field, f"expected 1-128 letters, digits, '.', '_', '-' or ':', got {run_id!r}"
        )
    return run_id


@dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: str  # "weights" | "sampler_weights"
    name: str

    def uri(self, scheme: str = "bios://") -> str:
        return f"{scheme}{self.run_id}/{self.kind}/{self.name}"

    def folder(self, home: Path) -> Path:
        return home / "runs" / self.run_id / self.kind / self.name

    @classmethod
    def parse(cls, path: str, field: str = "path") -> CheckpointPath:
        """Parse `bios://run/weights/name` (or `tinker://…`); errors name the expected form."""
        expected = (
            "expected bios://<run_id>/weights/<name> or bios://<run_id>/sampler_weights/<name>"
        )
        if not isinstance(path, str):
            raise InvalidInputError(field, f"{expected}, got {path!r}")
        scheme = next((s for s in SCHEMES if path.startswith(s)), None)
        parts = path[len(scheme) :].split("/") if scheme else []
        if len(parts) != 3 or parts[1] not in KINDS:
            raise InvalidInputError(field, f"{expected}, got {path!r}")
        run_id, kind, name = parts
        check_run_id(run_id, field)
        check_name(name, field)
        return cls(run_id, kind, name)


def checkpoint_folder(home: Path, path: str, field: str = "path") -> Path:
    """The folder of an existing checkpoint given its URI."""
    folder = CheckpointPath.parse(path, field).folder(home)
    if not folder.is_dir():
        raise NotFoundError(f"{field}: no checkpoint at {path}")
    return folder
