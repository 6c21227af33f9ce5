"""A `bios serve` process's settings: where it keeps its state, who may call it, and its limits
(each limit a `bios serve` flag; docs/operations.md lists them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServerConfig:
    home: Path
    models: list[str] = field(default_factory=list)  # empty: any model the machine has
    auth: bool = False  # require API keys (`bios serve` turns it on beyond loopback)
    max_runs_per_tenant: int = 64  # runs held in memory at once
    max_checkpoint_bytes_per_tenant: int = 100 * 2**30
    poll_seconds: float = 20.0
    # Keep a forward's graph for the backward that follows (custom losses at built-in cost).
    keep_graphs: bool = True
    # Limits on what one request can name (docs/operations.md, "Limits"); each a `bios serve`
    # flag. The body limit holds for the bytes read and for the bytes a zstd body unpacks to.
    max_body_bytes: int = 256 * 1024 * 1024
    max_samples_per_request: int = 256  # `num_samples` of one asample
    max_tokens_per_request: int = 1024 * 1024  # a forward(_backward)'s tokens; prompt + samples
    max_lora_rank: int = 1024
    # Folders models may be loaded from by path when `models` is empty; None: any folder (an
    # embedded server in a test); `bios serve` passes its `--model-dir` list, empty by default.
    model_dirs: list[Path] | None = None
    max_samplers_per_tenant: int = 64  # sampling sessions (snapshots included) held at once
    sampler_idle_seconds: float = 3600.0  # a sampler unused this long is freed (0: never)
    # An unnamed snapshot of a run is freed when a newer one of the same run is made and it has
    # not been sampled from for this long (in-flight samples count as use).
    snapshot_replaced_idle_seconds: float = 60.0
