"""On-policy distillation: the student samples, a teacher scores every sampled token, and the
student learns to write what the teacher would (the Tinker cookbook's recipe).

    data     {"prompt": str | messages} per line (other fields are ignored)
    loop     for each step:
               sampler = a snapshot of the student's current weights
               group_size completions of each of the step's prompts, at temperature 1, with
               the student's logprobs log π_S of each token
               the teacher's logprobs log π_T of the same tokens (`compute_logprobs`)
               per-token advantage a_t = c·(log π_T − log π_S) − (its batch mean)
               forward_backward(rollouts, loss_fn)     importance_sampling with log q = log π_S
               optim_step(AdamW, peak LR × schedule(step))
             The expected gradient is that of −c · KL(π_S ‖ π_T) per token: the reverse KL, on
             the student's own samples, so it learns where it actually goes.
    teacher  a model (name, folder) or a checkpoint (bios:// path or run folder) with the same
             tokenizer as the student
    metrics  teacher_kl (mean log π_S − log π_T per sampled token: the reverse KL),
             entropy, completion_tokens, policy_loss, grad_norm, learning_rate;
             eval_teacher_kl on eval_data (one sample per prompt)

Left out on purpose: mixing in an RL reward, discounting the per-token KL over later tokens
(the cookbook's kl_discount_factor, 0 by default there too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bios.client.sampling import SamplingClient
from bios.client.service import ServiceClient
from bios.data.chat import prompt_tokens
from bios.models.loading import load_tokenizer
from bios.recipes.advantages import mean_reverse_kl, reverse_kl_advantages
from bios.recipes.batches import batch_indices
from bios.recipes.common import (
    adam_params,
    checkpoint_if_due,
    due,
    open_run,
    submit,
    summed,
)
from bios.recipes.config import TrainConfig, option
from bios.recipes.data import load_prompts
from bios.recipes.rl import POLICY_LOSSES
from bios.recipes.rollouts import Rollout, entropy_estimate, rollout_datum, sample_groups
from bios.recipes.run_folder import RunFolder, checkpoint_path
from bios.recipes.settings import resolve_recipe
from bios.types import ModelInput, SamplingParams

EVAL_STREAM = 2**32  # the "step" of evaluation samples: the same seeds at every evaluation


@dataclass
class DistillConfig(TrainConfig):
    teacher: str = option(
        "", "teacher: a model, or a bios:// path / run folder (same tokenizer)", metavar="MODEL"
    )
    group_size: int = option(4, "completions sampled per prompt")
    max_tokens: int = option(64, "most tokens per completion")
    kl_coef: float = option(1.0, "scale c of the reverse-KL advantages")
    loss_fn: str = option("importance_sampling", "policy-gradient loss", POLICY_LOSSES)


def teacher_client(service: ServiceClient, teacher: str) -> SamplingClient:
    """A sampler on the teacher: saved weights (a path or a run folder) or a model."""
    if not teacher:
        raise ValueError("teacher: a teacher model or checkpoint is required")
    if teacher.startswith(("bios://", "tinker://")) or RunFolder(teacher).saved_config():
        return service.create_sampling_client(model_path=checkpoint_path(teacher))
    return service.create_sampling_client(base_model=teacher)


def teacher_logprobs(teacher: SamplingClient, rollouts: list[Rollout]) -> list[list[float]]:
    """log π_T of each rollout's completion tokens (all requests submitted first)."""
    futures = [
        teacher.compute_logprobs(ModelInput.from_ints(r.prompt + r.tokens)) for r in rollouts
    ]
    return [f.result()[len(r.prompt) :] for f, r in zip(futures, rollouts, strict=True)]


def run(config: DistillConfig, service: ServiceClient | None = None) -> Path:
    """Train; return the run folder (config.json, metrics.jsonl, checkpoints.jsonl)."""
    examples = load_prompts(config.data)
    eval_examples = load_prompts(config.eval_data) if config.eval_data else []
    tokenizer = load_tokenizer(config.model)
    prompts = [prompt_tokens(tokenizer, e.prompt) for e in examples]
    eval_prompts = [prompt_tokens(tokenizer, e.prompt) for e in eval_examples]

    resolve = lambda c: resolve_recipe(c, "distill", len(prompts))  # noqa: E731
    run_ = open_run(config, "distill", service, resolve)
    config, training, tracker = run_.config, run_.training, run_.tracker
    teacher = teacher_client(run_.service, config.teacher)
    if len(teacher.get_tokenizer()) != len(tokenizer):
        raise ValueError(f"teacher: {config.teacher} has a different tokenizer than the student")
    params = SamplingParams(max_tokens=config.max_tokens, temperature=1.0)

    def eval_kl(sampler: SamplingClient) -> float:
        groups = sample_groups(sampler, eval_prompts, 1, params, config.seed, EVAL_STREAM)
        rollouts = [r for g in groups for r in g]
        return mean_reverse_kl([r.logprobs for r in rollouts], teacher_logprobs(teacher, rollouts))

    try:
        for step in range(run_.start_step, config.steps):
            sampler = training.save_weights_and_get_sampling_client()
            if eval_examples and step == 0:
                tracker.log(0, {"eval_teacher_kl": eval_kl(sampler)})
            indices = batch_indices(len(prompts), config.batch_size, step, config.seed)
            groups = sample_groups(
                sampler, [prompts[i] for i in indices], config.group_size, params, config.seed, step
            )
            rollouts = [r for group in groups for r in group]
            student = [r.logprobs for r in rollouts]
            teacher_lps = teacher_logprobs(teacher, rollouts)
            advantages = reverse_kl_advantages(student, teacher_lps, config.kl_coef)
            data = [rollout_datum(r, a) for r, a in zip(rollouts, advantages, strict=True)]
            adam = adam_params(config, step)
            parts = submit(run_, data, config.loss_fn)
            update = training.optim_step(adam)
            completion = sum(len(r.tokens) for r in rollouts)
            metrics = {
                "teacher_kl": mean_reverse_kl(student, teacher_lps),
                "entropy": entropy_estimate(groups),
                "completion_tokens": completion / len(rollouts),
                "policy_loss": summed(parts, "loss:sum") / completion,
                "learning_rate": adam.learning_rate,
                "grad_norm": update.result().metrics["grad_norm"],
            }
            if eval_examples and (due(config.eval_every, step + 1) or step + 1 == config.steps):
                metrics["eval_teacher_kl"] = eval_kl(
                    training.save_weights_and_get_sampling_client()
                )
            tokens = sum(len(r.prompt) + len(r.tokens) for r in rollouts)
            tracker.log(step + 1, metrics, tokens=tokens)
            checkpoint_if_due(run_, step + 1)
    finally:
        tracker.close()
    return run_.folder.path
