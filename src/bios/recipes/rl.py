"""Reinforcement learning: sample answers, score them with a reward, reinforce the better ones.

    data     {"prompt": str | messages, ...} per line; the reward reads any field (e.g. "answer")
    loop     for each step:
               sampler = a snapshot of the current weights
               group_size completions of each of the step's prompts, with their logprobs
               reward r of each; advantage A = r − mean of its group (÷ group std: normalize_std)
               groups whose rewards are all equal carry no signal and are left out
               forward_backward(rollouts, loss_fn)     importance_sampling | ppo | cispo, with
                                                      the sampler's logprobs as log q
               optim_step(AdamW, peak LR × schedule(step))
    KL       `kl_coef` > 0 adds a KL penalty to the base model as a term of the loss: the
             combination [(loss_fn, 1), ("kl", kl_coef)], k3 estimator on the sampled tokens,
             computed in the same forward pass (not folded into the advantages, as the Tinker
             cookbook does). With `track_kl` the KL is measured every step even at kl_coef = 0.
    metrics  reward_mean, frac_groups_no_signal, kl (k3 per token, to the base model), entropy
             (−mean log q of the sampled tokens), completion_tokens, policy_loss, grad_norm,
             learning_rate; eval_reward (greedy) on eval_data

Left out on purpose: several optimizer steps per batch of samples (num_substeps), sampling the
next batch while training on this one, multi-turn environments.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bios.client.sampling import SamplingClient
from bios.client.service import ServiceClient
from bios.data.chat import prompt_tokens
from bios.models.loading import load_tokenizer
from bios.recipes.advantages import frac_groups_no_signal, group_advantages, has_signal
from bios.recipes.batches import batch_indices
from bios.recipes.common import (
    adam_params,
    averaged,
    checkpoint_if_due,
    due,
    open_run,
    submit,
    summed,
)
from bios.recipes.config import TrainConfig, option
from bios.recipes.data import PromptExample, load_prompts
from bios.recipes.rewards import RewardFn, load_reward
from bios.recipes.rollouts import entropy_estimate, rollout_datum, sample_groups
from bios.recipes.settings import resolve_recipe
from bios.types import Datum, ModelInput, SamplingParams

POLICY_LOSSES = ("importance_sampling", "ppo", "cispo")


@dataclass
class RLConfig(TrainConfig):
    reward: str | Callable[..., float] = option(  # noqa: RUF009 (option() is a field)
        "exact_match", "exact_match, or module:function / file.py:function (completion, example)"
    )
    group_size: int = option(8, "completions sampled per prompt")
    max_tokens: int = option(64, "most tokens per completion")
    temperature: float = option(1.0, "sampling temperature")
    loss_fn: str = option("importance_sampling", "policy-gradient loss", POLICY_LOSSES)
    normalize_std: bool = option(False, "divide advantages by their group's reward std")
    kl_coef: float = option(0.0, "weight of a KL penalty to the base model")
    track_kl: bool = option(True, "measure the KL to the base model every step")


def completion_tokens(data: list[Datum]) -> float:
    return sum(sum(d.loss_fn_inputs["weights"].data) for d in data)


def eval_reward(
    sampler: SamplingClient,
    tokenizer,
    prompts: list[list[int]],
    examples: list[PromptExample],
    reward: RewardFn,
    max_tokens: int,
) -> float:
    """Mean reward of the greedy completion of each held-out prompt."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    futures = [sampler.sample(ModelInput.from_ints(p), 1, params) for p in prompts]
    texts = [
        tokenizer.decode(f.result().sequences[0].tokens, skip_special_tokens=True) for f in futures
    ]
    return statistics.fmean(reward(t, e.record) for t, e in zip(texts, examples, strict=True))


def run(config: RLConfig, service: ServiceClient | None = None) -> Path:
    """Train; return the run folder (config.json, metrics.jsonl, checkpoints.jsonl)."""
    reward, needs = load_reward(config.reward)
    why = f"needed by the reward {config.reward!r}"
    examples = load_prompts(config.data, needs, why)
    eval_examples = load_prompts(config.eval_data, needs, why) if config.eval_data else []
    tokenizer = load_tokenizer(config.model)
    prompts = [prompt_tokens(tokenizer, e.prompt) for e in examples]
    eval_prompts = [prompt_tokens(tokenizer, e.prompt) for e in eval_examples]

    run_ = open_run(config, "rl", service, lambda c: resolve_recipe(c, "rl", len(prompts)))
    config, training, tracker = run_.config, run_.training, run_.tracker
    use_kl = config.kl_coef > 0 or config.track_kl
    loss_fn: Any = [(config.loss_fn, 1.0), ("kl", config.kl_coef)] if use_kl else config.loss_fn
    params = SamplingParams(max_tokens=config.max_tokens, temperature=config.temperature)
    try:
        for step in range(run_.start_step, config.steps):
            sampler = training.save_weights_and_get_sampling_client()
            if eval_examples and step == 0:
                score = eval_reward(
                    sampler, tokenizer, eval_prompts, eval_examples, reward, config.max_tokens
                )
                tracker.log(0, {"eval_reward": score})
            indices = batch_indices(len(prompts), config.batch_size, step, config.seed)
            groups = sample_groups(
                sampler, [prompts[i] for i in indices], config.group_size, params, config.seed, step
            )
            rewards = [
                [
                    reward(tokenizer.decode(r.tokens, skip_special_tokens=True), examples[i].record)
                    for r in group
                ]
                for i, group in zip(indices, groups, strict=True)
            ]
            kept = [  # (rollout, advantage); a group with equal rewards has A = 0 throughout
                (rollout, advantage)
                for group, group_rewards in zip(groups, rewards, strict=True)
                if has_signal(group_rewards) or config.kl_coef > 0
                for rollout, advantage in zip(
                    group, group_advantages(group_rewards, config.normalize_std), strict=True
                )
            ]
            data = [rollout_datum(r, [a] * len(r.tokens), with_weights=use_kl) for r, a in kept]
            adam = adam_params(config, step)
            metrics: dict[str, float] = {
                "reward_mean": statistics.fmean(r for g in rewards for r in g),
                "frac_groups_no_signal": frac_groups_no_signal(rewards),
                "entropy": entropy_estimate(groups),
                "completion_tokens": statistics.fmean(len(r.tokens) for g in groups for r in g),
                "learning_rate": adam.learning_rate,
            }
            if data:  # else every group had equal rewards: nothing to learn from this batch
                parts = submit(run_, data, loss_fn)
                update = training.optim_step(adam)
                policy_loss = summed(parts, f"{config.loss_fn}/loss:sum" if use_kl else "loss:sum")
                metrics["policy_loss"] = policy_loss / sum(len(r.tokens) for r, _ in kept)
                if use_kl:  # per completion token: weight each piece by its completion tokens
                    metrics["kl"] = averaged(parts, "kl/kl:mean", completion_tokens)
                metrics["grad_norm"] = update.result().metrics["grad_norm"]
            if eval_examples and (due(config.eval_every, step + 1) or step + 1 == config.steps):
                sampler = training.save_weights_and_get_sampling_client()
                metrics["eval_reward"] = eval_reward(
                    sampler, tokenizer, eval_prompts, eval_examples, reward, config.max_tokens
                )
            tokens = sum(len(r.prompt) + len(r.tokens) for g in groups for r in g)
            tracker.log(step + 1, metrics, tokens=tokens)
            checkpoint_if_due(run_, step + 1)
    finally:
        tracker.close()
    return run_.folder.path
