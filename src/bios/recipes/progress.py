"""The progress line of a recipe: a rich progress bar (steps, elapsed, ETA, loss, tokens/s) on a
terminal, and a plain line every ~5% of the run when the output is a file or a pipe."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

# (metric, label, format) shown after the bar, in this order, when the record has them.
SHOWN = (
    ("train_loss", "loss", "{:.4f}"),
    ("eval_loss", "eval", "{:.4f}"),
    ("reward_mean", "reward", "{:.3f}"),
    ("eval_reward", "eval reward", "{:.3f}"),
    ("teacher_kl", "kl→teacher", "{:.4f}"),
    ("eval_teacher_kl", "eval kl→teacher", "{:.4f}"),
    ("kl", "kl", "{:.4f}"),
    ("reward_margin", "margin", "{:.3f}"),
    ("accuracy", "acc", "{:.2f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
)


def summary(record: dict[str, Any]) -> str:
    return " · ".join(
        f"{label} {fmt.format(record[key])}" for key, label, fmt in SHOWN if key in record
    )


class StepProgress:
    def __init__(self, recipe: str, total: int, start: int, enabled: bool = True) -> None:
        self.console = Console(highlight=False)
        self.recipe, self.total, self.start = recipe, total, start
        self.enabled = enabled
        self.every = max(1, total // 20)
        self.started = time.monotonic()
        self.latest: dict[str, Any] = {}
        self.bar: Progress | None = None
        if enabled and self.console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self.console,
            )
            self.task = self.bar.add_task(recipe, total=total, completed=start, stats="")
            self.bar.start()

    def note(self, text: str) -> None:
        """A line of text above the bar (or on its own line)."""
        if self.enabled:
            self.console.print(text, markup=False, soft_wrap=True)

    def update(self, step: int, record: dict[str, Any]) -> None:
        self.latest.update(record)  # an eval from a few steps ago stays on show
        stats = summary(self.latest)
        if self.bar is not None:
            self.bar.update(self.task, completed=step, stats=stats)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            done = step - self.start
            elapsed = time.monotonic() - self.started
            eta = elapsed / done * (self.total - step) if done > 0 else 0.0
            self.console.print(
                f"{self.recipe} step {step}/{self.total} · {stats or '-'} · eta {_duration(eta)}",
                markup=False,
                soft_wrap=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"
