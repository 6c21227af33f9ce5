"""Hyperparameters chosen for the user: learning rate, LoRA rank, batch size, steps, schedules.

Pure functions over a model's architecture numbers (the catalog, or a local `config.json`) and
two numbers about the data. The rules and where they come from are in `docs/hparams.md`:

    get_lr             LR = 5e-5 × (10 for LoRA) × (2000 / hidden_size)^P      (Tinker cookbook)
    scale_lr_for_batch LR × √(batch / 128)
    lora_param_count   rank × Σ over adapted layers of (in_features + out_features)
    recommend_steps    ⌈min(max(1000, N/B), E · N/B)⌉, E = 3 passes (more only for < 34 examples)
    recommend          batch, steps, passes, LoRA rank and LR for a dataset, each with a reason
    lr_multiplier      constant / linear / cosine, with optional linear warmup
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from bios.models.catalog import ModelSpec, model_spec

if TYPE_CHECKING:
    from bios.types import Datum

# --- learning rate ------------------------------------------------------------------------------

BASE_LR = 5e-5  # full fine-tuning LR of a model with hidden size REFERENCE_HIDDEN
LORA_LR_MULTIPLIER = 10.0  # LoRA LR / full fine-tuning LR (the cookbook's empirical factor)
REFERENCE_HIDDEN = 2000
# P in LR ∝ (2000 / hidden_size)^P, per Bios family. Llama and Qwen are Tinker's calibration.
LR_EXPONENTS: dict[str, float] = {
    "llama": 0.781,
    "qwen2": 0.0775,
    "qwen3": 0.0775,
    # Bios's own calibration: an LR sweep of SmolLM2-135M-Instruct LoRA SFT on natural-language
    # data (task D, half a, of benchmarks/sft_tasks.py) at the batch, rank and steps `bios sft`
    # chooses for it (benchmarks/lr_calibration.py; the tables are in docs/hparams.md). One size.
    "smollm2": 2.452,
}
# Families whose exponent is a stand-in, not a calibration: `recommend` says so in its reasons.
PROVISIONAL_FAMILIES: frozenset[str] = frozenset()
# A model of an unknown family whose hidden size is known: Llama-like architectures dominate.
FALLBACK_EXPONENT = LR_EXPONENTS["llama"]
REFERENCE_BATCH = 128


class UncalibratedModelWarning(UserWarning):
    """A learning rate was derived for a model outside the calibrated families."""


def _lr_from_spec(spec: ModelSpec | None, name: str, lora: bool) -> tuple[float, str]:
    """(LR, one-line explanation); warns for anything outside the calibrated families."""
    multiplier = LORA_LR_MULTIPLIER if lora else 1.0
    kind = "LoRA" if lora else "full"
    if spec is None:
        lr = BASE_LR * multiplier
        warnings.warn(
            f"get_lr: nothing known about model {name!r} (not in the catalog, no local "
            f"config.json); using the uncalibrated fallback {lr:.3g} ({kind}). Pass a learning "
            "rate explicitly if you know a better one.",
            UncalibratedModelWarning,
            stacklevel=3,
        )
        return lr, f"{lr:.3g}: fallback for an unknown model (5e-5 × {multiplier:g}, {kind})"
    exponent = LR_EXPONENTS.get(spec.family)
    note = ""
    if exponent is None:
        exponent = FALLBACK_EXPONENT
        warnings.warn(
            f"get_lr: model {name!r} is of family {spec.family!r}, which has no LR calibration; "
            f"using the Llama exponent {exponent} with its hidden size {spec.hidden_size}.",
            UncalibratedModelWarning,
            stacklevel=3,
        )
        note = f" (family {spec.family!r} uncalibrated: Llama exponent)"
    elif spec.family in PROVISIONAL_FAMILIES:
        note = " (PROVISIONAL exponent, pending an LR sweep)"
    lr = BASE_LR * multiplier * (REFERENCE_HIDDEN / spec.hidden_size) ** exponent
    formula = f"5e-5 × {multiplier:g} × (2000/{spec.hidden_size})^{exponent}"
    return lr, f"{lr:.3g} = {formula}, {spec.family} family, {kind}{note}"


def get_lr(model: str | os.PathLike[str] | ModelSpec, lora: bool = True) -> float:
    """The learning rate for fine-tuning `model`: Tinker cookbook's calibrated formula.

        LR = 5e-5 × (10 if lora else 1) × (2000 / hidden_size)^P

    P = 0.781 for Llama, 0.0775 for Qwen (qwen2, qwen3), and 2.452 for SmolLM2 (Bios's LR
    sweeps on SmolLM2-135M-Instruct, docs/hparams.md).
    The hidden size comes from the catalog, or from the model's local `config.json`.
    Never raises for an unknown model; it warns (`UncalibratedModelWarning`) and uses the Llama
    exponent when the hidden size is known, else 5e-4 (LoRA) / 5e-5 (full), the formula at the
    reference width — Tinker's advice for its uncalibrated families. Independent of LoRA rank.
    """
    return _lr_from_spec(model_spec(model), os.fspath(_name(model)), lora)[0]


def scale_lr_for_batch(lr: float, batch_size: int, reference_batch: int = REFERENCE_BATCH) -> float:
    """LR for another batch size: lr × √(batch_size / reference_batch) (the small-batch rule)."""
    if batch_size <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got {batch_size} and {reference_batch}")
    return lr * math.sqrt(batch_size / reference_batch)


def _name(model: str | os.PathLike[str] | ModelSpec) -> str | os.PathLike[str]:
    return model.name if isinstance(model, ModelSpec) else model


# --- LoRA parameter counts ----------------------------------------------------------------------


def lora_params_per_rank(model: str | os.PathLike[str] | ModelSpec) -> dict[str, int]:
    """LoRA parameters per unit of rank, by component: {"mlp", "attn", "unembed"}.

    A rank-r adapter on a linear layer in→out has r·(in + out) parameters. Per rank:
        attn    = L · [(H + n_h·d) + 2·(H + n_kv·d) + (n_h·d + H)]          q, k, v, o
        mlp     = L · 3·(H + I)                                              gate, up, down
                  MoE: L · 3·(H + E·I), Tinker's shared-outer scheme (the hidden-side factor
                  is shared across the E experts, the other is per expert; I per expert)
        unembed = H + V                                                      lm_head
    H hidden size, I intermediate size, n_h / n_kv heads / key-value heads, d head dim,
    L layers, V vocabulary. Raises ValueError when the architecture numbers are unknown.
    """
    spec = model_spec(model)
    shapes = None if spec is None else _shape_tuple(spec)
    if shapes is None:
        raise ValueError(
            f"lora_params_per_rank: architecture of {os.fspath(_name(model))!r} unknown "
            "(need hidden/intermediate size, heads, head dim, vocab: catalog or config.json)"
        )
    hidden, inter, heads, kv_heads, head_dim, vocab = shapes
    q, kv = heads * head_dim, kv_heads * head_dim
    attn = (hidden + q) + 2 * (hidden + kv) + (q + hidden)
    mlp = 3 * (hidden + max(spec.num_experts, 1) * inter)
    return {
        "mlp": spec.num_layers * mlp,
        "attn": spec.num_layers * attn,
        "unembed": hidden + vocab,
    }


def _shape_tuple(spec: ModelSpec) -> tuple[int, ...] | None:
    values = (
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_heads,
        spec.num_kv_heads,
        spec.head_dim,
        spec.vocab_size,
    )
    return None if any(v is None for v in values) else tuple(int(v) for v in values)


def lora_param_count(
    model: str | os.PathLike[str] | ModelSpec,
    rank: int,
    train_attn: bool = True,
    train_mlp: bool = True,
    train_unembed: bool = True,
) -> int:
    """Trainable parameters of a rank-`rank` LoRA adapter: rank × Σ selected per-rank counts."""
    if rank <= 0:
        raise ValueError(f"rank: expected a positive integer, got {rank}")
    per_rank = lora_params_per_rank(model)
    chosen = {"attn": train_attn, "mlp": train_mlp, "unembed": train_unembed}
    return rank * sum(count for part, count in per_rank.items() if chosen[part])


# --- advice from the dataset --------------------------------------------------------------------

DEFAULT_BATCH = 128  # Tinker's recommendation for SFT
MIN_BATCH = 8  # below this, per-step gradient noise dominates
MIN_STEPS = 100  # "aim for at least 100 steps": the batch is cut (down to 8) to allow them
TARGET_STEPS = 1000  # "best results with 1000 or more": large data trains toward it
# Passes over the data: OpenAI's fine-tuning default (its cookbook's chat data-prep notebook:
# TARGET_EPOCHS = 3, and more passes only for a set so small that 3 passes show fewer than 100
# examples, at most 25). More passes than 3 overfit small sets: a 100-example chat set at the
# old 100-step floor (8 passes) ended 36% above the eval loss it passed through after 1.6 passes
# (docs/hparams.md, "Steps from the data").
MAX_EPOCHS = 3
MIN_EXAMPLES_SEEN = 100
MAX_SMALL_DATA_EPOCHS = 25
LORA_RANKS = (8, 16, 32, 64, 128)
DEFAULT_RANK = 32


@dataclass(frozen=True)
class DatasetStats:
    """What `recommend` needs about a dataset: examples, and tokens with weight > 0."""

    num_examples: int
    completion_tokens: int

    def __post_init__(self) -> None:
        if self.num_examples < 1:
            raise ValueError(f"num_examples: expected at least 1, got {self.num_examples}")
        if self.completion_tokens < 0:
            raise ValueError(f"completion_tokens: expected >= 0, got {self.completion_tokens}")


def stats_from_data(data: list[Datum]) -> DatasetStats:
    """Count examples and completion tokens (`loss_fn_inputs['weights'] > 0`) of a dataset.

    A datum without `weights` counts every position of its input as a completion token.
    """
    tokens = 0
    for datum in data:
        weights = datum.loss_fn_inputs.get("weights")
        if weights is None:
            tokens += datum.model_input.length
        else:
            tokens += sum(1 for w in weights.data if w > 0)
    return DatasetStats(num_examples=len(data), completion_tokens=tokens)


@dataclass(frozen=True)
class Recommendation:
    """Settings for a fine-tuning run, with one line of reasoning per choice."""

    batch_size: int
    steps: int
    epochs: float  # passes over the data: steps × batch_size / num_examples
    lora_rank: int | None  # None for full fine-tuning
    learning_rate: float
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        rank = "full fine-tuning" if self.lora_rank is None else f"LoRA rank {self.lora_rank}"
        head = (
            f"batch {self.batch_size}, {self.steps} steps ({self.epochs:.2f} passes), {rank}, "
            f"learning rate {self.learning_rate:.3g}"
        )
        return "\n".join([head, *(f"  - {reason}" for reason in self.reasons)])


def recommend_batch_size(num_examples: int) -> int:
    """128, unless MAX_EPOCHS passes at 128 give fewer than MIN_STEPS steps; then the largest
    power of two B >= MIN_BATCH with MAX_EPOCHS × N / B >= MIN_STEPS (MIN_BATCH if none does).
    A dataset smaller than MIN_BATCH is one batch."""
    if num_examples < MIN_BATCH:
        return num_examples
    limit = MAX_EPOCHS * num_examples / MIN_STEPS  # the largest batch giving MIN_STEPS steps
    if limit >= DEFAULT_BATCH:
        return DEFAULT_BATCH
    if limit < MIN_BATCH:
        return MIN_BATCH
    return 2 ** math.floor(math.log2(limit))


def recommend_epochs(num_examples: int) -> int:
    """Passes a small dataset gets: MAX_EPOCHS (3), or, when 3 passes show fewer than
    MIN_EXAMPLES_SEEN (100) examples, ⌊100 / N⌋ passes, at most MAX_SMALL_DATA_EPOCHS (25).
    (OpenAI's fine-tuning default, from its cookbook's chat data-preparation notebook.)"""
    if num_examples < 1:
        raise ValueError(f"num_examples: expected at least 1, got {num_examples}")
    if MAX_EPOCHS * num_examples >= MIN_EXAMPLES_SEEN:
        return MAX_EPOCHS
    return min(MAX_SMALL_DATA_EPOCHS, MIN_EXAMPLES_SEEN // num_examples)


def recommend_steps(num_examples: int, batch_size: int) -> int:
    """Steps from passes over the data. With s = N / B steps per pass and E = recommend_epochs(N):

        steps = ⌈min(max(TARGET_STEPS, s), E · s)⌉

    One pass when a pass is already 1000+ steps; else E passes, or fewer when 1000 steps come
    first (so large data trains 1000+ steps); never more than E passes, so a small dataset is
    not memorised (100 examples at batch 8: 3 passes, 38 steps)."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    per_pass = num_examples / batch_size
    steps = min(max(TARGET_STEPS, per_pass), recommend_epochs(num_examples) * per_pass)
    return max(1, math.ceil(steps - 1e-9))


def recommend_rank(model: str | os.PathLike[str] | ModelSpec, completion_tokens: int) -> int | None:
    """The smallest of LORA_RANKS whose LoRA parameter count >= completion_tokens (128 if none);
    None when the architecture is unknown (the caller then uses DEFAULT_RANK)."""
    try:
        per_rank = sum(lora_params_per_rank(model).values())
    except ValueError:
        return None
    return next((r for r in LORA_RANKS if r * per_rank >= completion_tokens), LORA_RANKS[-1])


def recommend(
    model: str | os.PathLike[str] | ModelSpec, dataset: DatasetStats, *, lora: bool = True
) -> Recommendation:
    """Batch size, steps, LoRA rank and LR for fine-tuning `model` on `dataset`, with reasons.

    batch: `recommend_batch_size`; steps: `recommend_steps`; rank: `recommend_rank` (DEFAULT_RANK
    when the architecture is unknown); LR: `get_lr`, × √(batch/128) when batch ≠ 128.
    """
    n, tokens = dataset.num_examples, dataset.completion_tokens
    batch = recommend_batch_size(n)
    steps = recommend_steps(n, batch)
    epochs = steps * batch / n
    reasons = [_batch_reason(n, batch), _steps_reason(n, batch, steps, epochs)]

    spec = model_spec(model)
    rank: int | None = None
    if lora:
        rank, reason = _rank_and_reason(spec, tokens)
        reasons.append(reason)
    lr, lr_reason = _lr_from_spec(spec, os.fspath(_name(model)), lora)
    if batch != REFERENCE_BATCH:
        lr = scale_lr_for_batch(lr, batch)
        lr_reason += f"; × √({batch}/128) for batch {batch} → {lr:.3g}"
    reasons.append(f"learning rate {lr_reason}")
    return Recommendation(batch, steps, epochs, rank, lr, reasons)


def _batch_reason(n: int, batch: int) -> str:
    if batch == DEFAULT_BATCH:
        return f"batch {batch}: the default; {n:,} examples allow {MIN_STEPS}+ steps at 128"
    if n < MIN_BATCH:
        return f"batch {batch}: the whole dataset ({n} examples, fewer than {MIN_BATCH})"
    if MAX_EPOCHS * n / batch < MIN_STEPS:
        return (
            f"batch {batch}: the smallest offered; {n:,} examples are too few for "
            f"{MIN_STEPS} steps in {MAX_EPOCHS} passes at any batch of {MIN_BATCH}+"
        )
    return (
        f"batch {batch}: 128 would give {MAX_EPOCHS * n / DEFAULT_BATCH:.0f} steps in "
        f"{MAX_EPOCHS} passes over {n:,} examples; {batch} is the largest power of two "
        f">= {MIN_BATCH} that gives {MIN_STEPS}+"
    )


def _steps_reason(n: int, batch: int, steps: int, epochs: float) -> str:
    per_pass = n / batch
    passes = recommend_epochs(n)
    if per_pass >= TARGET_STEPS:
        why = f"one pass over the data is already {TARGET_STEPS}+ steps"
    elif passes * per_pass >= TARGET_STEPS:
        why = f"{TARGET_STEPS} steps, reached within {passes} passes"
    elif passes == MAX_EPOCHS:
        why = (
            f"{MAX_EPOCHS} passes, no more: more passes memorise a small dataset "
            f"({TARGET_STEPS} steps would need {TARGET_STEPS / per_pass:.0f} passes)"
        )
    else:
        why = (
            f"{passes} passes, so that {MIN_EXAMPLES_SEEN}+ examples are seen "
            f"({MAX_EPOCHS} passes over {n} show only {MAX_EPOCHS * n})"
        )
    return f"{steps} steps ({epochs:.2f} passes of {per_pass:.1f} steps): {why}"


def _rank_and_reason(spec: ModelSpec | None, tokens: int) -> tuple[int, str]:
    rank = None if spec is None else recommend_rank(spec, tokens)
    if rank is None:
        return DEFAULT_RANK, f"LoRA rank {DEFAULT_RANK}: the default (architecture unknown)"
    params = lora_param_count(spec, rank)
    if params < tokens:
        return rank, (
            f"LoRA rank {rank}: the largest offered, yet {params:,} parameters < {tokens:,} "
            "completion tokens; consider full fine-tuning"
        )
    return rank, (
        f"LoRA rank {rank}: the smallest of {'/'.join(map(str, LORA_RANKS))} with at least "
        f"as many LoRA parameters ({params:,}) as completion tokens ({tokens:,})"
    )


# --- learning-rate schedules --------------------------------------------------------------------

Schedule = Literal["constant", "linear", "cosine"]
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


def lr_multiplier(
    schedule: Schedule,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    min_ratio: float = 0.0,
) -> float:
    """The factor on the peak LR at `step` (0-based) of a `total_steps` run.

    Warmup (step < w): (step + 1) / w — the first step already trains at 1/w, the last warmup
    step reaches 1. After it, with progress p = (step − w) / (total_steps − w), clipped to 1:
        constant: 1
        linear:   m + (1 − m) · (1 − p)
        cosine:   m + (1 − m) · ½ (1 + cos π p)
    m = min_ratio. With w = 0 and m = 0 these are Tinker cookbook's schedules; the value at
    step = total_steps (after the last step) is m.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps: expected at least 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: expected 0..{total_steps}, got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step: expected >= 0, got {step}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio: expected 0..1, got {min_ratio}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
