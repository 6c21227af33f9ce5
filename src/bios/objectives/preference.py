"""Preference learning on (chosen, rejected) pairs: data[2k] is chosen, data[2k+1] rejected.

Each sequence's log-probability is Σ_t w_t · log p(x_t) over its `weights` (1 on the response,
0 on the prompt), for the policy π_θ and the reference π_ref alike. With

    h = β · [(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]

(the reward margin: β times the difference of implicit rewards), the losses, summed over pairs:

    dpo        −[(1 − ε) log σ(h) + ε log σ(−h)]      (ε = `label_smoothing`, default 0)
    dpo_hinge  max(0, 1 − h)                           (the margin / SLiC form)
    ipo        (h/β − 1/(2β))²                         (IPO: regress the log-ratio gap to 1/(2β))

β (`beta`) defaults to 0.1. Metrics: `loss:sum`, `reward_margin:mean` (h), `accuracy:mean`
(fraction of pairs with h > 0), `chosen_reward:mean`, `rejected_reward:mean`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bios.objectives.base import REF_LOGPROBS, Inputs, LossOutput, sequence_sums


def _rewards(logprobs: torch.Tensor, inputs: Inputs, beta: float):
    """β · (log π_θ − log π_ref) per sequence, split into chosen and rejected."""
    weights = inputs["weights"]
    log_ratio = sequence_sums((logprobs - inputs[REF_LOGPROBS]) * weights, inputs)
    rewards = beta * log_ratio
    return rewards[0::2], rewards[1::2]


def _metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    margin = (chosen - rejected).detach()
    return {
        "reward_margin:mean": float(margin.mean()),
        "accuracy:mean": float((margin > 0).float().mean()),
        "chosen_reward:mean": float(chosen.detach().mean()),
        "rejected_reward:mean": float(rejected.detach().mean()),
    }


def dpo(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Direct preference optimisation, sigmoid loss with optional label smoothing."""
    chosen, rejected = _rewards(logprobs, inputs, config["beta"])
    margin = chosen - rejected
    smoothing = config["label_smoothing"]
    loss = -((1 - smoothing) * F.logsigmoid(margin) + smoothing * F.logsigmoid(-margin)).sum()
    return loss, _metrics(chosen, rejected)


def dpo_hinge(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Hinge (margin) form of DPO: pairs whose margin already exceeds 1 give no gradient."""
    chosen, rejected = _rewards(logprobs, inputs, config["beta"])
    loss = torch.relu(1 - (chosen - rejected)).sum()
    return loss, _metrics(chosen, rejected)


def ipo(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Identity preference optimisation: a squared loss that does not push margins to infinity."""
    beta = config["beta"]
    chosen, rejected = _rewards(logprobs, inputs, beta)
    gap = (chosen - rejected) / beta
    loss = ((gap - 1 / (2 * beta)) ** 2).sum()
    return loss, _metrics(chosen, rejected)
