"""What every objective is: a pure function of per-token log-probabilities.

    fn(logprobs, inputs, config) -> (loss, metrics)

`logprobs` is log p_θ of the target tokens (1-D, with gradient), `inputs` holds the other
`loss_fn_inputs` as tensors of the same length, `config` is `loss_fn_config`. The loss is a
scalar summed over tokens; metrics are floats named `name:reduction`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Inputs = Mapping[str, torch.Tensor]
LossOutput = tuple[torch.Tensor, dict[str, float]]
ObjectiveFn = Callable[[torch.Tensor, Inputs, dict[str, float]], LossOutput]


@dataclass(frozen=True)
class Objective:
    """A named objective and the inputs and config keys it reads.

    `config` maps each accepted `loss_fn_config` key to its default; a default of None means the
    key is required.
    """

    name: str
    fn: ObjectiveFn
    required_inputs: tuple[str, ...]
    optional_inputs: tuple[str, ...] = ()
    config: Mapping[str, float | None] = field(default_factory=dict)

    @property
    def accepted_inputs(self) -> tuple[str, ...]:
        return ("target_tokens", *self.required_inputs, *self.optional_inputs)
