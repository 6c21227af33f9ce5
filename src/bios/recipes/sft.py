"""Supervised fine-tuning: learn to write the assistant turns of example conversations.

    data     {"messages": [...]} or {"prompt", "completion"} per line, rendered with the model's
             chat template; weights 1 on the assistant's tokens (train_on="all": every token)
    loop     for each step: the step's batch (a fixed shuffle per epoch)
               forward_backward(batch, "cross_entropy")      loss = −Σ w · log p(token)
               optim_step(AdamW, peak LR × schedule(step))
               every eval_every steps: held-out NLL per weighted token (forward only)
               every save_every steps, and at the end: save_state → checkpoints.jsonl
    metrics  train_loss, eval_loss (per weighted token), learning_rate, grad_norm, epoch, tokens/s

A step's batch goes to the engine in pieces of at most `tokens_per_request` tokens; their
gradients add up until `optim_step`, so the pieces only bound the memory a step needs.

Left out on purpose: packing several examples into one sequence, and early stopping (the health
check says when the eval loss turns up).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bios.client.service import ServiceClient
from bios.data.chat import conversation_to_datum, prompt_completion_to_datum
from bios.hparams import stats_from_data
from bios.models.loading import load_tokenizer
from bios.recipes.batches import batch_indices, epochs_done
from bios.recipes.common import (
    Run,
    adam_params,
    checkpoint_if_due,
    due,
    open_run,
    submit,
    summed,
)
from bios.recipes.config import TrainConfig, option
from bios.recipes.data import SFTExample, load_sft
from bios.recipes.settings import resolve_sft
from bios.types import Datum


@dataclass
class SFTConfig(TrainConfig):
    train_on: str = option("assistant", "tokens to learn", ("assistant", "all"))
    max_length: int | None = option(2048, "cut each example to this many tokens")


def build_data(
    tokenizer, examples: list[SFTExample], train_on: str, max_length: int | None
) -> tuple[list[Datum], int]:
    """Datums of the examples, and how many were dropped: cut to max_length, nothing was left
    to learn."""
    data = []
    for example in examples:
        try:
            if example.prompt is None:
                datum = conversation_to_datum(tokenizer, example.messages, train_on, max_length)
            else:
                datum = prompt_completion_to_datum(
                    tokenizer, example.prompt, example.messages, train_on, max_length
                )
        except ValueError as error:
            raise example.line.error(str(error)) from None
        if any(w > 0 for w in datum.loss_fn_inputs["weights"].data):
            data.append(datum)
    return data, len(examples) - len(data)


def evaluate(run: Run, data: list[Datum]) -> float:
    """Negative log-likelihood per weighted token of `data` (no gradient)."""
    loss = summed(submit(run, data, "cross_entropy", backward=False), "loss:sum")
    return loss / sum(sum(d.loss_fn_inputs["weights"].data) for d in data)


def run(config: SFTConfig, service: ServiceClient | None = None) -> Path:
    """Train; return the run folder (config.json, metrics.jsonl, checkpoints.jsonl)."""
    tokenizer = load_tokenizer(config.model)
    data, dropped = build_data(
        tokenizer, load_sft(config.data, config.train_on), config.train_on, config.max_length
    )
    eval_set: list[Datum] = []
    if config.eval_data:
        eval_examples = load_sft(config.eval_data, config.train_on)
        eval_set, _ = build_data(tokenizer, eval_examples, config.train_on, config.max_length)
    if not data:
        raise ValueError(f"{config.data}: no example has a token to learn within max_length")

    run_ = open_run(config, "sft", service, lambda c: resolve_sft(c, stats_from_data(data)))
    config, training, tracker = run_.config, run_.training, run_.tracker
    if dropped:
        tracker.note(f"skipped {dropped} examples with nothing to learn within max_length")
    try:
        if run_.start_step == 0 and eval_set:
            tracker.log(0, {"eval_loss": evaluate(run_, eval_set)})
        for step in range(run_.start_step, config.steps):
            indices = batch_indices(len(data), config.batch_size, step, config.seed)
            batch = [data[i] for i in indices]
            adam = adam_params(config, step)
            # Submitted back to back: the engine runs them in this order.
            parts = submit(run_, batch, "cross_entropy")
            update = training.optim_step(adam)
            weight = sum(sum(d.loss_fn_inputs["weights"].data) for d in batch)
            metrics = {
                "train_loss": summed(parts, "loss:sum") / weight,
                "learning_rate": adam.learning_rate,
                "grad_norm": update.result().metrics["grad_norm"],
                "epoch": epochs_done(len(data), config.batch_size, step + 1),
            }
            if eval_set and (due(config.eval_every, step + 1) or step + 1 == config.steps):
                metrics["eval_loss"] = evaluate(run_, eval_set)
            tracker.log(step + 1, metrics, tokens=sum(d.model_input.length for d in batch))
            checkpoint_if_due(run_, step + 1)
    finally:
        tracker.close()
    return run_.folder.path
