"""The run's result: the checkpoint with the lowest eval loss, and when to stop early.

    improved     eval loss < the lowest so far (strictly: a tie keeps the earlier checkpoint)
    early stop   `patience` evals in a row without improvement (0: never stop early)

The eval before training (step 0) is the base model's: it has no checkpoint, so it is not a
candidate, but the result's reason says when training never got below it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass
class KeepBest:
    patience: int  # evals without improvement before stopping; 0: never
    source: str  # what the eval loss is measured on, for the reason ("eval.jsonl", ...)
    best_loss: float = math.inf
    best_step: int | None = None
    evals: int = 0  # evals after step 0
    since_best: int = 0  # evals since the best one
    before_training: float | None = None  # the eval loss at step 0

    def improves(self, eval_loss: float) -> bool:
        return math.isfinite(eval_loss) and eval_loss < self.best_loss

    def saw(self, step: int, eval_loss: float) -> bool:
        """Record the eval at `step`; True when it is the new best."""
        if step == 0:
            self.before_training = eval_loss
            return False
        self.evals += 1
        if self.improves(eval_loss):
            self.best_loss, self.best_step, self.since_best = eval_loss, step, 0
            return True
        self.since_best += 1
        return False

    def should_stop(self) -> bool:
        return self.patience > 0 and self.best_step is not None and self.since_best >= self.patience

    def why(self, finished: bool = False) -> str:
        """One line for checkpoints.jsonl: why this checkpoint is the result."""
        text = (
            f"lowest eval loss ({self.best_loss:.5g} per token on {self.source}) of the "
            f"{self.evals} evals{'' if finished else ' so far'}"
        )
        if self.before_training is not None and self.before_training <= self.best_loss:
            text += (
                f"; no trained checkpoint got below the eval loss before training "
                f"({self.before_training:.5g})"
            )
        return text

    @classmethod
    def restore(
        cls, patience: int, source: str, history: list[dict[str, Any]], best: dict | None
    ) -> KeepBest:
        """The state of a resumed run: its metrics so far, and the checkpoint marked best."""
        keeper = cls(patience, source)
        for record in history:
            if "eval_loss" in record:
                keeper.saw(int(record["step"]), float(record["eval_loss"]))
        if best is not None and "eval_loss" in best:
            # The kept checkpoint is the best, whatever evals came after it.
            keeper.best_loss, keeper.best_step = float(best["eval_loss"]), int(best["step"])
            keeper.since_best = sum(
                1 for r in history if "eval_loss" in r and int(r["step"]) > keeper.best_step
            )
        return keeper
