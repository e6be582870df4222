"""Published numbers for `python -m llava.eval.report --paper --reference FILE.csv`.

The file is a CSV in the `--paper --csv` table's own layout, so a saved table of ours can be a reference
too: the columns `model`, `method`, `setting` name the row (as our summaries do, e.g.
`llava-v1.5-7b,mustdrop,64`), and any of the benchmark headers (GQA, MMB, ...) and `Avg` hold the
numbers to compare; the figure columns (vision tokens, FLOPs ratio, prefill ms) may be present and are
not compared. An empty cell is a number not published; a trailing `%` is allowed. Anything else (an
unknown column, a cell that is not a number, a row named twice) is refused in one line naming the file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from llava.eval.cli_errors import RunError
from llava.eval.paper_table import FIGURE_COLUMNS, KEY_COLUMNS, SCORE_COLUMNS, RowKey

KNOWN_COLUMNS = (*KEY_COLUMNS, *SCORE_COLUMNS, *FIGURE_COLUMNS)


def check_header(header: list[str], path: Path) -> None:
    missing = [name for name in KEY_COLUMNS if name not in header]
    if missing:
        raise RunError(f"reference file {path}: lacks the column(s) {', '.join(missing)} (its header: "
                       f"{', '.join(header) or 'none'})")
    unknown = [name for name in header if name not in KNOWN_COLUMNS]
    if unknown:
        raise RunError(f"reference file {path}: unknown column(s) {', '.join(map(repr, unknown))}; "
                       f"known: {', '.join(KNOWN_COLUMNS)}")


def reference_number(text: str, where: str) -> float | None:
    """A cell's number; None for an empty cell."""
    text = text.strip().removesuffix("%").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise RunError(f"{where}: {text!r} is not a number") from None
    if not math.isfinite(value):
        raise RunError(f"{where}: {text!r} is not a finite number")
    return value


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (line, row) pairs of a CSV file; unreadable files are a RunError."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = [(reader.line_num, row) for row in reader]
            return [name.strip() for name in reader.fieldnames or []], rows
    except UnicodeDecodeError as error:
        raise RunError(f"reference file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise RunError(f"reference file {path}: not a CSV file ({error})") from None
    except OSError as error:
        raise RunError(f"cannot read reference file {path}: {error.strerror or error}") from None


def read_reference(raw_path: str) -> dict[RowKey, dict[str, float]]:
    """The published score of each (model, method, setting) row, by column header."""
    path = Path(raw_path)
    header, rows = read_rows(path)
    check_header(header, path)
    if not rows:
        raise RunError(f"reference file {path} holds no rows")
    reference: dict[RowKey, dict[str, float]] = {}
    for line, row in rows:
        where = f"reference file {path}, line {line}"
        if None in row or None in row.values():
            raise RunError(f"{where}: {len(header)} columns expected as in the header")
        row = {name.strip(): value for name, value in row.items()}
        key = tuple(row[name].strip() for name in KEY_COLUMNS)
        if not all(key):
            raise RunError(f"{where}: model, method and setting must all be given")
        if key in reference:
            raise RunError(f"{where}: {' '.join(key)} is given twice")
        numbers = {name: reference_number(row[name], f"{where}, column {name}") for name in SCORE_COLUMNS if name in row}
        reference[key] = {name: value for name, value in numbers.items() if value is not None}
    return reference
