"""Weighted sums of objectives, computed in one forward and one backward pass.

    L = Σ_i c_i · L_i        e.g. loss_fn=[("ppo", 1.0), ("kl", 0.05)]

The combination reads the union of its parts' inputs. Its config keys are the parts' keys
prefixed with the part's name (`ppo.clip_low_threshold`, `kl.estimator`); an unprefixed key is
given to every part that has it. Metrics: `loss:sum` of the total, and each part's metrics
prefixed with its name (`ppo/loss:sum`, `kl/kl:mean`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from bios.objectives.base import Inputs, LossOutput, Objective


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(names))


def combine(parts: Sequence[tuple[Objective, float]]) -> Objective:
    """One objective whose loss is the weighted sum of the parts' losses."""
    if len({objective.name for objective, _ in parts}) != len(parts):
        raise ValueError("each objective may appear once in a combination")
    for objective, coefficient in parts:
        if not math.isfinite(coefficient):
            raise ValueError(f"{objective.name}: coefficient must be finite, got {coefficient}")

    def fn(logprobs: torch.Tensor, inputs: Inputs, config: dict[str, float]) -> LossOutput:
        total = torch.zeros((), dtype=logprobs.dtype)
        metrics: dict[str, float] = {}
        for objective, coefficient in parts:
            prefix = f"{objective.name}."
            own = {k.removeprefix(prefix): v for k, v in config.items() if k.startswith(prefix)}
            loss, part_metrics = objective.fn(logprobs, inputs, own)
            total = total + coefficient * loss
            metrics[f"{objective.name}/loss:sum"] = float(loss.detach())
            metrics.update({f"{objective.name}/{k}": v for k, v in part_metrics.items()})
        return total, metrics

    all_inputs = [name for o, _ in parts for name in (*o.required_inputs, *o.optional_inputs)]
    required = _unique([name for o, _ in parts for name in o.required_inputs])
    return Objective(
        name=" + ".join(f"{c:g}*{o.name}" for o, c in parts),
        fn=fn,
        required_inputs=required,
        optional_inputs=tuple(n for n in _unique(all_inputs) if n not in required),
        config={f"{o.name}.{k}": v for o, _ in parts for k, v in o.config.items()},
        needs_reference=any(o.needs_reference for o, _ in parts),
        pairs=any(o.pairs for o, _ in parts),
        # (N, K) targets only if every part reads them so; one part's provenance fills for all.
        soft_targets=all(o.soft_targets for o, _ in parts),
        provenance=any(o.provenance for o, _ in parts),
        linear=all(o.linear for o, _ in parts),
        config_checks={f"{o.name}.{k}": v for o, _ in parts for k, v in o.config_checks.items()},
    )
