"""Custom objectives as a remote client must run them: linearised into `cross_entropy`.

For any loss L(logprobs), the surrogate Σ_t w_t · log p(x_t) with w = −∂L/∂logprobs has the same
parameter gradient as L at the current weights. So a client that can only ask for logprobs and
send `cross_entropy` requests (Tinker's SDK, Bios's HTTP transport) computes ∂L/∂logprobs itself
and sends these weights. In-process Bios runs the loss on the live graph instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from bios.types import Datum


def linearised(data: Sequence[Datum], logprobs: Sequence[torch.Tensor]) -> list[Datum]:
    """`cross_entropy` data whose weights are −∂L/∂logprobs (after `loss.backward()`)."""
    return [
        Datum(
            model_input=datum.model_input,
            loss_fn_inputs={
                "target_tokens": datum.loss_fn_inputs["target_tokens"],
                "weights": -lp.grad,
            },
        )
        for datum, lp in zip(data, logprobs, strict=True)
    ]
