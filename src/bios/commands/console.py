"""`bios console [RUNS_DIR]`: the web console, read-only, over local run folders.

What the recipes leave in each `RUNS_DIR/<name>/` (config.json, metrics.jsonl,
checkpoints.jsonl; `bios.recipes.run_folder`) is shown as `bios serve`'s console shows a
server's runs: the runs, each run's curves (`bios plot`'s, redrawn as metrics.jsonl grows) and
its checkpoints (size, time, download). Nothing can be changed from it, and it has no keys: it
listens on loopback unless told otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ACTIVE_SECONDS = 120.0  # a run whose metrics.jsonl changed this recently is shown as active


class FolderSource:
    """The console's source (bios.server.console.sources) over a runs folder."""

    read_only = True
    needs_key = False

    def __init__(self, runs_dir: Path, home: Path) -> None:
        self.runs_dir, self.home = runs_dir, home

    def tenant_of_key(self, key: str) -> str | None:
        return None

    def _folder(self, run_id: str):
        from bios.errors import NotFoundError
        from bios.recipes.run_folder import RunFolder

        folder = RunFolder(self.runs_dir / run_id)
        if "/" in run_id or run_id.startswith(".") or folder.saved_config() is None:
            raise NotFoundError(f"run: no run folder {run_id!r} in {self.runs_dir}")
        return folder

    def runs(self, tenant: str | None) -> list[dict[str, Any]]:
        from bios.recipes.run_folder import list_runs

        return [self._run_of(folder) for folder in reversed(list_runs(self.runs_dir))]

    def run(self, tenant: str | None, run_id: str) -> dict[str, Any]:
        return self._run_of(self._folder(run_id))

    def _run_of(self, folder) -> dict[str, Any]:
        config = folder.saved_config() or {}
        metrics = folder.metrics()
        checkpoints = folder.checkpoints()
        metrics_file = folder.path / "metrics.jsonl"
        created = (folder.path / "config.json").stat().st_mtime
        last = metrics_file.stat().st_mtime if metrics_file.exists() else created
        if any(c.get("final") for c in checkpoints):
            status, detail = "finished", "its final checkpoint is saved"
        elif time.time() - last <= ACTIVE_SECONDS:
            status, detail = "active", ""
        else:
            status, detail = "stopped", f"no metrics for {int(time.time() - last)} s"
        rank = config.get("rank")
        return {
            "id": folder.path.name,
            "base_model": config.get("model", ""),
            "training": f"LoRA rank {rank}" if rank else "full",
            "steps": max((int(r.get("step", 0)) for r in metrics), default=0),
            "tokens": sum(int(r.get("tokens", 0)) for r in metrics),
            "created": created,
            "last_activity": last,
            "status": status,
            "status_detail": detail,
            "metadata": {k: config[k] for k in ("recipe", "data") if config.get(k) is not None},
        }

    def curves(self, tenant: str | None, run_id: str, max_points: int) -> dict[str, Any]:
        """metrics.jsonl's records merged by step (an eval and a train record of one step are
        one point), numbers only."""
        from bios.server.console.sources import curves_of

        records = self._folder(run_id).metrics()
        by_step: dict[float, dict[str, float]] = {}
        for record in records:
            if "step" not in record:
                continue
            point = by_step.setdefault(float(record["step"]), {"step": float(record["step"])})
            for name, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    point[name] = float(value)
        points = [by_step[step] for step in sorted(by_step)]
        return curves_of(points, len(records), max_points)

    def checkpoints(self, tenant: str | None, run_id: str) -> list[dict[str, Any]]:
        from bios.checkpoints.paths import CheckpointPath

        found = []
        for row in reversed(self._folder(run_id).checkpoints()):
            try:
                path = CheckpointPath.parse(row["path"])
            except Exception:  # a line this version cannot read: not shown
                continue
            folder = path.folder(self.home)
            present = folder.is_dir()
            found.append(
                {
                    "kind": path.kind,
                    "name": path.name,
                    "path": row["path"] + ("" if present else "  (missing)"),
                    "size_bytes": sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
                    if present
                    else 0,
                    "created": folder.stat().st_mtime if present else None,
                    "expires": None,
                }
            )
        return found

    def checkpoint_folder(self, tenant: str | None, run_id: str, kind: str, name: str) -> Path:
        from bios.checkpoints.paths import CheckpointPath
        from bios.errors import NotFoundError

        for row in self._folder(run_id).checkpoints():
            try:
                path = CheckpointPath.parse(row["path"])
            except Exception:
                continue
            if (path.kind, path.name) == (kind, name) and path.folder(self.home).is_dir():
                return path.folder(self.home)
        raise NotFoundError(f"checkpoint: run {run_id!r} lists no checkpoint {kind}/{name}")


def create_app(runs_dir: Path, home: Path):
    """The console at /console (the root redirects there), as `bios serve` has it."""
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    from bios.server.console.app import create_app as console_app

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/", 307)

    app.mount("/console", console_app(FolderSource(runs_dir, home), title="Bios runs"))
    return app


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from bios.commands.serve import is_loopback
    from bios.models.loading import bios_home

    runs_dir = Path(args.runs_dir).resolve()
    if not runs_dir.is_dir():
        print(f"bios console: {runs_dir} is not a folder", file=sys.stderr)
        return 2
    home = Path(args.home) if args.home else bios_home()
    if not is_loopback(args.host):
        print(
            f"bios console: {args.host} is not loopback: anyone who reaches it sees these runs "
            "(the console has no keys)",
            file=sys.stderr,
        )
    print(f"bios console: {runs_dir} on http://{args.host}:{args.port}/console/ (read-only)")
    uvicorn.run(create_app(runs_dir, home), host=args.host, port=args.port, log_level="warning")
    return 0


def add(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "console",
        help="the web console, read-only, over local run folders (curves live, checkpoints)",
        description="Serve RUNS_DIR's runs (config.json, metrics.jsonl, checkpoints.jsonl) in a "
        "browser: the runs, each run's curves as they grow, its checkpoints to download.",
    )
    parser.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--home", help="the Bios home holding checkpoints [$BIOS_HOME]")
    parser.set_defaults(run=run)
