"""Built-in objectives and the registry that maps their names to functions.

A `loss_fn` is a name (`"ppo"`) or a weighted combination (`[("ppo", 1.0), ("kl", 0.05)]`).
"""

from __future__ import annotations

from collections.abc import Sequence

from bios.objectives.base import (
    DATUM_INDEX,
    REF_LOGPROBS,
    SAMPLED,
    SAMPLER_LOGPROBS,
    Inputs,
    LossOutput,
    Objective,
    ObjectiveFn,
    linear_coefficients,
    sequence_sums,
)
from bios.objectives.combination import combine
from bios.objectives.policy import CLIP_DEFAULTS, cispo, dro, gspo, importance_sampling, ppo
from bios.objectives.preference import dpo, dpo_hinge, ipo
from bios.objectives.regularizers import ESTIMATORS, kl
from bios.objectives.stable_reinforce import STABLE_REINFORCE_DEFAULTS, stable_reinforce
from bios.objectives.supervised import cross_entropy

_CLIP = tuple(CLIP_DEFAULTS)
_POSITIVE = (lambda value: value > 0, "a positive number")
_BETA = {"beta": _POSITIVE}
_NON_NEGATIVE = (lambda value: value >= 0, "a number ≥ 0")


def _preference(name: str, fn: ObjectiveFn, config: dict[str, float]) -> Objective:
    checks = dict(_BETA)
    if "label_smoothing" in config:
        checks["label_smoothing"] = (lambda value: 0 <= value < 0.5, "a number in [0, 0.5)")
    return Objective(
        name,
        fn,
        required_inputs=("weights",),
        optional_inputs=(REF_LOGPROBS,),
        config=config,
        needs_reference=True,
        pairs=True,
        config_checks=checks,
    )


OBJECTIVES: dict[str, Objective] = {
    objective.name: objective
    for objective in (
        Objective(
            "cross_entropy",
            cross_entropy,
            required_inputs=("weights",),
            soft_targets=True,
            linear=True,
        ),
        Objective("importance_sampling", importance_sampling, ("logprobs", "advantages")),
        Objective("ppo", ppo, ("logprobs", "advantages"), _CLIP, config=CLIP_DEFAULTS),
        Objective("cispo", cispo, ("logprobs", "advantages"), _CLIP, config=CLIP_DEFAULTS),
        Objective(
            "gspo",
            gspo,
            ("logprobs", "advantages", "sequence_ratio_mask"),
            _CLIP,
            config=CLIP_DEFAULTS,
        ),
        Objective(
            "stable_reinforce",
            stable_reinforce,
            required_inputs=("advantages",),
            # The client's sampling logprobs may come too; they must agree with the record.
            optional_inputs=("logprobs",),
            config=STABLE_REINFORCE_DEFAULTS,
            provenance=True,
            config_checks={"kl_coeff": _NON_NEGATIVE, "ratio_cap": _POSITIVE},
        ),
        Objective(
            "dro", dro, ("logprobs", "advantages"), config={"beta": None}, config_checks=_BETA
        ),
        _preference("dpo", dpo, {"beta": 0.1, "label_smoothing": 0.0}),
        _preference("dpo_hinge", dpo_hinge, {"beta": 0.1}),
        _preference("ipo", ipo, {"beta": 0.1}),
        Objective(
            "kl",
            kl,
            required_inputs=(),
            optional_inputs=("weights", REF_LOGPROBS),
            config={"estimator": 3.0},
            needs_reference=True,
            config_checks={
                "estimator": (lambda value: value in ESTIMATORS, "1, 2 or 3 (k1, k2, k3)")
            },
        ),
    )
}

LossFn = str | Sequence[tuple[str, float]]


def get_objective(loss_fn: LossFn) -> Objective:
    """The objective named by `loss_fn`, or the weighted combination it lists.

    Raises ValueError with the known names when a name is unknown.
    """
    if isinstance(loss_fn, str):
        if loss_fn not in OBJECTIVES:
            known = ", ".join(sorted(OBJECTIVES))
            raise ValueError(f"unknown loss {loss_fn!r}; expected one of: {known}")
        return OBJECTIVES[loss_fn]
    parts = list(loss_fn) if isinstance(loss_fn, Sequence) else []
    if not parts or not all(
        isinstance(p, Sequence)
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], int | float)
        for p in parts
    ):
        raise ValueError(f"expected a loss name or a list of (name, weight) pairs, got {loss_fn!r}")
    return combine([(get_objective(name), float(weight)) for name, weight in parts])


__all__ = [
    "DATUM_INDEX",
    "OBJECTIVES",
    "REF_LOGPROBS",
    "SAMPLED",
    "SAMPLER_LOGPROBS",
    "Inputs",
    "LossFn",
    "LossOutput",
    "Objective",
    "ObjectiveFn",
    "combine",
    "get_objective",
    "linear_coefficients",
    "sequence_sums",
]
