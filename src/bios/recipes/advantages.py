"""Advantages for policy-gradient recipes: pure functions of rewards or logprobs.

Notation: a group is the G samples drawn for one prompt, with rewards r_1 … r_G; a token t of a
sampled completion has logprobs log π_S(x_t) under the student/policy that sampled it and
log π_T(x_t) under a teacher.

    group_advantages        A_i = r_i − mean(r)                   (GRPO-style baseline)
                            A_i = (r_i − mean(r)) / (std(r) + ε)  (normalize_std=True)
    reverse_kl_advantages   a_t = c · (log π_T(x_t) − log π_S(x_t)) − b
                            b = mean over every token of the batch of c · (log π_T − log π_S)
                            (baseline=True; the Tinker cookbook's on-policy distillation)

A group whose rewards are all equal has A = 0 for every sample: it carries no learning signal.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

NO_SIGNAL_TOLERANCE = 1e-9


def group_advantages(
    rewards: Sequence[float], normalize_std: bool = False, eps: float = 1e-6
) -> list[float]:
    """A_i = r_i − mean(r), optionally divided by (population std(r) + eps).

    rewards: (G,) one per sample of the group → advantages: (G,). Equal rewards give zeros
    (also with normalize_std: 0 / (0 + eps) = 0).
    """
    if not rewards:
        raise ValueError("rewards: a group needs at least one sample")
    mean = statistics.fmean(rewards)
    centered = [r - mean for r in rewards]
    if not normalize_std:
        return centered
    std = math.sqrt(statistics.fmean(c * c for c in centered))
    return [c / (std + eps) for c in centered]


def has_signal(rewards: Sequence[float]) -> bool:
    """False when every sample of the group got the same reward (so every advantage is 0)."""
    return max(rewards) - min(rewards) > NO_SIGNAL_TOLERANCE


def frac_groups_no_signal(groups: Sequence[Sequence[float]]) -> float:
    """Fraction of groups (each a list of rewards) whose rewards are all equal."""
    return sum(not has_signal(g) for g in groups) / len(groups) if groups else 0.0


def reverse_kl_advantages(
    student_logprobs: Sequence[Sequence[float]],
    teacher_logprobs: Sequence[Sequence[float]],
    coef: float = 1.0,
    baseline: bool = True,
) -> list[list[float]]:
    """Per-token advantages that minimise the reverse KL(π_S ‖ π_T) on the student's own samples.

    student_logprobs, teacher_logprobs: per sequence, (T_i,) logprobs of its sampled tokens.
    Returns per sequence (T_i,): a_t = coef · (log π_T − log π_S) − b, with b the batch mean of
    coef · (log π_T − log π_S) over all tokens when `baseline` (it lowers variance and leaves the
    expected gradient unchanged), else b = 0. Each token is its own reward (no discounting), so
    tokens the teacher finds likelier than the student are reinforced.
    """
    if len(student_logprobs) != len(teacher_logprobs):
        raise ValueError("student_logprobs and teacher_logprobs: one list per sequence each")
    gaps = []
    for student, teacher in zip(student_logprobs, teacher_logprobs, strict=True):
        if len(student) != len(teacher):
            raise ValueError(
                f"a sequence has {len(student)} student, {len(teacher)} teacher logprobs"
            )
        gaps.append([coef * (t - s) for s, t in zip(student, teacher, strict=True)])
    tokens = [g for gap in gaps for g in gap]
    b = statistics.fmean(tokens) if baseline and tokens else 0.0
    return [[g - b for g in gap] for gap in gaps]


def mean_reverse_kl(
    student_logprobs: Sequence[Sequence[float]], teacher_logprobs: Sequence[Sequence[float]]
) -> float:
    """Per-token estimate of KL(π_S ‖ π_T) from student samples: mean of log π_S − log π_T."""
    diffs = [
        s - t
        for student, teacher in zip(student_logprobs, teacher_logprobs, strict=True)
        for s, t in zip(student, teacher, strict=True)
    ]
    return statistics.fmean(diffs) if diffs else 0.0
