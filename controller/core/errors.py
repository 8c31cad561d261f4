"""Errors the core raises, each carrying the words a person needs to fix the input.

Placement failures are *values* (see ``controller.placement.request.Unplaced``), not exceptions:
exceptions here are for input that can never be valid and for broken invariants.
"""

from __future__ import annotations

__all__ = ["AifactoryError", "InputFileError", "InvariantError", "SpecError", "SpecFileError"]


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


class SpecFileError(SpecError, InputFileError):
    """An invalid spec read from a file: names the file, the line and the field.

    Both a SpecError (it has ``field``) and an InputFileError (it has ``path`` and
    ``line``), so callers catching either see it.
    """

    def __init__(self, path: str, field: str, message: str, line: int | None = None) -> None:
        self.field = field
        self.message = message
        self.path = path
        self.line = line
        self.column = None
        where = path if line is None else f"{path}:{line}"
        Exception.__init__(self, f"{where}: {field}: {message}")


class InvariantError(AifactoryError, AssertionError):
    """An internal invariant broke (a GPU given twice, usage below zero). A bug, never input."""
