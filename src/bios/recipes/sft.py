"""Supervised fine-tuning: learn to write the assistant turns of example conversations.

    data     {"messages": [...]} or {"prompt", "completion"} per line, rendered with the model's
             chat template; weights 1 on the assistant's tokens (train_on="all": every token)
    eval     eval_data, or without it a slice of the training data held out automatically
             (`holdout`, default 10%, at most 100, none under 50 examples; which examples is a
             function of the seed; announced, and recorded in config.json)
    loop     for each step: the step's batch (a fixed shuffle per epoch)
               forward_backward(batch, "cross_entropy")      loss = −Σ w · log p(token)
               optim_step(AdamW, peak LR × schedule(step))
               every eval_every steps: held-out NLL per weighted token (forward only)
               a checkpoint whenever the eval loss is the lowest so far, every save_every
               steps, and at the end → checkpoints.jsonl
    result   the checkpoint with the lowest eval loss, marked "best" in checkpoints.jsonl (the
             final one when there is no eval); `early_stop` N ends the run after N evals in a
             row without a lower eval loss (default 3; 0: run every step)
    metrics  train_loss, eval_loss (per weighted token), learning_rate, grad_norm, epoch, tokens/s

A step's batch goes to the engine in pieces of at most `tokens_per_request` tokens; their
gradients add up until `optim_step`, so the pieces only bound the memory a step needs.

Left out on purpose: packing several examples into one sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from bios.client.service import ServiceClient
from bios.data.chat import conversation_to_datum, prompt_completion_to_datum
from bios.hparams import stats_from_data
from bios.models.loading import load_tokenizer
from bios.recipes.batches import batch_indices, epochs_done, holdout_indices
from bios.recipes.common import (
    Run,
    adam_params,
    due,
    open_run,
    save_checkpoint,
    submit,
    summed,
)
from bios.recipes.config import TrainConfig, option
from bios.recipes.data import SFTExample, load_sft
from bios.recipes.keep_best import KeepBest
from bios.recipes.settings import default_holdout, resolve_sft
from bios.types import Datum


@dataclass
class SFTConfig(TrainConfig):
    train_on: str = option("assistant", "tokens to learn", ("assistant", "all"))
    max_length: int | None = option(2048, "cut each example to this many tokens")
    holdout: int | None = option(
        None,
        "without eval data: training examples held out for eval (default: a tenth, at most 100, "
        "none under 50 examples; 0: none)",
    )
    early_stop: int = option(
        3, "stop after this many evals in a row without a lower eval loss (0: never)"
    )


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


def split_holdout(
    data: list[Datum], count: int, seed: int
) -> tuple[list[Datum], list[Datum], list[int]]:
    """(training data, held-out data, the held-out indices) for `holdout_indices`."""
    held = holdout_indices(len(data), count, seed)
    chosen = set(held)
    train = [d for i, d in enumerate(data) if i not in chosen]
    return train, [data[i] for i in held], held


def resolve_with_holdout(config: SFTConfig, data: list[Datum]) -> tuple[SFTConfig, list[str]]:
    """The holdout (none with an eval file), then `resolve_sft` on the data left to train on."""
    if config.eval_data:
        if config.holdout:
            raise ValueError("holdout: an eval file is given (eval_data); holdout must be 0")
        config = dataclasses.replace(config, holdout=0)
    elif config.holdout is None:
        config = dataclasses.replace(config, holdout=default_holdout(len(data)))
    elif not 0 <= config.holdout < len(data):
        raise ValueError(f"holdout: expected 0 to {len(data) - 1} examples, got {config.holdout}")
    train, _, held = split_holdout(data, config.holdout, config.seed)
    config, notes = resolve_sft(config, stats_from_data(train))
    if not config.eval_data:
        if held:
            lines = ", ".join(str(i + 1) for i in held[:12]) + (", ..." if len(held) > 12 else "")
            notes.insert(
                0,
                f"eval: no eval file, so {len(held)} of the {len(data)} training examples are "
                f"held out for eval (holdout={len(held)}, drawn with seed {config.seed}; "
                f"examples {lines})",
            )
        else:
            notes.insert(0, "eval: none (no eval file, holdout 0): the result is the final step")
    return config, notes


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
    if config.early_stop < 0:
        raise ValueError(f"early_stop: expected 0 (off) or more evals, got {config.early_stop}")

    run_ = open_run(config, "sft", service, lambda c: resolve_with_holdout(c, data))
    config, training, tracker = run_.config, run_.training, run_.tracker
    source = config.eval_data
    if not config.eval_data:
        data, eval_set, _ = split_holdout(data, config.holdout or 0, config.seed)
        source = f"the {len(eval_set)} held-out training examples"
    if dropped:
        tracker.note(f"skipped {dropped} examples with nothing to learn within max_length")
    keeper = KeepBest.restore(
        config.early_stop, source or "", run_.folder.metrics(), run_.folder.best_checkpoint()
    )
    last = run_.folder.last_checkpoint()
    finished = last is not None and last.get("final") and last["step"] == run_.start_step
    try:
        if run_.start_step == 0 and eval_set:
            loss = evaluate(run_, eval_set)
            keeper.saw(0, loss)
            tracker.log(0, {"eval_loss": loss})
        for step in range(run_.start_step, 0 if finished else config.steps):
            done = step + 1
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
                "epoch": epochs_done(len(data), config.batch_size, done),
            }
            eval_loss = None
            if eval_set and (due(config.eval_every, done) or done == config.steps):
                eval_loss = metrics["eval_loss"] = evaluate(run_, eval_set)
            tracker.log(done, metrics, tokens=sum(d.model_input.length for d in batch))
            improved = eval_loss is not None and keeper.saw(done, eval_loss)
            stop = eval_loss is not None and keeper.should_stop() and done < config.steps
            final = done == config.steps or stop
            if improved or final or due(config.save_every, done):
                path = save_checkpoint(run_, done, final=final, eval_loss=eval_loss)
                if improved:
                    run_.folder.mark_best(path, keeper.why())
            if stop:
                tracker.note(
                    f"early stop at step {done}: {keeper.since_best} evals without an eval loss "
                    f"below {keeper.best_loss:.5g} (step {keeper.best_step}; early_stop="
                    f"{config.early_stop})"
                )
                break
        mark_result(run_, keeper)
    finally:
        tracker.close()
    return run_.folder.path


def mark_result(run_: Run, keeper: KeepBest) -> None:
    """Mark the run's result, with the reason over every eval (the final checkpoint when there
    was no eval), and say which it is."""
    folder = run_.folder
    best = folder.best_checkpoint()
    if keeper.best_step is None or best is None:
        last = folder.last_checkpoint()
        if last is None:
            return
        why = "the final checkpoint: no eval data (eval_data or holdout) to choose by"
        folder.mark_best(last["path"], why)
        run_.tracker.note(f"result: step {last['step']}, {last['path']} ({why})")
        return
    folder.mark_best(best["path"], keeper.why(finished=True))
    run_.tracker.note(
        f"result: step {best['step']}, {best['path']} (eval loss {keeper.best_loss:.5g}, the "
        f"lowest of {keeper.evals} evals; `bios sample/export RUN` and --init-from RUN use it)"
    )
