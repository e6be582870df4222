"""Read JSONL files (LLaVA's question and answer format) with errors that name the file and line.

Every reader of a question or answers file goes through `iter_jsonl`, so a broken line is always
reported by its 1-based line number in the file, never by its position inside one parsed line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A JSONL file that cannot be read as one JSON value per line; the message names file and line."""


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, Any]]:
    """Yield `(line_number, value)` for every non-blank line, line numbers counted from 1."""
    path = Path(path)
    if path.is_dir():
        raise JsonlError(f"{what} {path} is a directory, not a JSONL file")
    if not path.is_file():
        raise JsonlError(f"{what} not found: {path}")
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield number, parse_line(line, path, number, what)
    except UnicodeDecodeError as error:
        raise JsonlError(f"{what} {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise JsonlError(f"{what} {path}: cannot be read ({error.strerror or error})") from None


def parse_line(line: str, path: str | Path, number: int, what: str = "file") -> Any:
    """One line's JSON value; a syntax error names the file, the line and the column."""
    try:
        return json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as error:
        raise JsonlError(f"{what} {path}, line {number}: not valid JSON ({error.msg}: column {error.colno})") from None


def read_jsonl(path: str | Path, what: str = "file") -> list[Any]:
    """Every line's JSON value, in file order."""
    return [value for _, value in iter_jsonl(path, what)]
