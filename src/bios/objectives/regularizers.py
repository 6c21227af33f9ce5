"""KL regularisation to a reference policy π_ref, from tokens sampled from (about) π_θ.

With d_t = log π_θ(x_t) − log π_ref(x_t) on each sampled token, three estimators of
KL(π_θ ‖ π_ref) (Schulman, "Approximating KL divergence"):

    k1 = d                     unbiased value; as a loss its gradient is 0 in expectation
    k2 = ½ d²                  biased value; its gradient, E[d ∇log π_θ], is ∇ KL(π_θ ‖ π_ref)
    k3 = exp(−d) − 1 + d       unbiased, never negative; its gradient is ∇ KL(π_ref ‖ π_θ)

    L = Σ_t w_t · k(d_t)

`estimator` (1, 2 or 3; default 3) picks one; `weights` (1 on completion tokens) restricts the
sum, and without them every target token counts. Use it alone or as a term of a combination,
e.g. `[("ppo", 1.0), ("kl", 0.05)]`. Metrics: `kl:mean` (the k3 estimate per weighted token,
whatever the estimator, so runs are comparable).
"""

from __future__ import annotations

import torch

from bios.objectives.base import REF_LOGPROBS, Inputs, LossOutput, token_weights

ESTIMATORS = (1, 2, 3)


def kl_estimate(log_ratio: torch.Tensor, estimator: int) -> torch.Tensor:
    """k1, k2 or k3 of the per-token log-ratio d = log π_θ − log π_ref."""
    if estimator == 1:
        return log_ratio
    if estimator == 2:
        return 0.5 * log_ratio**2
    if estimator == 3:
        return torch.exp(-log_ratio) - 1 + log_ratio
    raise ValueError(f"estimator: expected one of {ESTIMATORS}, got {estimator}")


def kl(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Σ_t w_t · k(log π_θ(x_t) − log π_ref(x_t))."""
    weights = token_weights(logprobs, inputs)
    log_ratio = logprobs - inputs[REF_LOGPROBS]
    loss = (weights * kl_estimate(log_ratio, int(config["estimator"]))).sum()
    with torch.no_grad():
        k3 = (weights * kl_estimate(log_ratio, 3)).sum() / weights.sum().clamp(min=1e-12)
    return loss, {"kl:mean": float(k3)}
