"""Sampling groups of completions and turning them into policy-gradient `Datum`s.

Shared by the RL and distillation recipes. A rollout is one sampled completion of a prompt: its
tokens (the stop token included, as sampled) and the sampler's logprob of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from bios.client.sampling import SamplingClient
from bios.types import Datum, ModelInput, SamplingParams


@dataclass(frozen=True)
class Rollout:
    prompt: list[int]
    tokens: list[int]
    logprobs: list[float]


def sample_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of prompt `index` at step `step`: fixed by (seed, step, index), so a
    resumed run draws the same samples as an uninterrupted one."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0])


def sample_groups(
    sampler: SamplingClient,
    prompts: Sequence[list[int]],
    group_size: int,
    params: SamplingParams,
    seed: int,
    step: int,
) -> list[list[Rollout]]:
    """`group_size` completions of each prompt. All requests are submitted before any result is
    awaited, so the sampler decodes them together in one batch."""
    futures = [
        sampler.sample(
            ModelInput.from_ints(prompt),
            group_size,
            params.model_copy(update={"seed": sample_seed(seed, step, i)}),
        )
        for i, prompt in enumerate(prompts)
    ]
    return [
        [Rollout(prompt, list(s.tokens), list(s.logprobs or [])) for s in future.result().sequences]
        for prompt, future in zip(prompts, futures, strict=True)
    ]


def rollout_datum(
    rollout: Rollout, advantages: Sequence[float], with_weights: bool = False
) -> Datum:
    """A Datum for `importance_sampling` / `ppo` / `cispo`: the whole sequence prompt + completion,
    shifted by one, with the sampler's logprobs and the advantages on the completion's tokens
    and zeros on the prompt's. `advantages` has one value per completion token.
    `with_weights` adds weights (1 on the completion) for a `kl` term in a combination."""
    if len(advantages) != len(rollout.tokens) or len(rollout.logprobs) != len(rollout.tokens):
        raise ValueError("one advantage and one logprob per completion token")
    pad = [0.0] * (len(rollout.prompt) - 1)
    tokens = rollout.prompt + rollout.tokens
    inputs = {
        "target_tokens": tokens[1:],
        "logprobs": pad + list(rollout.logprobs),
        "advantages": pad + [float(a) for a in advantages],
    }
    if with_weights:
        inputs["weights"] = pad + [1.0] * len(rollout.tokens)
    return Datum(model_input=ModelInput.from_ints(tokens[:-1]), loss_fn_inputs=inputs)


def entropy_estimate(groups: Sequence[Sequence[Rollout]]) -> float:
    """−mean log π(x_t) over every sampled token: an unbiased per-token estimate of the entropy of
    the distribution sampled from (at temperature 1, the policy's own)."""
    logprobs = [lp for group in groups for r in group for lp in r.logprobs]
    return -float(np.mean(logprobs)) if logprobs else 0.0
