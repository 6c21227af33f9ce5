"""Errors Bios raises to its users."""

from __future__ import annotations


class BiosError(Exception):
    """Base class of Bios's own errors."""


class InvalidInputError(BiosError, ValueError):
    """A request was rejected before it changed any state; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class NotFoundError(BiosError, LookupError):
    """A run, checkpoint or path does not exist."""
