"""The parts every recipe's loop shares: opening a run (fresh, from a checkpoint, or resumed),
the optimizer settings of a step, sending a batch in pieces, and checkpoints.

A resumed run continues from its last checkpoint — weights and AdamW moments — at the step the
checkpoint records. The data order and sampling seeds are functions of (seed, step)
(`batches.py`, `rollouts.sample_seed`), so the resumed run computes what the uninterrupted one
would have.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bios.client.futures import APIFuture
from bios.client.service import ServiceClient, TrainingClient
from bios.hparams import lr_multiplier
from bios.recipes.batches import token_chunks
from bios.recipes.config import merge_for_resume, to_json
from bios.recipes.run_folder import RunFolder, checkpoint_path
from bios.recipes.tracking import Tracker, open_sinks, require_packages
from bios.types import AdamParams, Datum, ForwardBackwardOutput

# AdamW as the Tinker cookbook's recipes set it (the SDK's own default eps is 1e-12).
BETA1, BETA2, EPS = 0.9, 0.95, 1e-8


@dataclass
class Run:
    """An open run: its resolved config, folder, training client, tracker and first step."""

    config: Any
    folder: RunFolder
    service: ServiceClient
    training: TrainingClient
    tracker: Tracker
    start_step: int


def open_run(
    config: Any,
    recipe: str,
    service: ServiceClient | None,
    resolve: Callable[[Any], tuple[Any, list[str]]],
) -> Run:
    """Prepare the run folder, choose the settings left out (`resolve`; not on resume: the run's
    saved settings are used), create or restore the training client, print what was chosen."""
    folder = RunFolder.prepare(config.runs_dir, config.name, recipe, config.resume)
    saved = folder.saved_config()
    if config.resume and saved is not None:
        config, notes = merge_for_resume(config, saved), []
    else:
        config, notes = resolve(dataclasses.replace(config, name=folder.path.name))
        check(config)
    require_packages(config.tensorboard, config.wandb)
    if saved is None:
        folder.write_config({"recipe": recipe, **to_json(config)})
    if service is None:
        service = ServiceClient(base_url=config.base_url, device=config.device, dtype=config.dtype)

    last = folder.last_checkpoint() if config.resume else None
    if last is not None:
        training = service.create_training_client_from_state_with_optimizer(last["path"])
        start = last["step"]
    elif config.init_from:
        training = service.create_training_client_from_state(checkpoint_path(config.init_from))
        start = 0
    else:
        training = service.create_lora_training_client(
            config.model, rank=config.rank, seed=config.seed
        )
        start = 0
    history = folder.keep_metrics_until(start if last is not None else -1)

    sinks = open_sinks(folder, to_json(config), config.tensorboard, config.wandb)
    tracker = Tracker(folder, recipe, config.steps, start, history, config.progress, sinks)
    tracker.note(f"{recipe}: run folder {folder.path}")
    if last is not None:
        tracker.note(f"resuming at step {start} from {last['path']}")
    for note in notes:
        tracker.note(f"  chosen: {note}")
    return Run(config, folder, service, training, tracker, start)


def check(config: Any) -> None:
    """Settings that no recipe can train with, named."""
    problems = []
    if not config.data:
        problems.append("data: a training data file is required")
    for key in ("steps", "batch_size", "rank"):
        value = getattr(config, key, None)
        if value is not None and value < 1:
            problems.append(f"{key}: expected at least 1, got {value}")
    if config.learning_rate is not None and not config.learning_rate > 0:
        problems.append(f"learning_rate: expected > 0, got {config.learning_rate}")
    if config.steps is not None and not 0 <= config.warmup_steps <= config.steps:
        problems.append(
            f"warmup_steps: expected 0..steps ({config.steps}), got {config.warmup_steps}"
        )
    if config.save_every < 0 or (config.eval_every is not None and config.eval_every < 1):
        problems.append("save_every: expected >= 0; eval_every: expected >= 1")
    if problems:
        raise ValueError("; ".join(problems))


def adam_params(config: Any, step: int) -> AdamParams:
    """AdamW for step `step` (0-based): the peak LR × the schedule's multiplier."""
    multiplier = lr_multiplier(config.lr_schedule, step, config.steps, config.warmup_steps)
    return AdamParams(
        learning_rate=config.learning_rate * multiplier,
        beta1=BETA1,
        beta2=BETA2,
        eps=EPS,
        weight_decay=config.weight_decay,
        grad_clip_norm=config.grad_clip_norm,
    )


Parts = list[tuple[list[Datum], APIFuture[ForwardBackwardOutput]]]


def submit(
    run: Run,
    data: list[Datum],
    loss_fn: Any,
    loss_fn_config: dict[str, float] | None = None,
    *,
    backward: bool = True,
    reference: str | None = None,
    group: int = 1,
) -> Parts:
    """`forward_backward` (or `forward`) on `data` in pieces of at most `tokens_per_request`
    tokens (groups of `group` kept whole), all submitted at once: gradients add up across the
    pieces until `optim_step`, as if the batch had been one request."""
    call = run.training.forward_backward if backward else run.training.forward
    return [
        (piece, call(piece, loss_fn, loss_fn_config, reference=reference))
        for piece in token_chunks(data, run.config.tokens_per_request, group)
    ]


def summed(parts: Parts, key: str) -> float:
    """A `:sum` metric over all pieces."""
    return sum(future.result().metrics[key] for _, future in parts)


def averaged(parts: Parts, key: str, weight: Callable[[list[Datum]], float]) -> float:
    """A `:mean` metric over all pieces, each weighted by `weight(piece)` (what it averages)."""
    weights = [weight(piece) for piece, _ in parts]
    values = [future.result().metrics[key] for _, future in parts]
    return sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)


def due(every: int | None, step: int) -> bool:
    return bool(every) and step % every == 0  # type: ignore[operator]


def save_checkpoint(
    run: Run, step: int, *, final: bool | None = None, eval_loss: float | None = None
) -> str:
    """Save the training state (weights + optimizer) after `step` steps; record it (with the
    eval loss at that step, if any); return its path. `final` defaults to step == steps."""
    final = step == run.config.steps if final is None else final
    path = run.training.save_state(f"step-{step:06d}").result().path
    run.folder.add_checkpoint(step, path, final, eval_loss)
    run.tracker.note(f"saved {path}" + (" (final)" if final else ""))
    return path


def checkpoint_if_due(run: Run, step: int) -> None:
    if due(run.config.save_every, step) or step == run.config.steps:
        save_checkpoint(run, step)
