"""One worker per base model: the shared frozen weights, the runs trained on them, and a thread.

All requests for runs on one base model execute on the worker's single thread, in the order they
were submitted. That gives every client Tinker's ordering guarantee (a `forward_backward` and an
`optim_step` submitted back to back run in that order) and makes switching the active adapter
of the shared model safe.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from bios.engine.runs import TrainingRun
from bios.models.loading import LoadedModel
from bios.models.lora import AdapterHost

T = TypeVar("T")


class ModelWorker:
    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.host = AdapterHost(loaded.model)
        self.runs: dict[str, TrainingRun] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bios-worker")

    @property
    def vocab_size(self) -> int:
        return self.loaded.model.get_output_embeddings().out_features

    @property
    def max_length(self) -> int:
        return int(getattr(self.loaded.model.config, "max_position_embeddings", 1 << 20))

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Queue `fn(*args)` behind every request submitted before it."""
        return self._executor.submit(fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
