"""Learning from examples."""

from __future__ import annotations

import torch

from bios.objectives.base import Inputs, LossOutput


def cross_entropy(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Weighted negative log-likelihood of the target tokens.

        L = -Σ_t w_t · log p_θ(x_t)

    `weights` is 0 on prompt tokens and 1 on completion tokens for plain SFT; any other
    normalisation (per-sequence mean, class weighting) goes into the weights.

    Soft targets (top-K distillation): with (N, K) `target_tokens` and `weights`, each position
    has K targets x_{t,k} and

        L = -Σ_t Σ_k w_{t,k} · log p_θ(x_{t,k} | tokens_≤t)

    (the student's logprobs of the K tokens, `logprobs` (N, K)); w_{t,k} = the teacher's
    probability of x_{t,k} (renormalised over its top K, or not) gives the cross-entropy to the
    teacher's truncated distribution. The same formula as above, summed over k as well.
    """
    loss = -(logprobs * inputs["weights"]).sum()
    return loss, {}
