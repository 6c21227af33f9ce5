"""Maximising rewards: policy-gradient objectives on samples drawn from a sampler q.

All take per-token `logprobs` (log p_θ of the targets, with gradient), the sampler's `logprobs`
(log q, as `inputs["logprobs"]`) and `advantages` A (0 on prompt tokens). The ratio is
r_t = exp(log p_θ(x_t) - log q(x_t)). Token losses are summed, never averaged.
"""

from __future__ import annotations

import torch

from bios.objectives.base import DATUM_INDEX, Inputs, LossOutput, sequence_sums

# PPO's and CISPO's clip range [lo, hi] when neither the data nor the config gives one.
CLIP_DEFAULTS = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}


def _ratio(logprobs: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return torch.exp(logprobs - inputs["logprobs"])


def _clip_bounds(inputs: Inputs, config: dict[str, float]):
    """Per-token thresholds from `loss_fn_inputs` win over scalars from `loss_fn_config`, which
    win over `CLIP_DEFAULTS`."""
    bounds = {**CLIP_DEFAULTS, **config}
    lo = inputs.get("clip_low_threshold", bounds["clip_low_threshold"])
    hi = inputs.get("clip_high_threshold", bounds["clip_high_threshold"])
    return lo, hi


def _clamp(ratio: torch.Tensor, lo, hi) -> torch.Tensor:
    return torch.minimum(torch.maximum(ratio, torch.as_tensor(lo)), torch.as_tensor(hi))


def importance_sampling(
    logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]
) -> LossOutput:
    """Importance-weighted policy gradient.

    L = -Σ_t r_t · A_t
    """
    loss = -(_ratio(logprobs, inputs) * inputs["advantages"]).sum()
    return loss, {}


def ppo(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Clipped-ratio policy gradient (PPO), lo/hi default 0.8/1.2.

    L = -Σ_t min(r_t · A_t, clip(r_t, lo, hi) · A_t)
    """
    ratio = _ratio(logprobs, inputs)
    return _clipped_surrogate(ratio, inputs["advantages"], *_clip_bounds(inputs, config))


def cispo(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Clipped importance-sampling policy optimisation (CISPO), lo/hi default 0.8/1.2.

        L = -Σ_t sg(clip(r_t, lo, hi)) · log p_θ(x_t) · A_t

    The clipped ratio is a constant weight (stop-gradient), so every token keeps a gradient.
    """
    lo, hi = _clip_bounds(inputs, config)
    weight = _clamp(_ratio(logprobs, inputs), lo, hi).detach()
    loss = -(weight * logprobs * inputs["advantages"]).sum()
    return loss, {}


def gspo(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Group sequence policy optimisation, token-level variant (GSPO-token; Zheng et al. 2025),
    as Tinker defines it. Over the tokens M of a sequence that `sequence_ratio_mask` marks (≠ 0),
    the sequence ratio is the geometric mean of the token ratios,

        s = exp( (1/|M|) Σ_{t∈M} (log p_θ(x_t) - log q(x_t)) )

    and every token of the sequence carries s's value with its own log-probability's gradient,
    s_t = sg(s) · p_θ(x_t) / sg(p_θ(x_t)); then, as PPO,

        L = -Σ_t min(s_t · A_t, clip(s_t, lo, hi) · A_t)      lo/hi default 0.8/1.2

    Metrics: `clip_fraction:mean` (tokens with A ≠ 0 whose s_t is outside [lo, hi]).
    """
    mask = (inputs["sequence_ratio_mask"] != 0).to(logprobs.dtype)
    log_ratio = (logprobs.detach() - inputs["logprobs"]) * mask
    per_sequence = sequence_sums(log_ratio, inputs) / sequence_sums(mask, inputs)
    sequence_log_ratio = per_sequence[inputs[DATUM_INDEX]]
    ratio = torch.exp(sequence_log_ratio + logprobs - logprobs.detach())
    return _clipped_surrogate(ratio, inputs["advantages"], *_clip_bounds(inputs, config))


def dro(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
    """Direct reward optimisation with a quadratic penalty (β from `loss_fn_config["beta"]`).

    L = -Σ_t [log p_θ(x_t) · A_t - ½ β (log p_θ(x_t) - log q(x_t))²]
    """
    beta = config["beta"]
    penalty = 0.5 * beta * (logprobs - inputs["logprobs"]) ** 2
    loss = -(logprobs * inputs["advantages"] - penalty).sum()
    return loss, {}


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, lo: float, hi: float
) -> LossOutput:
    """-Σ_t min(r_t · A_t, clip(r_t, lo, hi) · A_t), and the fraction of tokens with an advantage
    whose ratio was clipped (`clip_fraction:mean`): PPO's and GSPO's surrogate."""
    clipped = _clamp(ratio, lo, hi)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    with torch.no_grad():
        active = advantages != 0
        was_clipped = (clipped != ratio) & active
        clip_fraction = was_clipped.sum() / active.sum().clamp(min=1)
    return loss, {"clip_fraction:mean": float(clip_fraction)}
