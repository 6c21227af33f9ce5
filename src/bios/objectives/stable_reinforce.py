"""StableReinforce: REINFORCE on tokens sampled from another policy, kept stable by what the
sampler recorded. The sampling side is Tinker's (sample with `record_stability_info=True`,
name each training token's sampled sequence with provenance spans, `kl_coeff` in the config);
what is recorded and the objective below are Bios's own definition, since Tinker publishes them
only in outline.

What Bios records per sampled sequence (`bios.engine.provenance`): its tokens and, for each,
log μ(x_t), the logprob of the token under the distribution it was actually drawn from (after
temperature and top-k/top-p), as the sampler computed it. The engine fills `SAMPLER_LOGPROBS`
(log μ) and `SAMPLED` (1 on tokens a sampled span covers) from it, so the ratio's denominator
is the sampler's own number, whatever the client sends.

With ρ_t = exp(log p_θ(x_t) − log μ(x_t)) on the sampled tokens S:

    L = Σ_{t∈S} [ −sg(min(ρ_t, C)) · A_t · log p_θ(x_t)  +  (β/2) · (log p_θ(x_t) − log μ(x_t))² ]

- the first term is the importance-weighted policy gradient with the weight truncated at C
  (`ratio_cap`, default 2): its gradient is −min(ρ_t, C) A_t ∇log p_θ(x_t), the off-policy
  REINFORCE gradient where ρ_t ≤ C and a bounded one where the trained policy has moved far from
  the sampler (truncated importance sampling: Ionides 2008; IMPALA's ρ̄, Espeholt et al. 2018;
  TIS for LLM RL, Yao et al. 2025);
- the second is a squared log-ratio trust region to the sampler (the regulariser of Kimi k1.5's
  policy mirror descent, 2025): it pulls log p_θ towards log μ on the sampled tokens with a
  gradient β · (log p_θ − log μ), linear in the log-ratio. β is `kl_coeff`, default 0.

Advantages must be 0 outside S (the engine checks it). Metrics: `importance_ratio:mean` (ρ over
S), `clip_fraction:mean` (fraction of S with ρ > C), `sampler_kl:mean` (the k3 estimate
ρ − 1 − log ρ over S, unbiased for KL(μ ‖ p_θ) since x_t ~ μ).
"""

from __future__ import annotations

import torch

from bios.objectives.base import SAMPLED, SAMPLER_LOGPROBS, Inputs, LossOutput

STABLE_REINFORCE_DEFAULTS = {"kl_coeff": 0.0, "ratio_cap": 2.0}


def stable_reinforce(
    logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]
) -> LossOutput:
    """The loss in the module docstring: truncated-IS REINFORCE plus a log-ratio trust region."""
    settings = {**STABLE_REINFORCE_DEFAULTS, **config}
    sampled = inputs[SAMPLED].to(logprobs.dtype)
    log_ratio = (logprobs - inputs[SAMPLER_LOGPROBS]) * sampled
    ratio = torch.exp(log_ratio.detach())
    weight = torch.clamp(ratio, max=settings["ratio_cap"])
    policy = -(sampled * weight * inputs["advantages"] * logprobs).sum()
    trust = 0.5 * settings["kl_coeff"] * (log_ratio**2).sum()
    with torch.no_grad():
        count = sampled.sum().clamp(min=1)
        k3 = (ratio - 1 - log_ratio.detach()) * sampled
        metrics = {
            "importance_ratio:mean": float((ratio * sampled).sum() / count),
            "clip_fraction:mean": float(((ratio > settings["ratio_cap"]) * sampled).sum() / count),
            "sampler_kl:mean": float(k3.sum() / count),
        }
    return policy + trust, metrics
