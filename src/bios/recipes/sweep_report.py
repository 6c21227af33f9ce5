"""A sweep's results and their report: `sweep.csv`, the markdown table `sweep.md`, the plot
`sweep.png`, and the cells of the terminal table `bios sweep` prints.

`sweep.py` plans and runs a sweep; this module only reads and writes what it found.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FILES = ("sweep.csv", "sweep.md", "sweep.png")
CSV_COLUMNS = (
    "setting",
    "value",
    "multiplier",
    "learning_rate",
    "rank",
    "batch_size",
    "steps",
    "final_train_loss",
    "final_eval_loss",
    "ratio_to_best",
    "best",
    "default",
    "run",
    "result_eval_loss",
    "result_step",
)


@dataclass(frozen=True)
class SweepRow:
    value: float
    multiplier: float | None
    learning_rate: float
    rank: int | None
    batch_size: int
    steps: int
    final_train_loss: float
    final_eval_loss: float
    ratio_to_best: float  # final eval loss / the lowest final eval loss of the sweep
    best: bool
    default: bool  # the value `bios sft` would have chosen
    run: str  # the run folder
    eval_curve: tuple[tuple[int, float], ...]  # (step, eval loss) of every evaluation
    # The run's result: the checkpoint `bios sft` kept (lowest eval loss), and its step.
    result_eval_loss: float = math.nan
    result_step: int | None = None


@dataclass(frozen=True)
class SweepResult:
    setting: str
    default_value: float
    rows: list[SweepRow]
    out: Path
    notes: list[str]

    @property
    def best(self) -> SweepRow:
        return next(row for row in self.rows if row.best)


def write_csv(result: SweepResult, path: Path) -> None:
    """One line per value; floats as Python writes them (repr), so they read back exactly."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_COLUMNS)
        for row in result.rows:
            writer.writerow(
                [
                    result.setting,
                    row.value,
                    "" if row.multiplier is None else row.multiplier,
                    row.learning_rate,
                    "" if row.rank is None else row.rank,
                    row.batch_size,
                    row.steps,
                    row.final_train_loss,
                    row.final_eval_loss,
                    row.ratio_to_best,
                    int(row.best),
                    int(row.default),
                    row.run,
                    row.result_eval_loss,
                    "" if row.result_step is None else row.result_step,
                ]
            )


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """sweep.csv back as dicts of numbers (and the run folder)."""
    rows = []
    with open(path, newline="", encoding="utf-8") as file:
        for raw in csv.DictReader(file):
            row: dict[str, Any] = {"setting": raw["setting"], "run": raw["run"]}
            for key in ("value", "learning_rate", "final_train_loss", "final_eval_loss"):
                row[key] = float(raw[key])
            row["ratio_to_best"] = float(raw["ratio_to_best"])
            row["multiplier"] = float(raw["multiplier"]) if raw["multiplier"] else None
            row["rank"] = int(raw["rank"]) if raw["rank"] else None
            for key in ("batch_size", "steps"):
                row[key] = int(raw[key])
            row["best"], row["default"] = raw["best"] == "1", raw["default"] == "1"
            row["result_eval_loss"] = float(raw["result_eval_loss"])
            row["result_step"] = int(raw["result_step"]) if raw["result_step"] else None
            rows.append(row)
    return rows


def value_text(setting: str, value: float) -> str:
    return f"{value:.3g}" if setting == "lr" else f"{value:g}"


def table_rows(result: SweepResult) -> list[list[str]]:
    """The cells of the markdown and terminal tables."""
    rows = []
    for row in result.rows:
        marks = [m for m, on in (("best", row.best), ("default", row.default)) if on]
        rows.append(
            [
                value_text(result.setting, row.value),
                "" if row.multiplier is None else f"×{row.multiplier:.3g}",
                f"{row.learning_rate:.3g}",
                "" if row.rank is None else str(row.rank),
                str(row.batch_size),
                str(row.steps),
                f"{row.final_train_loss:.5f}",
                f"{row.final_eval_loss:.5f}",
                f"{row.ratio_to_best:.4f}",
                _kept(row),
                " ".join(f"**{m}**" for m in marks),
            ]
        )
    return rows


def _kept(row: SweepRow) -> str:
    if row.result_step is None or not math.isfinite(row.result_eval_loss):
        return ""
    return f"{row.result_eval_loss:.5f} ({row.result_step})"


TABLE_HEAD = [
    "value",
    "× default",
    "LR",
    "rank",
    "batch",
    "steps",
    "final train loss",
    "final eval loss",
    "ratio to best",
    "kept eval loss (step)",
    "",
]


def write_markdown(result: SweepResult, path: Path) -> None:
    best = result.best
    setting = result.setting
    lines = [
        f"# Sweep of {result.setting}",
        "",
        f"Default ({setting} chosen by `bios sft`): "
        f"{value_text(setting, result.default_value)}. Best final eval loss: "
        f"{best.final_eval_loss:.5f} at {setting} = {value_text(setting, best.value)}.",
        "",
        "| " + " | ".join(TABLE_HEAD) + " |",
        "|" + "|".join("---" for _ in TABLE_HEAD) + "|",
        *("| " + " | ".join(cells) + " |" for cells in table_rows(result)),
        "",
        *(f"- {note}" for note in result.notes),
    ]
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")


def plot_sweep(result: SweepResult, path: Path) -> None:
    """Final eval loss against the value (log x), and each variation's eval-loss curve."""
    from matplotlib.figure import Figure  # Agg rendering, no pyplot state or display

    curves = [row for row in result.rows if len(row.eval_curve) > 1]
    figure = Figure(figsize=(11 if curves else 6, 4), layout="constrained")
    axes = figure.subplots(1, 2 if curves else 1, squeeze=False)[0]
    ax = axes[0]
    xs = [row.value for row in result.rows]
    ax.plot(xs, [row.final_eval_loss for row in result.rows], marker="o", color="C0")
    best = result.best
    ax.plot([best.value], [best.final_eval_loss], marker="*", markersize=16, color="C3", ls="")
    ax.axvline(result.default_value, color="grey", ls="--", lw=1, label="default")
    ax.set_xscale("log")
    # The swept values themselves as ticks: log-scale defaults label powers of ten only.
    ax.set_xticks(xs, [value_text(result.setting, x) for x in xs], rotation=30, fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(result.setting)
    ax.set_ylabel("final eval loss (per token)")
    ax.set_title(f"best {result.setting} = {value_text(result.setting, best.value)}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if curves:
        for row in curves:
            steps, losses = zip(*row.eval_curve, strict=True)
            label = f"{result.setting} {value_text(result.setting, row.value)}"
            ax2 = axes[1]
            ax2.plot(steps, losses, marker="o", markersize=3, label=label, lw=2 if row.best else 1)
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("eval loss")
        axes[1].set_title("eval loss during training", fontsize=10)
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8)
    figure.suptitle(f"sweep of {result.setting}: final eval loss")
    figure.savefig(path, dpi=100)
