"""A module's own `forward`, replaced on the instance for the model's life (`bios.models.swiglu`,
`bios.models.rms_norm`).

The replacement is `partial(function, module)`, not a closure: `copy.deepcopy` of the model copies
the partial's arguments through its memo, so a copy's forward calls the copy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn


def install(module: nn.Module, function: Callable) -> None:
    """`module(x)` runs `function(module, x)` from now on."""
    module.forward = partial(function, module)


def runs(module: nn.Module, function: Callable) -> bool:
    """Whether `module` runs `function` on itself (installed by `install`)."""
    forward = module.__dict__.get("forward")
    return (
        isinstance(forward, partial)
        and forward.func is function
        and len(forward.args) == 1
        and forward.args[0] is module
    )
