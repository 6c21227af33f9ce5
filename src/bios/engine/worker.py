"""One worker per base model: the shared frozen weights, the runs trained on them, and a thread.

All work on one base model runs on the worker's single thread, which makes switching the active
adapter of the shared model safe. Work is queued in lanes — one per run (a run's requests), one
per sampling session, plus one for everything else (loading) — and the thread takes one item from
each lane in turn. Within a lane, items run in submission order, which gives every client
Tinker's ordering guarantee (a `forward_backward` and an `optim_step` submitted back to back run
in that order).
Across lanes the turns are fair: a tenant that queues a hundred requests delays another tenant's
next request by at most one of them, never by all hundred. An item that would hold the thread
long (a big decode) runs in turns of bounded length, re-queuing its continuation first in its own
lane (`submit(first=True)`), so one item delays the other lanes by one turn, not by its whole cost.

At interpreter exit every worker is stopped and its thread joined (`stop`), before Python
finalizes: the thread lets go of each item's work after the item's future is resolved, so the
program may already be exiting when the last one frees its tensors, and a torch tensor freed
while the interpreter finalizes ends its daemon thread inside C++ code, which aborts the process
("terminate called without an active exception", SIGABRT; seen at the end of `make demo`, in 2 of
4 runs on a 2-core machine).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

import torch

from bios.engine import provenance
from bios.engine.batch import PackedBatch, attention_cost, pack_batch
from bios.engine.runs import Run
from bios.models.attention import takes_segments
from bios.models.loading import LoadedModel
from bios.models.lora import AdapterHost
from bios.objectives import Objective
from bios.types import Datum

T = TypeVar("T")
_workers: weakref.WeakSet[ModelWorker] = weakref.WeakSet()
_Item = tuple[Callable[..., object], tuple[object, ...], Future]


class ModelWorker:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.host = AdapterHost(loaded.model)
        self.runs: dict[str, Run] = {}
        self._lanes: OrderedDict[str, deque[_Item]] = OrderedDict()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="bios-worker", daemon=True)
        self._thread.start()
        _workers.add(self)

    @property
    def device(self) -> torch.device:
        """Where the base model is: every tensor made for it (adapters, KV caches) goes there."""
        return next(self.loaded.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The base model's dtype (its adapters are float32 whatever it is)."""
        return next(self.loaded.model.parameters()).dtype

    @property
    def attention_cost(self) -> float:
        """What packing weighs a row's width with (`bios.engine.batch.attention_cost`); nothing
        where the model attends to packed rows sequence by sequence (`takes_segments`), which a
        row's width does not change."""
        model = self.loaded.model
        return 0.0 if takes_segments(model) else attention_cost(model.config)

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.get_output_embeddings().out_features

    @property
    def max_length(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 1 << 20))

    def pack(
        self,
        data: Sequence[Datum],
        objective: Objective | None,
        lookup: provenance.Lookup | None = None,
    ) -> PackedBatch:
        """`data` checked and packed for this model (`bios.engine.batch.pack_batch` with its
        vocabulary, length limit and attention cost)."""
        return pack_batch(
            data,
            objective,
            self.vocab_size,
            self.max_length,
            lookup=lookup,
            attention_cost=self.attention_cost,
        )

    def submit(
        self, fn: Callable[..., T], *args: object, lane: str = "", first: bool = False
    ) -> Future[T]:
        """Queue `fn(*args)` behind everything submitted to `lane` before it.

        `first=True` queues it ahead of the lane's other items instead: the continuation of the
        item that just ran (a decode cut into turns), which runs at the lane's next turn — after
        every other lane has had one. A continuation is accepted after `shutdown` too, as part of
        the work queued before it.
        """
        future: Future[T] = Future()
        with self._ready:
            if self._stopping and not first:
                raise RuntimeError("the model worker has shut down")
            items = self._lanes.setdefault(lane, deque())
            if first:
                items.appendleft((fn, args, future))
            else:
                items.append((fn, args, future))
            self._ready.notify()
        return future

    def _next(self) -> _Item | None:
        """The first item of the lane whose turn it is; that lane then goes to the back."""
        with self._ready:
            while not self._lanes and not self._stopping:
                self._ready.wait()
            if not self._lanes:
                return None
            lane, items = self._lanes.popitem(last=False)
            item = items.popleft()
            if items:
                self._lanes[lane] = items
            return item

    def _loop(self) -> None:
        while (item := self._next()) is not None:
            fn, args, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as error:  # the submitter sees it on .result()
                future.set_exception(error)
            # Let go of the work while idle: a dropped sampling client's snapshot must be freed.
            del item, fn, args, future

    def shutdown(self) -> None:
        """Finish what is queued, then stop the thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        self._thread.join()

    def stop(self) -> None:
        """Cancel what is queued, let the item that is running finish, then stop the thread."""
        with self._ready:
            self._stopping = True  # from here on only a running item's continuation is queued
            queued = [future for items in self._lanes.values() for _, _, future in items]
            self._lanes.clear()
        for future in queued:
            future.cancel()
        self.shutdown()


@atexit.register
def _stop_workers() -> None:
    """Before the interpreter finalizes (see the module docstring)."""
    for worker in list(_workers):
        worker.stop()
