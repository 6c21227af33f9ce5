"""Built-in objectives and the registry that maps their names to functions."""

from __future__ import annotations

from bios.objectives.base import Inputs, LossOutput, Objective, ObjectiveFn
from bios.objectives.policy import cispo, dro, importance_sampling, ppo
from bios.objectives.supervised import cross_entropy

_CLIP = ("clip_low_threshold", "clip_high_threshold")

OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective("cross_entropy", cross_entropy, required_inputs=("weights",)),
        Objective("importance_sampling", importance_sampling, ("logprobs", "advantages")),
        Objective(
            "ppo",
            ppo,
            ("logprobs", "advantages"),
            optional_inputs=_CLIP,
            config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        Objective(
            "cispo",
            cispo,
            ("logprobs", "advantages"),
            optional_inputs=_CLIP,
            config={"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
        ),
        Objective("dro", dro, ("logprobs", "advantages"), config={"beta": None}),
    )
}


def get_objective(name: str) -> Objective:
    """The objective called `name`; a KeyError lists the known names."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        known = ", ".join(sorted(OBJECTIVES))
        raise KeyError(f"unknown loss_fn {name!r}; expected one of: {known}") from None


__all__ = ["OBJECTIVES", "Inputs", "LossOutput", "Objective", "ObjectiveFn", "get_objective"]
