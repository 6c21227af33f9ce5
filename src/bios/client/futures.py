"""Futures returned by every client call: `.result()`, `await`, or `.result_async()`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Generator
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from bios.concurrency import then

T = TypeVar("T")


class APIFuture(Generic[T]):
    """The pending result of a request; requests on one client complete in submission order."""

    def __init__(self, future: Future) -> None:
        self._future = future

    @classmethod
    def mapped(cls, future: Future, fn: Callable[[Any], T]) -> APIFuture[T]:
        """A future whose result is `fn(result of future)`."""
        return cls(then(future, fn))

    def result(self, timeout: float | None = None) -> T:
        return self._future.result(timeout)

    async def result_async(self, timeout: float | None = None) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self._future), timeout)

    def __await__(self) -> Generator[Any, None, T]:
        return self.result_async().__await__()

    def done(self) -> bool:
        return self._future.done()

    def future(self) -> Future:
        """The underlying `concurrent.futures.Future`."""
        return self._future
