"""What every objective is: a pure function of per-token log-probabilities.

    fn(logprobs, inputs, config) -> (loss, metrics)

`logprobs` is log p_θ of the target tokens of the whole batch, flattened in datum order (1-D,
with gradient). `inputs` holds the other `loss_fn_inputs` flattened the same way, plus
`datum_index` (which datum each token belongs to) for objectives over whole sequences, and
`ref_logprobs` (log π_ref of the targets) for objectives that compare with a reference policy.
With soft targets (K targets per position) `logprobs` and the 2-D inputs are (tokens, K).
`config` is `loss_fn_config` with defaults filled in. The loss is a scalar, summed over tokens
(or sequences, or pairs); metrics are floats named `name:reduction`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Inputs = Mapping[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, dict[str, float]]
ObjectiveFn = Callable[[torch.Tensor, Inputs, dict[str, float]], LossOutput]

DATUM_INDEX = "datum_index"
REF_LOGPROBS = "ref_logprobs"
# Filled in by the engine from what was recorded when the tokens were sampled (objectives with
# `provenance`), never sent by a client: log μ(x_t), the logprob of the sampled token under the
# distribution it was drawn from (0 elsewhere), and 1 on sampled tokens, 0 elsewhere.
SAMPLER_LOGPROBS = "sampler_logprobs"
SAMPLED = "sampled"


@dataclass(frozen=True)
class Objective:
    """A named objective and the inputs and config keys it reads.

    `config` maps each accepted `loss_fn_config` key to its default; a default of None means the
    key is required. `needs_reference`: `ref_logprobs` are computed from a reference model when
    the data do not carry them. `pairs`: the data are (chosen, rejected) pairs, data[2k] and
    data[2k+1]. `soft_targets`: `target_tokens` (and `weights`) may be (N, K), K targets per
    position, and `logprobs` is then (N, K). `provenance`: the data must carry provenance spans,
    from which the engine fills `SAMPLER_LOGPROBS` and `SAMPLED`. `linear`: the loss is
    Σ c · logprobs with coefficients c that do not depend on the logprobs (`cross_entropy`), so
    ∂L/∂logprobs is known before the forward pass and the engine computes the unembedding's
    gradient inside it (`engine/forward.py`).
    """

    name: str
    fn: ObjectiveFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config: Mapping[str, float | None] = field(default_factory=dict)
    needs_reference: bool = False
    pairs: bool = False
    soft_targets: bool = False
    provenance: bool = False
    linear: bool = False
    # Per config key: (is the value acceptable?, what is expected) — checked before any work.
    config_checks: Mapping[str, tuple[Callable[[float], bool], str]] = field(default_factory=dict)

    @property
    def accepted_inputs(self) -> tuple[str, ...]:
        return ("target_tokens", *self.required_inputs, *self.optional_inputs)


def sequence_sums(values: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """Σ over each datum's tokens of a flat per-token tensor -> one value per datum."""
    index = inputs[DATUM_INDEX]
    count = int(index[-1]) + 1
    zeros = torch.zeros(count, dtype=values.dtype, device=values.device)
    return zeros.index_add(0, index, values)


def token_weights(logprobs: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    """`weights` if the data carry them, else 1 on every token."""
    weights = inputs.get("weights")
    return weights if weights is not None else torch.ones_like(logprobs)


def linear_coefficients(
    objective: Objective, inputs: Inputs, config: dict[str, float], like: torch.Tensor
) -> torch.Tensor:
    """c = ∂L/∂logprobs of a `linear` objective (L = Σ c · logprobs), shaped like `like`.

    The objective's own backward at logprobs = 0 (for a linear objective the point does not
    matter), so c is computed by the very operations that give ∂L/∂logprobs in a step.
    """
    assert objective.linear, objective.name
    probe = torch.zeros_like(like, dtype=torch.float32, requires_grad=True)
    with torch.enable_grad():
        loss, _ = objective.fn(probe, inputs, config)
        (grad,) = torch.autograd.grad(loss, probe, allow_unused=True)
    return grad if grad is not None else torch.zeros_like(probe)
