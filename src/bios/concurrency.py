"""Future plumbing shared by every layer (the clients, the engine's callers, the server)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

U = TypeVar("U")


def then(future: Future, fn: Callable[[Any], U]) -> Future[U]:
    """A future of `fn(result)`, or of the error; `fn` runs before anyone waiting on it wakes."""
    out: Future = Future()

    def done(source: Future) -> None:
        try:
            out.set_result(fn(source.result()))
        except BaseException as error:  # the caller sees it on .result()
            out.set_exception(error)

    future.add_done_callback(done)
    return out
