"""Executing each model's requests in `seq_id` order, whatever order they arrive in.

Tinker's SDK numbers the calls of a training client (`seq_id` 1, 2, ...) and may send them
concurrently — a large `forward_backward` is split into chunks sent in parallel, the first chunk
last — relying on the server to run them in `seq_id` order. A request whose predecessors have
arrived runs at once; a later one waits in `pending` until the gap closes. A retried request
(same `seq_id` again) gets the outcome of the first one. A gap that stays open longer than
`gap_seconds` (a request lost for good) is skipped, so a model's queue can never wedge.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

Action = Callable[[], Future]
_REMEMBERED = 4096  # outcomes kept per server for retried seq_ids


def _chain(source: Future, target: Future) -> None:
    def copy(done: Future) -> None:
        if done.exception() is not None:
            target.set_exception(done.exception())
        else:
            target.set_result(done.result())

    source.add_done_callback(copy)


class Sequencer:
    def __init__(self, gap_seconds: float = 300.0) -> None:
        self.gap_seconds = gap_seconds
        self._next: dict[str, int] = {}
        self._pending: dict[str, dict[int, tuple[Action, Future, float]]] = {}
        self._outcomes: OrderedDict[tuple[str, int], Future] = OrderedDict()
        self._lock = threading.RLock()

    def start(self, model_id: str, first_seq_id: int = 1) -> None:
        with self._lock:
            self._next.setdefault(model_id, first_seq_id)

    def submit(self, model_id: str, seq_id: int | None, action: Action) -> Future:
        """Run `action` (which queues work and returns its future) in `seq_id` order.

        The returned future completes with the work's result, or with the exception `action`
        raised (a rejected request still takes its turn, so later ones are not held up).
        """
        outer: Future = Future()
        # Actions run under the lock: two threads must not queue work of one model out of order.
        with self._lock:
            if seq_id is None:
                self._run(action, outer)
                return outer
            key = (model_id, seq_id)
            if key in self._outcomes:
                return self._outcomes[key]
            self._remember(key, outer)
            expected = self._next.setdefault(model_id, seq_id)
            if seq_id < expected:  # an old number we no longer remember: run it now
                self._run(action, outer)
            else:
                self._pending.setdefault(model_id, {})[seq_id] = (action, outer, time.monotonic())
                self._run_ready(model_id)
        return outer

    def skip_stale_gaps(self) -> None:
        """Release requests stuck behind a gap older than `gap_seconds`."""
        with self._lock:
            horizon = time.monotonic() - self.gap_seconds
            for model_id, pending in self._pending.items():
                if pending and min(arrived for _, _, arrived in pending.values()) < horizon:
                    self._next[model_id] = min(pending)
                    self._run_ready(model_id)

    def _run_ready(self, model_id: str) -> None:
        pending = self._pending[model_id]
        while self._next[model_id] in pending:
            action, future, _ = pending.pop(self._next[model_id])
            self._next[model_id] += 1
            self._run(action, future)

    def _remember(self, key: tuple[str, int], future: Future) -> None:
        self._outcomes[key] = future
        while len(self._outcomes) > _REMEMBERED:
            self._outcomes.popitem(last=False)

    @staticmethod
    def _run(action: Action, outer: Future) -> None:
        try:
            inner = action()
        except BaseException as error:
            outer.set_exception(error)
            return
        _chain(inner, outer)
