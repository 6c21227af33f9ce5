"""Preference learning (DPO): make the chosen response likelier than the rejected one, relative
to a frozen reference policy.

    data     {"prompt", "chosen", "rejected"} per line (strings or messages), rendered with the
             chat template; weights 1 on each response's tokens
    loop     for each step: the step's pairs, as [chosen, rejected, chosen, rejected, ...]
               forward_backward(pairs, loss_fn, {"beta"}, reference=...)
                 h = β·[(log π_θ − log π_ref)(chosen) − (log π_θ − log π_ref)(rejected)]
                 dpo: −log σ(h)   dpo_hinge: max(0, 1 − h)   ipo: (h/β − 1/(2β))²
                 the reference's logprobs are computed in the same request (no second model)
               optim_step(AdamW, peak LR × schedule(step))
    reference  "base" (the base model), or a checkpoint — by default the one training starts
             from (`init_from`, e.g. your SFT run: a run folder stands for its result, the
             checkpoint marked best in its checkpoints.jsonl), else the base model
    metrics  train_loss (per pair), reward_margin (h), accuracy (h > 0), chosen_reward,
             rejected_reward, eval_loss / eval_accuracy / eval_reward_margin on eval_data

Left out on purpose: computing the reference logprobs once up front (they are recomputed each
step, in the same forward request, which costs a no-grad forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bios.client.service import ServiceClient
from bios.data.chat import preference_pair_to_data
from bios.models.loading import load_tokenizer
from bios.recipes.batches import batch_indices
from bios.recipes.common import (
    Parts,
    Run,
    adam_params,
    averaged,
    checkpoint_if_due,
    due,
    open_run,
    submit,
    summed,
)
from bios.recipes.config import TrainConfig, option
from bios.recipes.data import PreferencePair, load_pairs
from bios.recipes.run_folder import checkpoint_path
from bios.recipes.settings import resolve_recipe
from bios.types import Datum

PREFERENCE_LOSSES = ("dpo", "dpo_hinge", "ipo")


@dataclass
class DPOConfig(TrainConfig):
    loss_fn: str = option("dpo", "preference loss", PREFERENCE_LOSSES)
    beta: float = option(0.1, "β: how far from the reference the policy may move")
    label_smoothing: float = option(0.0, "dpo only: assumed fraction of mislabelled pairs")
    reference: str | None = option(
        None, "'base', bios:// path or run folder (default: init_from)", metavar="PATH"
    )
    max_length: int | None = option(1024, "cut each prompt + response to this many tokens")


def build_pairs(
    tokenizer, pairs: list[PreferencePair], max_length: int | None
) -> tuple[list[list[Datum]], int]:
    """[chosen, rejected] Datums per pair, and how many pairs were dropped because max_length
    left a response with no token."""
    built = []
    for pair in pairs:
        try:
            data = preference_pair_to_data(
                tokenizer, pair.prompt, pair.chosen, pair.rejected, max_length
            )
        except ValueError as error:
            raise pair.line.error(str(error)) from None
        if all(any(w > 0 for w in d.loss_fn_inputs["weights"].data) for d in data):
            built.append(data)
    return built, len(pairs) - len(built)


def loss_config(config: DPOConfig) -> dict[str, float]:
    if config.loss_fn == "dpo":
        return {"beta": config.beta, "label_smoothing": config.label_smoothing}
    return {"beta": config.beta}


def pair_metrics(parts: Parts, prefix: str = "") -> dict[str, float]:
    """Loss per pair, and the pair-averaged margin, accuracy and rewards, over all pieces."""
    pairs = sum(len(piece) for piece, _ in parts) / 2
    metrics = {f"{prefix}loss": summed(parts, "loss:sum") / pairs}
    for name in ("reward_margin", "accuracy", "chosen_reward", "rejected_reward"):
        metrics[prefix + name] = averaged(parts, f"{name}:mean", lambda piece: len(piece) / 2)
    return metrics


def evaluate(run: Run, pairs: list[list[Datum]], reference: str | None) -> dict[str, float]:
    """Loss per pair, margin, accuracy and rewards over held-out pairs (no gradient)."""
    data = [datum for pair in pairs for datum in pair]
    config = run.config
    parts = submit(
        run, data, config.loss_fn, loss_config(config), backward=False, reference=reference, group=2
    )
    return pair_metrics(parts, prefix="eval_")


def run(config: DPOConfig, service: ServiceClient | None = None) -> Path:
    """Train; return the run folder (config.json, metrics.jsonl, checkpoints.jsonl)."""
    tokenizer = load_tokenizer(config.model)
    pairs, dropped = build_pairs(tokenizer, load_pairs(config.data), config.max_length)
    eval_pairs: list[list[Datum]] = []
    if config.eval_data:
        eval_pairs, _ = build_pairs(tokenizer, load_pairs(config.eval_data), config.max_length)
    if not pairs:
        raise ValueError(f"{config.data}: no pair has response tokens within max_length")

    run_ = open_run(config, "dpo", service, lambda c: resolve_recipe(c, "dpo", len(pairs)))
    config, training, tracker = run_.config, run_.training, run_.tracker
    chosen_reference = config.reference or config.init_from or "base"
    reference = None if chosen_reference == "base" else checkpoint_path(chosen_reference)
    tracker.note(f"reference policy: {reference or 'the base model'}")
    if dropped:
        tracker.note(f"skipped {dropped} pairs with no response token within max_length")
    try:
        if run_.start_step == 0 and eval_pairs:
            tracker.log(0, evaluate(run_, eval_pairs, reference))
        for step in range(run_.start_step, config.steps):
            indices = batch_indices(len(pairs), config.batch_size, step, config.seed)
            data = [datum for i in indices for datum in pairs[i]]  # chosen, rejected, ...
            adam = adam_params(config, step)
            parts = submit(
                run_, data, config.loss_fn, loss_config(config), reference=reference, group=2
            )
            update = training.optim_step(adam)
            metrics = pair_metrics(parts)
            metrics["train_loss"] = metrics.pop("loss")
            metrics["learning_rate"] = adam.learning_rate
            metrics["grad_norm"] = update.result().metrics["grad_norm"]
            if eval_pairs and (due(config.eval_every, step + 1) or step + 1 == config.steps):
                metrics |= evaluate(run_, eval_pairs, reference)
            tracker.log(step + 1, metrics, tokens=sum(d.model_input.length for d in data))
            checkpoint_if_due(run_, step + 1)
    finally:
        tracker.close()
    return run_.folder.path
