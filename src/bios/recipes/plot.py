"""`bios plot RUN`: the curves of a run's metrics.jsonl as one PNG (matplotlib, no display)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from bios.diagnostics import read_metrics

# (panel title, metrics drawn on it); a panel appears when the run logged one of its metrics.
PANELS = (
    ("loss", ("train_loss", "eval_loss")),
    ("reward", ("reward_mean", "eval_reward")),
    ("KL (nats/token)", ("kl", "teacher_kl", "eval_teacher_kl")),
    ("preference margin", ("reward_margin", "eval_reward_margin")),
    ("learning rate", ("learning_rate",)),
)


def curves(records: list[dict]) -> list[tuple[str, dict[str, tuple[list[int], list[float]]]]]:
    """Per panel, the (steps, values) of each metric present, finite values only."""
    panels = []
    for title, keys in PANELS:
        lines = {}
        for key in keys:
            points = [
                (r["step"], float(r[key]))
                for r in records
                if isinstance(r.get(key), int | float) and math.isfinite(r[key])
            ]
            if points:
                lines[key] = ([s for s, _ in points], [v for _, v in points])
        if lines:
            panels.append((title, lines))
    return panels


def plot_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Write the run's curves to `out` (default: RUN/curves.png) and return its path."""
    from matplotlib.figure import Figure  # Agg rendering, no pyplot state or display

    folder = Path(run)
    records = read_metrics(folder)
    panels = curves(records)
    if not panels:
        raise ValueError(f"{folder}: no metrics to plot yet")
    figure = Figure(figsize=(8, 2.4 * len(panels)), layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for key, (steps, values) in lines.items():
            ax.plot(steps, values, label=key, marker="o" if len(steps) < 30 else None, markersize=3)
        if title == "loss" and all(v > 0 for _, vs in lines.values() for v in vs):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    figure.suptitle(folder.name)
    target = (
        Path(out)
        if out is not None
        else (folder if folder.is_dir() else folder.parent) / "curves.png"
    )
    figure.savefig(target, dpi=100)
    return target
