"""The settings a user left out, chosen with `bios.hparams`, each with the reason printed.

SFT uses `recommend(model, DatasetStats)` — batch (128 unless the data is too small for 100
steps), steps (3 passes, toward 1000 steps), LoRA rank (as many LoRA parameters as completion
tokens) and `get_lr` scaled by √(batch/128) — or the parts of it the user did not set (a batch
the user chose rescales the LR). Without an eval file it holds out `default_holdout(N)` examples.

RL, DPO and distillation have no calibrated rule in Bios yet. Their LR is `get_lr(model)` times
the ratio of the Tinker cookbook's default for that recipe to its SFT LR on Llama-3.1-8B
(get_lr = 2.86e-4): RL 4e-5 → ×0.14, DPO 1e-5 → ×0.035, distillation 1e-4 → ×0.35. These
ratios are heuristics carried over from the cookbook, not measured on Bios. Their batch is
small enough for a CPU (RL 8 prompts, DPO 16 pairs, distillation 8 prompts, fewer if the data
is smaller), their steps one pass over the data and at least 10, their rank the default 32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bios.hparams import (
    DEFAULT_RANK,
    DatasetStats,
    get_lr,
    recommend,
    recommend_epochs,
    recommend_steps,
    scale_lr_for_batch,
)
from bios.recipes.batches import steps_for_epochs

COOKBOOK_SFT_LR = 2.86e-4  # get_lr("meta-llama/Llama-3.1-8B"), the cookbook's reference model
RECIPE_LR = {"rl": 4e-5, "dpo": 1e-5, "distill": 1e-4}  # the cookbook's recipe defaults
RECIPE_BATCH = {"rl": 8, "dpo": 16, "distill": 8}
MIN_RECIPE_STEPS = 10
EVALS_PER_RUN = 10
# Without an eval file, SFT holds out 10% of the training data (at most 100 examples: enough to
# rank checkpoints, and an eval stays cheap), none under 50 examples: a tenth of those is under 5
# examples, too few to rank checkpoints by, and each is a tenth of what there is to learn from.
HOLDOUT_DIVISOR = 10  # a tenth
HOLDOUT_MAX = 100
HOLDOUT_MIN_EXAMPLES = 50


def default_holdout(num_examples: int) -> int:
    """Examples held out for eval without an eval file: min(100, ⌊N / 10⌋), 0 when N < 50."""
    if num_examples < HOLDOUT_MIN_EXAMPLES:
        return 0
    return min(HOLDOUT_MAX, num_examples // HOLDOUT_DIVISOR)


def resolve_sft(config: Any, stats: DatasetStats) -> tuple[Any, list[str]]:
    """`config` with batch_size, steps, rank and learning_rate filled in; the reasons."""
    rec = recommend(config.model, stats, lora=True)
    chosen: dict[str, Any] = {}
    notes: list[str] = []
    batch = config.batch_size
    if batch is None:
        batch = chosen["batch_size"] = rec.batch_size
        notes.append(_reason(rec.reasons, "batch"))
    if config.steps is None:
        n = stats.num_examples
        if config.epochs is not None:
            chosen["steps"] = steps_for_epochs(n, batch, config.epochs)
            notes.append(
                f"{chosen['steps']} steps: {config.epochs:g} passes over {n} examples "
                f"at batch {batch}"
            )
        elif batch == rec.batch_size:
            chosen["steps"] = rec.steps
            notes.append(_reason(rec.reasons, f"{rec.steps} steps"))
        else:
            chosen["steps"] = recommend_steps(n, batch)
            notes.append(
                f"{chosen['steps']} steps: toward 1000 within {recommend_epochs(n)} passes "
                f"over {n} examples at batch {batch}"
            )
    if config.rank is None and config.init_from is None:
        chosen["rank"] = rec.lora_rank
        notes.append(_reason(rec.reasons, "LoRA rank"))
    if config.learning_rate is None:
        if batch == rec.batch_size:
            chosen["learning_rate"] = rec.learning_rate
            notes.append(_reason(rec.reasons, "learning rate"))
        else:
            lr = scale_lr_for_batch(get_lr(config.model), batch)
            chosen["learning_rate"] = lr
            notes.append(f"learning rate {lr:.3g}: get_lr({config.model}) × √({batch}/128)")
    return _finish(dataclasses.replace(config, **chosen), notes)


def resolve_recipe(config: Any, recipe: str, num_examples: int) -> tuple[Any, list[str]]:
    """RL, DPO and distillation: batch, steps, rank and LR filled in; the reasons."""
    chosen: dict[str, Any] = {}
    notes: list[str] = []
    unit = "pairs" if recipe == "dpo" else "prompts"
    batch = config.batch_size
    if batch is None:
        batch = chosen["batch_size"] = min(RECIPE_BATCH[recipe], num_examples)
        notes.append(
            f"batch {batch} {unit} per step: small enough for a CPU "
            f"(at most {RECIPE_BATCH[recipe]}, and no more than the data has)"
        )
    if config.steps is None:
        epochs = config.epochs if config.epochs is not None else 1.0
        steps = steps_for_epochs(num_examples, batch, epochs)
        if config.epochs is None:
            steps = max(steps, MIN_RECIPE_STEPS)
        chosen["steps"] = steps
        notes.append(
            f"{steps} steps: {epochs:g} pass(es) over {num_examples} {unit} at batch "
            f"{batch}" + ("" if config.epochs else f", at least {MIN_RECIPE_STEPS}")
        )
    if config.rank is None and config.init_from is None:
        chosen["rank"] = DEFAULT_RANK
        notes.append(f"LoRA rank {DEFAULT_RANK}: the default")
    if config.learning_rate is None:
        factor = RECIPE_LR[recipe] / COOKBOOK_SFT_LR
        lr = chosen["learning_rate"] = get_lr(config.model) * factor
        notes.append(
            f"learning rate {lr:.3g}: get_lr({config.model}) × {factor:.3g}, the "
            f"cookbook's {recipe} LR ({RECIPE_LR[recipe]:g}) over its SFT LR for "
            "Llama-3.1-8B (a heuristic, not calibrated on Bios)"
        )
    return _finish(dataclasses.replace(config, **chosen), notes)


def _finish(config: Any, notes: list[str]) -> tuple[Any, list[str]]:
    has_eval = bool(config.eval_data) or bool(getattr(config, "holdout", 0))
    if config.eval_every is None and has_eval:
        every = max(1, math.ceil(config.steps / EVALS_PER_RUN))
        config = dataclasses.replace(config, eval_every=every)
        notes.append(f"eval every {every} steps: about {EVALS_PER_RUN} evaluations per run")
    return config, notes


def _reason(reasons: list[str], prefix: str) -> str:
    return next(r for r in reasons if r.startswith(prefix))
