"""Errors the core raises, each carrying the words a person needs to fix the input.

Placement failures are *values* (see ``controller.placement.Unplaced``), not exceptions:
exceptions here are for input that can never be valid and for broken invariants.
"""

from __future__ import annotations

__all__ = ["AifactoryError", "InputFileError", "InvariantError", "SpecError"]


class AifactoryError(Exception):
    """Base class of every error the core raises on purpose."""


class SpecError(AifactoryError, ValueError):
    """A user-written spec is invalid. Names the field and what would be valid."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


class InputFileError(AifactoryError, ValueError):
    """A trace, cluster spec or manifest file cannot be read. Names file, line and column."""

    def __init__(self, path: str, message: str, line: int | None = None,
                 column: str | None = None) -> None:
        self.path = path
        self.line = line
        self.column = column
        where = path
        if line is not None:
            where += f":{line}"
        if column is not None:
            where += f" column {column!r}"
        super().__init__(f"{where}: {message}")


class InvariantError(AifactoryError, AssertionError):
    """An internal invariant broke (a GPU given twice, usage below zero). A bug, never input."""
