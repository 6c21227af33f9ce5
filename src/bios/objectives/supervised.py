"""Learning from examples."""

from __future__ import annotations

import torch

from bios.objectives.base import Inputs, LossOutput


def cross_entropy(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Weighted negative log-likelihood of the target tokens.

        L = -Σ_t w_t · log p_θ(x_t)

    `weights` is 0 on prompt tokens and 1 on completion tokens for plain SFT; any other
    normalisation (per-sequence mean, class weighting) goes into the weights.
    """
    loss = -(logprobs * inputs["weights"]).sum()
    return loss, {}
