"""Training-health checks over a metric stream: what went wrong, at which step, which dial to turn.

A metric stream is one dict per step, as recipes write to `runs/<run>/metrics.jsonl`. Known keys
(the first present of each group is used; anything else is ignored):

    step                                    the step number (else the record's position)
    train_loss | loss | train/loss          training loss, a per-token mean
    eval_loss | test_loss | eval/loss       held-out loss (usually every few steps)
    learning_rate | lr                      the LR used at this step
    grad_norm                               global gradient norm before clipping
    reward_mean | reward                    RL: mean reward of the batch
    frac_groups_no_signal                   RL: fraction of groups whose rewards are all equal
    kl                                      KL to the sampler / reference policy, per token

`HealthMonitor.feed(record)` checks as training runs and returns the new findings; `diagnose`
and `diagnose_file` do the same for a whole recorded stream. Every threshold is a module constant
below with the reason for its value; `docs/hparams.md` describes each check. Loss checks that use
ratios (divergence, spikes, plateau) assume a positive loss (cross-entropy); they stay silent on
a stream with a zero or negative loss (RL surrogate losses). They judge the loss on the scale
loss + LOSS_FLOOR, so that near zero, where a memorised training set's loss wobbles between a
few hundredths of a nat, a wobble is not read as a 50% rise.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

LOSS_KEYS = ("train_loss", "loss", "train/loss")
EVAL_LOSS_KEYS = ("eval_loss", "test_loss", "eval/loss")
LR_KEYS = ("learning_rate", "lr")
REWARD_KEYS = ("reward_mean", "reward")

# The scale of the loss checks: loss + 0.2 nats per token. Ratios of raw losses blow up near 0: a
# run memorising 100 chat examples (tests/data/default-memorising.jsonl, issue 16) had a median
# train loss of 0.052 against its lowest 0.034, 1.53× — "divergence" — while its eval loss said
# overfitting. On this scale that is 0.252 / 0.234 = 1.08×; at a loss of 2 the floor moves a ratio
# by under 10%, so real divergences (the LR ×30 stream: 0.8 → 5 nats) are judged as before.
LOSS_FLOOR = 0.2
# Divergence: the median loss of the last 10 steps is 1.5× the lowest such median so far (both
# + LOSS_FLOOR). A median of 10 ignores single spikes; noise on a healthy loss moves it by a few
# percent, never by 50%.
DIVERGENCE_WINDOW = 10
DIVERGENCE_RATIO = 1.5
# From the 3rd step on, over the steps there are (up to 10): an LR far too high blows the loss
# up within its first steps (the LR ×30 stream: 3.2 at step 1, 457 at step 4), and a lowest
# median taken only from step 10 on would be a median of the blown-up loss.
DIVERGENCE_MIN_STEPS = 3
# The eval loss diverges too: 1.5× its lowest (+ LOSS_FLOOR) while the train loss did not fall
# by OVERFIT_TRAIN_DROP since then (when it did, that is overfitting). It catches a run that blew
# up before its train loss had a lowest worth the name, from the eval before training.
# The cure: one step down a ×3-spaced LR grid. In the cookbook's SFT sweep (1e-4, 3e-4, 1e-3,
# 3e-3) 72 of 80 divergent runs used 3e-3, one such step above the highest best LR (1e-3).
DIVERGENCE_LR_FACTOR = 0.3
# Spike: log(loss + LOSS_FLOOR) more than 6 noise units above its median over the previous 30
# steps, and loss + LOSS_FLOOR at least 25% above that median, while the step before was within
# 25% of the median loss (a sudden jump; a climb over several steps is divergence). Logs, because
# loss noise is multiplicative. The noise unit is median |Δ log| over the previous 100 steps /
# 0.954 (= σ for Gaussian noise): differences ignore the downward trend, and 100 of them pin σ to
# ~12%, where a MAD of 30 points is often off by half. Floored at 1% so a very smooth loss cannot
# make any blip a spike. Gaussian noise reaches 6σ once in ~10⁹ steps.
SPIKE_WINDOW = 30
SPIKE_NOISE_WINDOW = 100
SPIKE_MIN_HISTORY = 30
SPIKE_Z = 6.0
SPIKE_MIN_SCALE = 0.01
SPIKE_MIN_REL = 0.25
# Plateau: a line fitted to log(loss + LOSS_FLOOR) over the last half of the run (100 to 500
# steps) says it fell by less than 5% over that span, even at the upper end of its one-sided 99%
# confidence bound (z = 2.33). Using the bound, not the estimate, keeps a noisy but learning run
# from being called flat (noise only widens the bound, so it delays the verdict instead of faking
# it); 5% over half a run is slow enough to call a stall. Reported again only after loss +
# LOSS_FLOOR has since fallen by 5% (median of 50 steps). Not checked once the LR has decayed
# below half its peak: a decayed LR is meant to flatten the loss.
PLATEAU_MIN_STEPS = 100
PLATEAU_MAX_WINDOW = 500
PLATEAU_MAX_IMPROVEMENT = 0.05
PLATEAU_Z = 2.33
PLATEAU_LEVEL_WINDOW = 50
PLATEAU_LR_FRACTION = 0.5
# Overfitting: 3+ evals since the best one, and both the latest and the mean of the last 3 evals
# 2% above the best, while the train loss (median of 20 steps) fell by 2%+ since the best eval.
# Three evals and a 2% margin rule out eval noise; the train condition tells overfitting from
# a run that is simply getting worse everywhere (that is divergence).
OVERFIT_EVALS = 3
OVERFIT_MIN_RISE = 0.02
OVERFIT_TRAIN_DROP = 0.02
TRAIN_WINDOW = 20
# RL without signal: over the last 5 steps, on average more than half of the groups had equal
# rewards (zero advantage: they teach nothing). "Most groups", smoothed over a few steps.
NO_SIGNAL_WINDOW = 5
NO_SIGNAL_FRAC = 0.5
EASY_REWARD, HARD_REWARD = 0.9, 0.1  # for rewards in [0, 1]: mostly solved / mostly failed
# KL exploding: the median of the last 5 values is above 0.1 (10× the cookbook's "stable below
# 0.01") and 2× the median of the 5 values 10 steps earlier; or above 1 nat/token at all. Reported
# again only after it has come back under half of 0.1.
KL_WINDOW = 5
KL_LOOKBACK = 10
KL_ALARM = 0.1
KL_GROWTH = 2.0
KL_HARD_MAX = 1.0
# Grad-norm explosion: one step's norm 10× the median of the previous 20 (after 10 steps of
# history). Healthy norms wander by tens of percent; 10× means an update that can wreck Adam's
# moments.
GRAD_WINDOW = 20
GRAD_MIN_HISTORY = 10
GRAD_EXPLOSION_FACTOR = 10.0

KINDS = (
    "nonfinite",
    "divergence",
    "loss_spike",
    "plateau",
    "overfitting",
    "no_reward_signal",
    "kl_explosion",
    "grad_norm_explosion",
)
Severity = Literal["error", "warning"]  # error: the run is broken; warning: worth a change
_CHECKED_FOR_NONFINITE = {
    "loss": LOSS_KEYS,
    "eval_loss": EVAL_LOSS_KEYS,
    "grad_norm": ("grad_norm",),
    "kl": ("kl",),
}


@dataclass(frozen=True)
class Finding:
    """One problem: its kind, the step, how bad, and a message with the evidence and the fix."""

    kind: str  # one of KINDS
    step: int
    severity: Severity
    message: str
    evidence: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"step {self.step} [{self.severity}] {self.kind}: {self.message}"


def _number(record: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    """The first of `keys` present in `record` as a float (nan/inf kept); None if absent."""
    for key in keys:
        value = record.get(key)
        if value is None or isinstance(value, bool):
            continue
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _change(fall: float) -> str:
    return f"fell by only {fall:.1%}" if fall >= 0 else f"rose by {-fall:.1%}"


def _lr_advice(lr: float | None, factor: float) -> str:
    if lr is None or lr <= 0:
        return f"×{factor:g}"
    return f"×{factor:g} ({lr:.3g} → {lr * factor:.3g})"


class HealthMonitor:
    """Feed it one metric record per step; it returns the findings that step reveals.

    Each condition is reported once when it starts and again only after it has cleared (spikes
    and grad-norm explosions: at most once per window), so a live run is not flooded.
    """

    def __init__(self) -> None:
        self.findings: list[Finding] = []
        self._count = 0
        self._losses: list[tuple[int, float]] = []
        self._loss_positive = True
        self._best_median: tuple[float, int] | None = None  # (median, step)
        self._plateau_level = math.inf  # median loss when a plateau was last reported
        self._lrs: dict[int, float] = {}
        self._lr: float | None = None
        self._peak_lr = 0.0
        self._evals: list[tuple[int, float]] = []
        self._grads: list[float] = []
        self._no_signal: list[float] = []
        self._kls: list[float] = []
        self._rewards: list[float] = []
        self._active: set[str] = set()
        self._last_fired: dict[str, int] = {}

    def feed(self, record: Mapping[str, Any]) -> list[Finding]:
        """Check one record (one step's metrics); return the findings it adds."""
        number = _number(record, ("step",))
        step = int(number) if number is not None and math.isfinite(number) else self._count
        self._count += 1
        lr = _number(record, LR_KEYS)
        if lr is not None and math.isfinite(lr):
            self._lr, self._lrs[step] = lr, lr
            self._peak_lr = max(self._peak_lr, lr)
        reward = _number(record, REWARD_KEYS)
        if reward is not None and math.isfinite(reward):
            self._rewards.append(reward)
        new: list[Finding] = []
        if (found := self._check_nonfinite(step, record)) is not None:
            new.append(found)
        new.extend(self._check_loss(step, _number(record, LOSS_KEYS)))
        new.extend(self._check_eval(step, _number(record, EVAL_LOSS_KEYS)))
        new.extend(self._check_grad(step, _number(record, ("grad_norm",))))
        new.extend(self._check_no_signal(step, _number(record, ("frac_groups_no_signal",))))
        new.extend(self._check_kl(step, _number(record, ("kl",))))
        self.findings.extend(new)
        return new

    # -- episodes: report when a condition starts, re-arm when it clears ------------------------

    def _episode(self, kind: str, condition: bool, cleared: bool | None = None) -> bool:
        """True exactly when `condition` turns on. An active condition ends when `cleared`
        (default: when `condition` is false), so a borderline one need not flap on and off."""
        if kind in self._active:
            if (not condition) if cleared is None else cleared:
                self._active.discard(kind)
            return False
        if condition:
            self._active.add(kind)
        return condition

    def _cooled(self, kind: str, step: int, window: int) -> bool:
        last = self._last_fired.get(kind)
        if last is not None and step - last < window:
            return False
        self._last_fired[kind] = step
        return True

    # -- checks ---------------------------------------------------------------------------------

    def _check_nonfinite(self, step: int, record: Mapping[str, Any]) -> Finding | None:
        values = {name: _number(record, keys) for name, keys in _CHECKED_FOR_NONFINITE.items()}
        bad = {name: v for name, v in values.items() if v is not None and not math.isfinite(v)}
        if not bad or "nonfinite" in self._active:
            return None
        self._active.add("nonfinite")  # a run that produced NaN is reported once
        shown = ", ".join(f"{name}={v}" for name, v in bad.items())
        last = f" (last finite loss {_fmt(self._losses[-1][1])})" if self._losses else ""
        return Finding(
            "nonfinite",
            step,
            "error",
            f"non-finite values at step {step}: {shown}{last}. The update blew up: lower the "
            f"learning rate {_lr_advice(self._lr, DIVERGENCE_LR_FACTOR)} and restart from the "
            f"last checkpoint before step {step}; if it recurs, also set grad_clip_norm=1.0.",
            bad,
        )

    def _check_loss(self, step: int, loss: float | None) -> list[Finding]:
        if loss is None or not math.isfinite(loss):
            return []
        self._loss_positive = self._loss_positive and loss > 0
        self._losses.append((step, loss))
        if not self._loss_positive:
            return []
        found = [self._divergence(step), self._spike(step, loss), self._plateau(step)]
        return [f for f in found if f is not None]

    def _divergence(self, step: int) -> Finding | None:
        if len(self._losses) < DIVERGENCE_MIN_STEPS:
            return None
        current = statistics.median(v for _, v in self._losses[-DIVERGENCE_WINDOW:])
        if self._best_median is None or current < self._best_median[0]:
            self._best_median = (current, step)
        best, best_step = self._best_median
        ratio = (current + LOSS_FLOOR) / (best + LOSS_FLOOR)
        if not self._episode("divergence", ratio > DIVERGENCE_RATIO):
            return None
        if "eval_divergence" in self._active:
            return None  # reported from the eval loss already
        advice = _lr_advice(self._lr, DIVERGENCE_LR_FACTOR)
        best_lr, lr = self._lrs.get(best_step), self._lr
        if best_lr is not None and lr is not None and best_lr < DIVERGENCE_LR_FACTOR * lr:
            advice += f", or at most {best_lr:.3g}, the LR at step {best_step}"
        return Finding(
            "divergence",
            step,
            "error",
            f"training is diverging: the median loss of the last "
            f"{min(DIVERGENCE_WINDOW, len(self._losses))} steps is "
            f"{_fmt(current)}, up from its lowest {_fmt(best)} (step {best_step}): "
            f"{ratio:.2f}× on the scale loss + {LOSS_FLOOR:g}. Lower the learning rate {advice} "
            f"and resume from a checkpoint from before the rise (near step {best_step}).",
            {
                "median_loss": current,
                "best_median_loss": best,
                "best_step": best_step,
                "ratio": ratio,
            },
        )

    def _spike(self, step: int, loss: float) -> Finding | None:
        previous = self._losses[-SPIKE_NOISE_WINDOW - 1 : -1]
        if len(previous) < SPIKE_MIN_HISTORY or self._diverging():
            return None
        logs = [math.log(v + LOSS_FLOOR) for _, v in previous]
        center = statistics.median(logs[-SPIKE_WINDOW:])
        noise = statistics.median(abs(b - a) for a, b in itertools.pairwise(logs)) / 0.954
        z = (math.log(loss + LOSS_FLOOR) - center) / max(noise, SPIKE_MIN_SCALE)
        median = math.exp(center) - LOSS_FLOOR  # the median loss itself
        ceiling = (1 + SPIKE_MIN_REL) * (median + LOSS_FLOOR) - LOSS_FLOOR
        # A rise over several steps is not a spike: the step before must be within 25% of the
        # median itself (stricter than `ceiling` near zero, so a climb never looks sudden).
        sudden = previous[-1][1] <= min(ceiling, (1 + SPIKE_MIN_REL) * median)
        if z <= SPIKE_Z or loss <= ceiling or not sudden:
            return None
        if not self._cooled("loss_spike", step, SPIKE_WINDOW):
            return None
        return Finding(
            "loss_spike",
            step,
            "warning",
            f"loss {_fmt(loss)} at step {step} jumped far above the median "
            f"{_fmt(median)} of the previous {min(len(logs), SPIKE_WINDOW)} steps "
            f"(+{loss - median:.3g} nats, {z:.1f}× the step-to-step noise). "
            "One spike that recovers is harmless; repeated spikes mean the LR is at the edge of "
            f"stability: lower it {_lr_advice(self._lr, 0.5)} or set grad_clip_norm=1.0.",
            {"loss": loss, "median": median, "z": z},
        )

    def _plateau(self, step: int) -> Finding | None:
        if len(self._losses) < PLATEAU_MIN_STEPS or self._diverging():
            return None
        if self._lr is not None and self._lr < PLATEAU_LR_FRACTION * self._peak_lr:
            self._active.discard("plateau")
            return None
        window = min(PLATEAU_MAX_WINDOW, max(PLATEAU_MIN_STEPS, len(self._losses) // 2))
        improvement, upper = _fitted_improvement(self._losses[-window:])
        level = statistics.median(v for _, v in self._losses[-PLATEAU_LEVEL_WINDOW:])
        progressed = level + LOSS_FLOOR < (1 - PLATEAU_MAX_IMPROVEMENT) * (
            self._plateau_level + LOSS_FLOOR
        )
        if not self._episode("plateau", upper < PLATEAU_MAX_IMPROVEMENT, cleared=progressed):
            return None
        self._plateau_level = level
        first = self._losses[-window][0]
        return Finding(
            "plateau",
            step,
            "warning",
            f"the loss has stalled: over steps {first}–{step} it {_change(improvement)} (a fall "
            f"of at most {upper:.1%} at 99% confidence, under {PLATEAU_MAX_IMPROVEMENT:.0%}). If "
            "it is still above what you expect, raise the learning rate "
            f"{_lr_advice(self._lr, 2.0)} or the LoRA rank ×2; if it is as low as you expect, "
            "training has converged: stop here and save the compute.",
            {"improvement": improvement, "improvement_upper": upper, "first_step": first},
        )

    def _diverging(self) -> bool:
        return bool({"divergence", "eval_divergence"} & self._active)

    def _train_median(self, until_step: int) -> float | None:
        """Median train loss of the TRAIN_WINDOW steps up to `until_step`; before the first
        train loss (an eval before training), the first one: step 1's loss is measured before
        the first update."""
        values = [v for s, v in self._losses if s <= until_step][-TRAIN_WINDOW:]
        if not values:
            return self._losses[0][1] if self._losses else None
        return statistics.median(values)

    def _check_eval(self, step: int, eval_loss: float | None) -> list[Finding]:
        if eval_loss is None or not math.isfinite(eval_loss):
            return []
        self._evals.append((step, eval_loss))
        best_index = min(range(len(self._evals)), key=lambda i: self._evals[i][1])
        best_step, best = self._evals[best_index]
        since_best = len(self._evals) - 1 - best_index
        recent = statistics.fmean(v for _, v in self._evals[-OVERFIT_EVALS:])
        threshold = (1 + OVERFIT_MIN_RISE) * best
        rising = since_best >= OVERFIT_EVALS and eval_loss > threshold and recent > threshold
        train_then, train_now = self._train_median(best_step), self._train_median(step)
        train_falling = train_then is None or (
            train_now is not None and train_now < (1 - OVERFIT_TRAIN_DROP) * train_then
        )
        ratio = (eval_loss + LOSS_FLOOR) / (best + LOSS_FLOOR)
        if train_now is not None and self._loss_positive:
            # Its own episode, so that it neither clears nor repeats the train loss's one.
            diverging = self._episode(
                "eval_divergence", ratio > DIVERGENCE_RATIO and not train_falling
            )
            if diverging and "divergence" not in self._active:
                return [self._eval_divergence(step, eval_loss, best, best_step, ratio)]
            if "eval_divergence" in self._active:
                return []
        if not self._episode("overfitting", rising and train_falling):
            return []
        train = ""
        if train_then is not None and train_now is not None:
            train = f" while the train loss fell from {_fmt(train_then)} to {_fmt(train_now)}"
        return [
            Finding(
                "overfitting",
                step,
                "warning",
                f"eval loss rose from {_fmt(best)} at step {best_step} (its best) "
                f"to {_fmt(eval_loss)} at step {step}, over {since_best} evals{train}. The "
                f"model is memorising the training set: use the checkpoint of step {best_step} "
                f"(`bios sft` keeps the lowest-eval one as the run's result), train "
                f"~{best_step} steps next time, or add data; a lower LoRA rank or LR slows it "
                "too.",
                {"best_eval_loss": best, "best_step": best_step, "eval_loss": eval_loss},
            )
        ]

    def _eval_divergence(
        self, step: int, eval_loss: float, best: float, best_step: int, ratio: float
    ) -> Finding:
        train_then, train_now = self._train_median(best_step), self._train_median(step)
        return Finding(
            "divergence",
            step,
            "error",
            f"training is diverging: the eval loss is {_fmt(eval_loss)} at step {step}, up from "
            f"{_fmt(best)} at step {best_step} ({ratio:.2f}× on the scale loss + {LOSS_FLOOR:g}), "
            f"and the train loss did not fall (median {_fmt(train_then or math.nan)} then, "
            f"{_fmt(train_now or math.nan)} now). Lower the learning rate "
            f"{_lr_advice(self._lr, DIVERGENCE_LR_FACTOR)} and "
            + (
                "restart from the beginning."
                if best_step == 0
                else f"restart from a checkpoint from before the rise (step {best_step} or "
                "earlier)."
            ),
            {
                "eval_loss": eval_loss,
                "best_eval_loss": best,
                "best_step": best_step,
                "ratio": ratio,
            },
        )

    def _check_grad(self, step: int, grad_norm: float | None) -> list[Finding]:
        if grad_norm is None or not math.isfinite(grad_norm):
            return []
        history = self._grads[-GRAD_WINDOW:]
        self._grads.append(grad_norm)
        if len(history) < GRAD_MIN_HISTORY:
            return []
        median = statistics.median(history)
        if grad_norm <= GRAD_EXPLOSION_FACTOR * median or median <= 0:
            return []
        if not self._cooled("grad_norm_explosion", step, GRAD_WINDOW):
            return []
        return [
            Finding(
                "grad_norm_explosion",
                step,
                "warning",
                f"gradient norm {_fmt(grad_norm)} at step {step} is {grad_norm / median:.0f}× "
                f"the median {_fmt(median)} of the previous {len(history)} steps. Set "
                f"grad_clip_norm to ~{2 * median:.2g} (2× the typical norm) so one bad batch "
                f"cannot wreck the optimizer state, and if it recurs lower the LR "
                f"{_lr_advice(self._lr, 0.5)}.",
                {"grad_norm": grad_norm, "median": median},
            )
        ]

    def _check_no_signal(self, step: int, fraction: float | None) -> list[Finding]:
        if fraction is None or not math.isfinite(fraction):
            return []
        self._no_signal.append(fraction)
        if len(self._no_signal) < NO_SIGNAL_WINDOW:
            return []
        mean = statistics.fmean(self._no_signal[-NO_SIGNAL_WINDOW:])
        if not self._episode("no_reward_signal", mean > NO_SIGNAL_FRAC):
            return []
        recent = self._rewards[-NO_SIGNAL_WINDOW:]
        reward = statistics.fmean(recent) if recent else None
        evidence = {"frac_groups_no_signal": mean}
        if reward is not None:
            evidence["reward_mean"] = reward
        if reward is not None and 0 <= reward <= 1 and reward >= EASY_REWARD:
            fix = f"the prompts are too easy (mean reward {reward:.2f}): use harder prompts"
        elif reward is not None and 0 <= reward <= 1 and reward <= HARD_REWARD:
            fix = (
                f"the prompts are too hard (mean reward {reward:.2f}): use easier prompts or "
                "start from a model fine-tuned on examples"
            )
        else:
            fix = "make prompts harder if most groups all succeed, easier if most all fail"
        return [
            Finding(
                "no_reward_signal",
                step,
                "warning",
                f"over the last {NO_SIGNAL_WINDOW} steps {mean:.0%} of groups "
                "had equal rewards for every sample, so their advantages are zero and they "
                f"teach nothing. {fix[0].upper()}{fix[1:]}; or double group_size so that a "
                "group more often holds both a success and a failure.",
                evidence,
            )
        ]

    def _check_kl(self, step: int, kl: float | None) -> list[Finding]:
        if kl is None or not math.isfinite(kl):
            return []
        self._kls.append(kl)
        if len(self._kls) < KL_WINDOW:
            return []
        now = statistics.median(self._kls[-KL_WINDOW:])
        earlier_values = self._kls[-KL_WINDOW - KL_LOOKBACK : -KL_LOOKBACK]
        earlier = statistics.median(earlier_values) if earlier_values else None
        growing = earlier is not None and now > KL_GROWTH * earlier
        exploding = now > KL_HARD_MAX or (now > KL_ALARM and growing)
        if not self._episode("kl_explosion", exploding, cleared=now < KL_ALARM / 2):
            return []
        trend = f", {now / earlier:.1f}× its value {KL_LOOKBACK} steps earlier" if growing else ""
        evidence = {"kl": now} | ({"earlier_kl": earlier} if earlier is not None else {})
        return [
            Finding(
                "kl_explosion",
                step,
                "error" if now > KL_HARD_MAX else "warning",
                f"the median KL of the last {KL_WINDOW} steps is {_fmt(now)}{trend} "
                f"(stable training keeps it below 0.01). The policy is running away from the "
                f"reference: lower the learning rate {_lr_advice(self._lr, 0.5)}, or add a KL "
                'penalty (e.g. [(loss, 1.0), ("kl", 0.05)]) or double its weight.',
                evidence,
            )
        ]


def _fitted_improvement(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Relative fall of loss + LOSS_FLOOR over `points` from a least-squares line through
    log(loss + LOSS_FLOOR): (estimate, upper confidence bound PLATEAU_Z standard errors away)."""
    x = np.array([s for s, _ in points], dtype=np.float64)
    y = np.log(np.array([v for _, v in points], dtype=np.float64) + LOSS_FLOOR)
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0:
        return 0.0, 0.0
    slope = float(dx @ (y - y.mean())) / sxx
    residuals = y - y.mean() - slope * dx
    stderr = math.sqrt(float(residuals @ residuals) / max(len(points) - 2, 1) / sxx)
    span = x[-1] - x[0]
    fall = lambda b: 1.0 - math.exp(b * span)  # noqa: E731
    return fall(slope), fall(slope - PLATEAU_Z * stderr)


def diagnose(records: Iterable[Mapping[str, Any]]) -> list[Finding]:
    """All findings of a recorded metric stream, in step order."""
    monitor = HealthMonitor()
    for record in records:
        monitor.feed(record)
    return monitor.findings


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file, or of `metrics.jsonl` inside a run folder.

    Blank lines are skipped, and so is a malformed last line (a run may be writing it); a
    malformed line elsewhere raises ValueError naming the line.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "metrics.jsonl"
    lines = file.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):
                break
            raise ValueError(f"{file}:{number}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(
                f"{file}:{number}: expected a JSON object, got {type(record).__name__}"
            )
        records.append(record)
    return records


def diagnose_file(path: str | os.PathLike[str]) -> list[Finding]:
    """`diagnose` on a metrics JSONL file or a run folder holding `metrics.jsonl`."""
    return diagnose(read_metrics(path))
