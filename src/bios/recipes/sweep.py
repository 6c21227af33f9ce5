"""Sweeps: one setting — learning rate, LoRA rank or batch size — varied around the SFT recipe's
defaults, everything else held fixed, compared by final eval loss.

    base        what `bios sft` would choose for this model and data (`resolve_sft`), with the
                settings the user gave kept as given
    values      lr: ×¼ ×½ ×1 ×2 ×4 the chosen LR; rank: 8 16 32 64 128; batch: ×½ ×1 ×2 the
                chosen batch; or explicit `values`, or `multipliers` of the chosen value
    each value  `sft.run` with that one setting given, exactly as `bios sft --<setting> VALUE`;
                every run goes to the same ServiceClient, so the base model is loaded once and
                the LoRA runs share it
    compared    by final eval loss; each row also gives the run's result, the checkpoint it kept
                (lowest eval loss; an early-stopped run's final eval is where it stopped)
    results     OUT/sweep.csv, OUT/sweep.md (a table), OUT/sweep.png (eval loss against the
                value, and the eval curves; `sweep_report.py`); the run folders are
                OUT/<setting>-<value>

A batch variation is what `bios sft --batch-size B` does: an LR the user left out becomes
get_lr × √(B/128), as `recommend` scales it, and steps the user left out are re-chosen for B
(about the same passes over the data), so each batch is compared at its own defaults.

Every value is checked, and every variation's settings resolved and checked, before the first run
starts: a bad value never leaves half a sweep behind.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bios.client.service import ServiceClient
from bios.hparams import REFERENCE_BATCH, stats_from_data
from bios.models.loading import load_tokenizer
from bios.recipes import sft
from bios.recipes.common import check
from bios.recipes.data import load_sft
from bios.recipes.run_folder import RunFolder
from bios.recipes.settings import resolve_sft
from bios.recipes.sweep_report import (
    FILES,
    SweepResult,
    SweepRow,
    plot_sweep,
    write_csv,
    write_markdown,
)

# The swept setting's name on the command line -> its SFTConfig field.
SETTINGS = {"lr": "learning_rate", "rank": "rank", "batch": "batch_size"}
DEFAULT_MULTIPLIERS = {"lr": (0.25, 0.5, 1.0, 2.0, 4.0), "batch": (0.5, 1.0, 2.0)}
DEFAULT_VALUES = {"rank": (8.0, 16.0, 32.0, 64.0, 128.0)}
INTEGER_SETTINGS = ("rank", "batch")


@dataclass
class SweepConfig:
    """A sweep: the SFT settings every variation shares, and the one setting that varies."""

    sft: sft.SFTConfig
    setting: str  # "lr", "rank" or "batch"
    values: list[float] | None = None  # explicit values of the setting
    multipliers: list[float] | None = None  # or factors on the value `bios sft` would choose
    out: str | None = None  # default: RUNS_DIR/sweep-<setting>-<date-time>


@dataclass(frozen=True)
class Variation:
    value: float  # of the swept setting
    multiplier: float | None  # value / the default value
    config: sft.SFTConfig  # what goes to `sft.run`: the user's settings plus this value
    resolved: sft.SFTConfig  # with everything else filled in, as `sft.run` will fill it


# ---- the values and the variations ------------------------------------------------------------


def parse_numbers(name: str, texts: list[str]) -> list[float]:
    """Numbers from command-line words, each a number or a comma-separated list of them."""
    numbers = []
    for text in texts:
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                numbers.append(float(part))
            except ValueError:
                raise ValueError(f"{name}: expected numbers, got {part.strip()!r}") from None
    return numbers


def check_sweep(config: SweepConfig) -> None:
    """Everything about a sweep that can be wrong without looking at the data, named."""
    if config.setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {', '.join(SETTINGS)}, got {config.setting!r}")
    if config.values is not None and config.multipliers is not None:
        raise ValueError("values, multipliers: give one of them, not both")
    for name in ("values", "multipliers"):
        numbers = getattr(config, name)
        if numbers is None:
            continue
        if len(numbers) == 0:
            raise ValueError(f"{name}: expected at least one number, got an empty list")
        bad = [x for x in numbers if not (math.isfinite(x) and x > 0)]
        if bad:
            raise ValueError(f"{name}: expected positive numbers, got {bad[0]:g}")
    if config.values is not None and config.setting in INTEGER_SETTINGS:
        field = SETTINGS[config.setting]
        bad = [x for x in config.values if not float(x).is_integer()]
        if bad:
            raise ValueError(f"values: {field} must be a positive integer, got {bad[0]:g}")
    base = config.sft
    if not base.eval_data:
        raise ValueError("eval_data: a sweep compares final eval loss, so --eval FILE is required")
    if base.resume:
        raise ValueError("resume: a sweep starts new runs; resume a variation with `bios sft`")
    if config.setting == "rank" and base.init_from:
        raise ValueError("rank: a run from --init-from keeps the rank of those weights")


def sweep_values(config: SweepConfig, default: float) -> list[tuple[float, float | None]]:
    """(value, value / default) pairs, ascending, without repeats. The values of an integer
    setting are rounded to the nearest integer (at least 1), so ×½ of batch 5 is 3."""
    if config.values is not None:
        pairs = [(float(v), float(v) / default) for v in config.values]
    else:
        factors = config.multipliers or DEFAULT_MULTIPLIERS.get(config.setting)
        if factors is None:
            pairs = [(v, v / default) for v in DEFAULT_VALUES[config.setting]]
        else:
            pairs = [(m * default, m) for m in factors]
    if config.setting in INTEGER_SETTINGS:
        rounded = [float(max(1, math.floor(v + 0.5))) for v, _ in pairs]
        pairs = [(v, v / default) for v in rounded]
    unique: dict[float, float | None] = {}
    for value, multiplier in pairs:
        unique.setdefault(value, multiplier)
    return sorted(unique.items())


def resolve_base(config: SweepConfig) -> tuple[sft.SFTConfig, list[str], Any]:
    """The settings `bios sft` would choose for the user's config and data; the reasons; the
    dataset statistics they were chosen from."""
    base = config.sft
    tokenizer = load_tokenizer(base.model)
    data, _ = sft.build_data(
        tokenizer, load_sft(base.data, base.train_on), base.train_on, base.max_length
    )
    if not data:
        raise ValueError(f"{base.data}: no example has a token to learn within max_length")
    # Read the eval file now too: a bad line there is reported before any run starts.
    sft.build_data(
        tokenizer, load_sft(base.eval_data, base.train_on), base.train_on, base.max_length
    )
    stats = stats_from_data(data)
    resolved, notes = resolve_sft(base, stats)
    return resolved, notes, stats


def plan(config: SweepConfig) -> tuple[list[Variation], float, list[str], Path]:
    """Every variation, resolved and checked, the default value, notes, and the output folder.
    Raises ValueError (naming the setting) before anything is written."""
    check_sweep(config)
    if not config.sft.data:
        raise ValueError("data: a training data file is required")
    resolved, notes, stats = resolve_base(config)
    field = SETTINGS[config.setting]
    default = float(getattr(resolved, field))
    out = Path(
        config.out
        or Path(config.sft.runs_dir) / f"sweep-{config.setting}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    existing = [name for name in FILES if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{out} holds a sweep already ({existing[0]}); choose another --out")

    variations = []
    for value, multiplier in sweep_values(config, default):
        typed: float | int = int(value) if config.setting in INTEGER_SETTINGS else value
        name = f"{config.setting}-{value:.6g}"
        if RunFolder(out / name).saved_config() is not None:
            raise FileExistsError(f"{out / name} holds a run already; choose another --out")
        # The user's settings plus this one value: what `bios sft --<setting> VALUE` would run.
        given = dataclasses.replace(
            config.sft, **{field: typed}, name=name, runs_dir=str(out), resume=False
        )
        final, _ = resolve_sft(given, stats)
        try:
            check(final)
        except ValueError as error:
            raise ValueError(f"{config.setting}={value:g}: {error}") from None
        variations.append(Variation(value, multiplier, given, final))
    if config.setting == "batch" and config.sft.learning_rate is None:
        notes.append(
            f"each batch B trains at get_lr × √(B/{REFERENCE_BATCH}), as `recommend` scales "
            "the learning rate with the batch"
        )
    if config.setting == "batch" and config.sft.steps is None and config.sft.epochs is None:
        notes.append("each batch B trains for the steps `bios sft` chooses for B")
    return variations, default, notes, out


# ---- running ------------------------------------------------------------------------------------


def run_sweep(config: SweepConfig, service: ServiceClient | None = None) -> SweepResult:
    """Train every variation on one ServiceClient, then write sweep.csv, .md and .png."""
    variations, default, notes, out = plan(config)
    out.mkdir(parents=True, exist_ok=True)
    # One client for every variation: the engine loads the base model once and LoRA runs share it.
    service = (
        service
        if service is not None
        else ServiceClient(
            base_url=config.sft.base_url, device=config.sft.device, dtype=config.sft.dtype
        )
    )
    finished = []
    for variation in variations:
        folder = sft.run(variation.config, service)
        finished.append((variation, folder))
    rows = summarise(finished, default)
    result = SweepResult(config.setting, default, rows, out, notes)
    write_csv(result, out / "sweep.csv")
    write_markdown(result, out / "sweep.md")
    plot_sweep(result, out / "sweep.png")
    return result


def summarise(finished: list[tuple[Variation, Path]], default: float) -> list[SweepRow]:
    """A row per run from its metrics.jsonl and resolved config.json."""
    partial = []
    for variation, folder in finished:
        records = RunFolder(folder).metrics()
        saved = RunFolder(folder).saved_config() or {}
        train = [r["train_loss"] for r in records if "train_loss" in r]
        evals = tuple((r["step"], r["eval_loss"]) for r in records if "eval_loss" in r)
        if not evals:
            raise ValueError(f"{folder}: the run logged no eval loss")
        kept = RunFolder(folder).best_checkpoint() or {}
        partial.append(
            dict(
                value=variation.value,
                multiplier=variation.multiplier,
                learning_rate=saved.get("learning_rate", variation.resolved.learning_rate),
                rank=saved.get("rank", variation.resolved.rank),
                batch_size=saved.get("batch_size", variation.resolved.batch_size),
                steps=saved.get("steps", variation.resolved.steps),
                final_train_loss=train[-1] if train else math.nan,
                final_eval_loss=evals[-1][1],
                default=variation.value == default,
                run=str(folder),
                eval_curve=evals,
                result_eval_loss=kept.get("eval_loss", math.nan),
                result_step=kept.get("step") if "eval_loss" in kept else None,
            )
        )
    # A diverged run (NaN or inf eval loss) is never the best.
    keys = [
        r["final_eval_loss"] if math.isfinite(r["final_eval_loss"]) else math.inf for r in partial
    ]
    best_index = min(range(len(keys)), key=keys.__getitem__)
    lowest = keys[best_index]
    return [
        SweepRow(**row, ratio_to_best=row["final_eval_loss"] / lowest, best=i == best_index)
        for i, row in enumerate(partial)
    ]
