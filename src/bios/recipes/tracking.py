"""Where a step's metrics go: `metrics.jsonl`, the health check, the progress line, and
optionally TensorBoard and wandb (offline).

`Tracker.log(record)` is called once per step by every recipe. The health check
(`bios.diagnostics.HealthMonitor`) reads the same stream and its findings are printed as they
appear; on resume it is first fed the records kept from before, silently.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from bios.diagnostics import HealthMonitor
from bios.recipes.progress import StepProgress
from bios.recipes.run_folder import RunFolder

Sink = Callable[[int, dict[str, float]], None]


class Tracker:
    def __init__(
        self,
        folder: RunFolder,
        recipe: str,
        total_steps: int,
        start_step: int = 0,
        history: list[dict[str, Any]] | None = None,
        progress: bool = True,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.folder = folder
        self.monitor = HealthMonitor()
        for record in history or []:
            self.monitor.feed(record)
        self.sinks = sinks or []
        self.progress = StepProgress(recipe, total_steps, start_step, progress)
        self.started = time.monotonic()
        self._last = self.started

    def note(self, text: str) -> None:
        self.progress.note(text)

    def log(self, step: int, metrics: dict[str, Any], tokens: int | None = None) -> dict[str, Any]:
        """Record one step: `tokens` processed since the last call give `tokens_per_s`."""
        now = time.monotonic()
        record: dict[str, Any] = {"step": step, **metrics}
        if tokens is not None:
            record["tokens"] = tokens
            record["tokens_per_s"] = tokens / max(now - self._last, 1e-9)
        record["elapsed_s"] = round(now - self.started, 3)
        self._last = now
        self.folder.append_metrics(record)
        for finding in self.monitor.feed(record):
            self.note(f"health check: {finding}")
        numbers = {k: float(v) for k, v in record.items() if isinstance(v, int | float)}
        for sink in self.sinks:
            sink(step, numbers)
        self.progress.update(step, record)
        return record

    def close(self) -> None:
        self.progress.close()


MISSING = {
    "tensorboard": "tensorboard logging needs the tensorboard package: "
    "pip install 'bios[tensorboard]' (or pip install tensorboard)",
    "wandb": "wandb logging needs the wandb package: pip install 'bios[wandb]' (or pip install "
    "wandb); runs are logged offline, and `wandb sync` uploads them",
}


def require_packages(tensorboard: bool, wandb: bool) -> None:
    """ImportError with what to install, before a run starts, if a requested logger's package is
    missing."""
    import importlib.util

    for name, wanted in (("tensorboard", tensorboard), ("wandb", wandb)):
        if wanted and importlib.util.find_spec(name) is None:
            raise ImportError(MISSING[name])


def open_sinks(
    folder: RunFolder, config: dict[str, Any], tensorboard: bool, wandb: bool
) -> list[Sink]:
    """TensorBoard (event files in the run folder) and wandb (offline mode, in the run folder)
    writers, when asked for. Each needs its package: a clear error says which to install."""
    sinks: list[Sink] = []
    if tensorboard:
        require_packages(tensorboard=True, wandb=False)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(folder.path / "tensorboard"))

        def to_tensorboard(step: int, values: dict[str, float]) -> None:
            for key, value in values.items():
                if key != "step":
                    writer.add_scalar(key, value, step)
            writer.flush()

        sinks.append(to_tensorboard)
    if wandb:
        require_packages(tensorboard=False, wandb=True)
        import wandb as wandb_module

        run = wandb_module.init(
            mode="offline",
            dir=str(folder.path),
            project="bios",
            name=folder.path.name,
            config=config,
        )
        sinks.append(lambda step, values: run.log(values, step=step))
    return sinks
