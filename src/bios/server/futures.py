"""Server-side futures: every compute request answers `{request_id}` at once; the client polls
`/retrieve_future` until the result is ready.

A poll waits up to `poll_seconds` (well below the SDK's 45 s per-poll timeout) and then answers
`try_again`, so clients neither spin nor time out. Finished futures are forgotten after
`keep_seconds`, which bounds memory.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field


@dataclass
class Entry:
    future: Future
    kind: str
    model_id: str | None
    tenant: str | None
    created: float = field(default_factory=time.monotonic)


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class FutureTable:
    def __init__(self, keep_seconds: float = 3600.0) -> None:
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self.keep_seconds = keep_seconds
        self.on_done: Callable[[str, Entry], None] | None = None

    def add(
        self,
        future: Future,
        kind: str,
        model_id: str | None = None,
        tenant: str | None = None,
        request_id: str | None = None,
    ) -> str:
        request_id = request_id or new_request_id()
        entry = Entry(future, kind, model_id, tenant)
        with self._lock:
            self._forget_old()
            self._entries[request_id] = entry
        if self.on_done is not None:
            callback = self.on_done
            future.add_done_callback(lambda _: callback(request_id, entry))
        return request_id

    def get(self, request_id: str) -> Entry | None:
        with self._lock:
            return self._entries.get(request_id)

    async def wait(self, entry: Entry, timeout: float) -> bool:
        """True when the entry finished within `timeout` seconds."""
        if entry.future.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(entry.future)), timeout)
        except TimeoutError:
            return False
        except Exception:  # a failed future is finished too
            return True
        return True

    def _forget_old(self) -> None:
        horizon = time.monotonic() - self.keep_seconds
        stale = [k for k, e in self._entries.items() if e.future.done() and e.created < horizon]
        for key in stale:
            del self._entries[key]
