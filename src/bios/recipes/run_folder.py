"""A recipe's run folder: `<runs_dir>/<name>/` with what a run leaves behind.

    config.json         the resolved configuration (every setting, including the ones Bios chose)
    metrics.jsonl       one JSON object per step (`bios.diagnostics` and `bios plot` read it)
    checkpoints.jsonl   one line per saved state: {"step", "path", "final"} and, when there
                        was an eval at that step, "eval_loss"; `path` is the bios:// training
                        state (weights and optimizer) to resume or export from. One line has
                        "best": true and "why": the run's result (the lowest eval loss, or the
                        final checkpoint of a run without eval data), which `checkpoint_path`
                        of a run folder — `bios sample RUN`, `bios export RUN`, `--init-from
                        RUN`, DPO's default reference — resolves to

The checkpoints themselves live where the engine keeps them (`$BIOS_HOME/runs/<run_id>/`, or the
server's home); the folder records their paths.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from bios.diagnostics import read_metrics

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_FILE = "checkpoints.jsonl"
CHECKPOINT_SCHEMES = ("bios://", "tinker://")


class RunFolder:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @classmethod
    def prepare(cls, runs_dir: str, name: str | None, recipe: str, resume: bool) -> RunFolder:
        """The folder of a new run, or of the run to resume (created by `write_config`). A new run
        never reuses a folder that holds a run already."""
        if name is None:  # dated, with a suffix if another run started in the same second
            stamp = f"{recipe}-{time.strftime('%Y%m%d-%H%M%S')}"
            name = next(
                n
                for n in (stamp, *(f"{stamp}-{i}" for i in range(2, 1000)))
                if not (Path(runs_dir) / n).exists()
            )
        folder = cls(Path(runs_dir) / name)
        if folder.saved_config() is not None and not resume:
            raise FileExistsError(
                f"{folder.path} holds a run already: resume it (resume=True, --resume) or "
                "choose another name"
            )
        if (folder.path / CONFIG_FILE).exists() and folder.saved_config() is None:
            raise FileExistsError(f"{folder.path} holds a config.json that is not a run's")
        return folder

    # ---- configuration ----------------------------------------------------------------------

    def saved_config(self) -> dict[str, Any] | None:
        """The run's config.json; None when the folder holds no run (a model folder's
        config.json, which has no "recipe", is not a run's)."""
        file = self.path / CONFIG_FILE
        if not file.is_file():
            return None
        try:
            values = json.loads(file.read_text())
        except json.JSONDecodeError:
            return None
        return values if isinstance(values, dict) and "recipe" in values else None

    def write_config(self, values: dict[str, Any]) -> None:
        """Write config.json, creating the folder: the run exists from here on."""
        self.path.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.path / CONFIG_FILE, json.dumps(values, indent=2) + "\n")

    # ---- metrics ----------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / METRICS_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        file = self.path / METRICS_FILE
        return read_metrics(file) if file.is_file() else []

    def keep_metrics_until(self, step: int) -> list[dict[str, Any]]:
        """Drop the records after `step` (a resumed run redoes those steps); return the rest."""
        kept = [r for r in self.metrics() if r.get("step", 0) <= step]
        _write_atomic(self.path / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in kept))
        return kept

    # ---- checkpoints ------------------------------------------------------------------------

    def add_checkpoint(
        self, step: int, path: str, final: bool = False, eval_loss: float | None = None
    ) -> None:
        row: dict[str, Any] = {"step": step, "path": path, "final": final}
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        with open(self.path / CHECKPOINTS_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(row) + "\n")

    def checkpoints(self) -> list[dict[str, Any]]:
        file = self.path / CHECKPOINTS_FILE
        if not file.is_file():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def last_checkpoint(self) -> dict[str, Any] | None:
        saved = self.checkpoints()
        return max(saved, key=lambda c: c["step"]) if saved else None

    def mark_best(self, path: str, why: str) -> None:
        """Make the checkpoint saved at `path` the run's result ("best": true, with `why`) and
        every other line not. Rewrites checkpoints.jsonl atomically, keeping any other field a
        line holds."""
        rows = self.checkpoints()
        if not any(row["path"] == path for row in rows):
            raise ValueError(f"{self.path / CHECKPOINTS_FILE}: no checkpoint {path}")
        for row in rows:
            row.pop("why", None)
            row["best"] = row["path"] == path
            if row["best"]:
                row["why"] = why
        _write_atomic(self.path / CHECKPOINTS_FILE, "".join(json.dumps(r) + "\n" for r in rows))

    def best_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint marked as the run's result; None when none is marked."""
        return next((row for row in self.checkpoints() if row.get("best")), None)

    def result_checkpoint(self) -> dict[str, Any] | None:
        """The run's result: the checkpoint marked best, else (a run from before the mark, or
        still before its first eval) the last one."""
        return self.best_checkpoint() or self.last_checkpoint()


def checkpoint_path(reference: str | os.PathLike[str]) -> str:
    """A bios:// path, given as one (or tinker://) or as a run folder (its result: the
    checkpoint marked best in checkpoints.jsonl, else its last)."""
    text = os.fspath(reference)
    if text.startswith(CHECKPOINT_SCHEMES):
        return text
    folder = RunFolder(text)
    if folder.saved_config() is None:
        raise ValueError(f"{text}: neither a bios:// checkpoint path nor a run folder")
    result = folder.result_checkpoint()
    if result is None:
        raise ValueError(f"{text}: the run saved no checkpoint yet")
    return result["path"]


def checkpoint_folder_of(reference: str | os.PathLike[str], home: Path | None = None) -> Path:
    """The local folder of a checkpoint: given as that folder, a bios:// path (under `home`,
    default $BIOS_HOME) or a run folder (its result checkpoint)."""
    from bios.checkpoints.layout import is_checkpoint
    from bios.checkpoints.paths import checkpoint_folder
    from bios.models.loading import bios_home

    if is_checkpoint(Path(reference)):
        return Path(reference)
    return checkpoint_folder(home or bios_home(), checkpoint_path(reference))


def list_runs(runs_dir: str | os.PathLike[str]) -> list[RunFolder]:
    """The run folders directly inside `runs_dir`, oldest first."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    folders = [RunFolder(p) for p in root.iterdir() if RunFolder(p).saved_config() is not None]
    return sorted(folders, key=lambda f: (f.path / CONFIG_FILE).stat().st_mtime)


def _write_atomic(file: Path, text: str) -> None:
    staging = file.with_name(file.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, file)
