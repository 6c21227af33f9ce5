"""Custom objectives: the user's loss function, the checks of what it returns, and how a remote
client runs it (linearised into `cross_entropy`).

`loss_fn(data, per_datum) -> (loss, metrics)` is Tinker's signature: `per_datum` holds each
datum's target logprobs (N,), or with `loss_type_input="logits"` its (N, vocab) logits.

For any loss L(logprobs), the surrogate Σ_t w_t · log p(x_t) with w = −∂L/∂logprobs has the same
parameter gradient as L at the current weights. So a client that can only ask for logprobs and
send `cross_entropy` requests (Tinker's SDK, Bios's HTTP transport) computes ∂L/∂logprobs itself
and sends these weights. In-process Bios runs the loss on the live graph instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from bios.errors import InvalidInputError
from bios.types import Datum

CustomLossFn = Callable[[list[Datum], list[torch.Tensor]], tuple[torch.Tensor, dict[str, float]]]
CUSTOM_INPUT_TYPES = ("logprobs", "logits")


def check_custom_loss(
    loss_fn: object,
    loss_type_input: str,
    available: Sequence[str] = CUSTOM_INPUT_TYPES,
    why: str = "",
) -> None:
    """A custom loss request's own arguments: a callable, and an input type this transport has
    (`why` says why a transport offers fewer than `CUSTOM_INPUT_TYPES`)."""
    if not callable(loss_fn):
        raise InvalidInputError("loss_fn", f"expected a callable, got {loss_fn!r}")
    if loss_type_input not in available:
        raise InvalidInputError(
            "loss_type_input",
            f"expected one of {tuple(available)}, got {loss_type_input!r}" + why,
        )


def checked_custom_result(result: object) -> tuple[torch.Tensor, dict[str, float]]:
    """The (loss, metrics) a custom loss returned, or an error saying what is wrong with it."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise InvalidInputError(
            "loss_fn", f"must return (loss, metrics), got {type(result).__name__}"
        )
    loss, metrics = result
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InvalidInputError("loss_fn", f"returned loss {shape}; expected a scalar tensor")
    if not torch.isfinite(loss.detach()).all():
        raise InvalidInputError("loss_fn", f"returned a non-finite loss ({loss.item()})")
    if loss.grad_fn is None:
        raise InvalidInputError(
            "loss_fn", "returned a loss not computed from the logprobs it was given (no gradient)"
        )
    if not isinstance(metrics, dict):
        raise InvalidInputError("loss_fn", f"metrics must be a dict, got {type(metrics).__name__}")
    try:
        metrics = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as error:
        raise InvalidInputError("loss_fn", f"metrics values must be numbers ({error})") from None
    return loss.reshape(()), metrics


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
