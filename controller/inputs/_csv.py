"""Reading CSV files so that every complaint names the file, the 1-based line and the column.

Shared by the trace loaders (``controller.inputs.traces``) and the factory loader's CSV sniffing.
Line 1 is the header; ``csv.reader.line_num`` is used so quoted multi-line fields still
report the line a person sees in an editor.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aifactory.controller.core.errors import InputFileError

__all__ = ["CsvTable", "read_csv", "read_header"]


@dataclass(frozen=True, slots=True)
class CsvTable:
    """A whole CSV file: its header and its rows, each with the line it ended on."""

    path: str
    header: tuple[str, ...]
    rows: tuple[tuple[int, dict[str, str]], ...]

    def has(self, column: str) -> bool:
        return column in self.header

    def error(self, message: str, line: int | None = None,
              column: str | None = None) -> InputFileError:
        return InputFileError(self.path, message, line, column)

    def integer(self, line: int, column: str, text: str, low: int, high: int) -> int:
        """``text`` as an integer in [low, high], or an error naming line and column."""
        stripped = text.strip()
        try:
            value = int(stripped)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise self.error(f"expected an integer {low}-{high}, got {stripped!r}", line, column)
        return value

    def number(self, line: int, column: str, text: str, minimum: float = 0.0) -> float | None:
        """``text`` as a finite number >= ``minimum``; None for an empty field."""
        stripped = text.strip()
        if not stripped:
            return None
        try:
            value = float(stripped)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum:
            raise self.error(f"expected a number >= {minimum:g}, got {stripped!r}", line, column)
        return value

    def text(self, line: int, column: str, value: str) -> str:
        """A required non-empty field."""
        stripped = value.strip()
        if not stripped:
            raise self.error("must not be empty", line, column)
        return stripped


def _open_error(path: Path, exc: OSError) -> InputFileError:
    if isinstance(exc, FileNotFoundError):
        return InputFileError(str(path), "no such file")
    return InputFileError(str(path), f"cannot read: {exc.strerror or exc}")


def read_header(path: str | Path) -> tuple[str, ...]:
    """The stripped header fields of a CSV file (empty for an empty file)."""
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8-sig") as handle:
            first = next(csv.reader(handle), [])
    except OSError as exc:
        raise _open_error(p, exc) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(str(p), f"not a readable UTF-8 CSV file: {exc}", 1) from exc
    return tuple(h.strip() for h in first)


def read_csv(path: str | Path, required: Sequence[str]) -> CsvTable:
    """Read ``path``; error if a ``required`` column is missing or a row has the wrong width."""
    p = Path(path)
    rows: list[tuple[int, dict[str, str]]] = []
    try:
        with p.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = tuple(h.strip() for h in next(reader, []))
            if not header:
                raise InputFileError(str(p), "empty file: expected a header line with "
                                     f"{', '.join(required)}", 1)
            missing = [c for c in required if c not in header]
            if missing:
                raise InputFileError(str(p), f"missing required columns: {', '.join(missing)} "
                                     f"(header has {', '.join(header)})", 1)
            width = len(header)
            for fields in reader:
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != width:
                    raise InputFileError(str(p), f"expected {width} fields, got {len(fields)}",
                                         reader.line_num)
                rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except OSError as exc:
        raise _open_error(p, exc) from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputFileError(str(p), f"not a readable UTF-8 CSV file: {exc}") from exc
    return CsvTable(str(p), header, tuple(rows))
