"""Tabulate run summaries: `python -m llava.eval.report DIR_OR_FILE...` prints one Markdown table.

Every `summary.json` under the given directories (as written by the benchmark scripts) becomes a row:
benchmark, setting, score, tokens, FLOPs, speed. `--paper` lays the same runs out as MustDrop's tables
do: one row per (model, method, setting), one column per benchmark with the paper's metric, and "Avg",
the mean over the row's benchmarks of its score relative to the same model's unpruned run, in percent
(llava/eval/paper_table.py); `--reference FILE.csv` adds published numbers and our difference to them
(llava/eval/paper_reference.py). `--csv` writes either table as CSV instead of Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from llava.eval.cli_errors import RunError, interruptible, main_guard
from llava.eval.paper_table import fill_averages, layout, paper_rows
from llava.eval.paper_reference import read_reference
from llava.eval.scoring.results import json_type

SUMMARY_NAME = "summary.json"
COLUMNS = ("benchmark", "model", "method", "family", "setting", "questions", "scores", "vision tokens",
           "kept fraction", "FLOPs ratio", "prefill ms", "decode tok/s", "peak memory MiB")
MIB = 1024 * 1024
TEXT_FIELDS = ("benchmark", "model", "method", "family")
NUMBER_FIELDS = ("questions", "mean_vision_tokens", "mean_vision_kept_fraction", "mean_prefill_flops_ratio",
                 "mean_prefill_seconds", "decode_tokens_per_second", "peak_memory_bytes", "peak_rss_bytes")


def find_summaries(paths: list[str]) -> list[Path]:
    found = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(path.rglob(SUMMARY_NAME)))
        else:
            raise RunError(f"no such file or directory: {raw}")
    if not found:
        raise RunError(f"no {SUMMARY_NAME} found under {', '.join(paths)}")
    return found


def format_scores(scores: dict) -> str:
    numbers = {key: value for key, value in scores.items() if isinstance(value, (int, float))}
    return ", ".join(f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in numbers.items()) or "-"


def number(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def family(summary: dict) -> str:
    """The recorded family, else the registry's (summaries written before it was recorded)."""
    if summary.get("family"):
        return summary["family"]
    from llava.drop.methods.registry import family_of  # imports torch: only for such old summaries

    return family_of(summary.get("method", "?"))


def table_row(summary: dict) -> list[str]:
    memory = summary.get("peak_memory_bytes", summary.get("peak_rss_bytes"))
    return [
        summary.get("benchmark", "?"), summary.get("model", "?"), summary.get("method", "?"), family(summary),
        str(summary.get("setting", "?")), str(summary.get("questions", "?")), format_scores(summary.get("scores", {})),
        number(summary.get("mean_vision_tokens")), number(summary.get("mean_vision_kept_fraction"), digits=3),
        number(summary.get("mean_prefill_flops_ratio"), digits=3),
        number(summary.get("mean_prefill_seconds"), 1000.0), number(summary.get("decode_tokens_per_second")),
        number(memory, 1 / MIB, 0),
    ]


def runs_table(summaries: list[dict]) -> tuple[list[str], list[list[str]]]:
    """One row per run, sorted by benchmark, model and setting."""
    ordered = sorted(summaries, key=lambda s: (s.get("benchmark", ""), s.get("model", ""), str(s.get("setting", ""))))
    return list(COLUMNS), [table_row(s) for s in ordered]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(header: list[str], rows: list[list[str]]) -> None:
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)


def shape_error(summary) -> str | None:
    """What makes a parsed summary.json unusable for a table (a wrong type would otherwise end in a
    traceback or print as a number it is not), or None."""
    if not isinstance(summary, dict):
        return f"expected a JSON object, got {json_type(summary)}"
    for name in TEXT_FIELDS:
        if summary.get(name) is not None and not isinstance(summary[name], str):
            return f"{name!r} must be a string, got {json_type(summary[name])}"
    setting = summary.get("setting")
    if setting is not None and (isinstance(setting, bool) or not isinstance(setting, (str, int, float))):
        return f"'setting' must be a string or a number, got {json_type(setting)}"
    if not isinstance(summary.get("scores", {}), dict):
        return f"'scores' must be an object, got {json_type(summary['scores'])}"
    for name in NUMBER_FIELDS:
        value = summary.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            return f"{name!r} must be a finite number, got {value!r}"
    return None


def load_summary(path: Path) -> dict:
    """A summary.json, checked; anything else is a RunError naming the file."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"cannot parse {path}: {error}") from None
    except UnicodeDecodeError as error:
        raise RunError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise RunError(f"cannot read {path}: {error.strerror or error}") from None
    problem = shape_error(summary)
    if problem:
        raise RunError(f"{path} is not a run summary: {problem}")
    return summary


def paper_table(paths: list[Path], reference_file: str | None) -> tuple[list[str], list[list[str]], list[str]]:
    """The paper's layout of these summaries, and notes on what it leaves out or empty."""
    reference = read_reference(reference_file) if reference_file else None
    rows, notes = paper_rows((path, load_summary(path)) for path in paths)
    notes += fill_averages(rows)
    return *layout(rows, reference), notes


def report(args: argparse.Namespace) -> None:
    if args.reference and not args.paper:
        raise RunError("--reference compares with the paper's table: add --paper")
    paths = find_summaries(args.paths)
    if args.paper:
        header, rows, notes = paper_table(paths, args.reference)
    else:
        (header, rows), notes = runs_table([load_summary(path) for path in paths]), []
    if args.csv:
        write_csv(header, rows)
    else:
        print(markdown(header, rows))
    sys.stdout.flush()  # the notes read after the table, also where both streams go to one terminal
    for note in notes:
        print(f"note: {note}", file=sys.stderr)


@interruptible
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="summary.json files or directories to search")
    parser.add_argument("--paper", action="store_true",
                        help="one row per (model, method, setting), one column per benchmark, with Avg")
    parser.add_argument("--reference", metavar="FILE.csv",
                        help="with --paper: published numbers (same columns as --csv) beside ours, and the difference")
    parser.add_argument("--csv", action="store_true", help="CSV instead of Markdown")
    args = parser.parse_args(argv)
    main_guard(lambda: report(args))


if __name__ == "__main__":
    main()
