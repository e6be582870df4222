"""Tabulate run summaries: `python -m llava.eval.report DIR_OR_FILE...` prints one Markdown table.

Every `summary.json` under the given directories (as written by the benchmark scripts) becomes a row,
so a user's runs read like the paper's table: benchmark, setting, score, tokens, FLOPs, speed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llava.drop.methods.registry import family_of
from llava.eval.cli_errors import RunError, main_guard

SUMMARY_NAME = "summary.json"
COLUMNS = ("benchmark", "model", "method", "family", "setting", "questions", "scores", "vision tokens",
           "FLOPs ratio", "prefill ms", "decode tok/s", "peak memory MiB")
MIB = 1024 * 1024


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


def table_row(summary: dict) -> list[str]:
    memory = summary.get("peak_memory_bytes", summary.get("peak_rss_bytes"))
    return [
        summary.get("benchmark", "?"), summary.get("model", "?"), summary.get("method", "?"),
        summary.get("family") or family_of(summary.get("method", "?")),
        str(summary.get("setting", "?")), str(summary.get("questions", "?")), format_scores(summary.get("scores", {})),
        number(summary.get("mean_vision_tokens")), number(summary.get("mean_prefill_flops_ratio"), digits=3),
        number(summary.get("mean_prefill_seconds"), 1000.0), number(summary.get("decode_tokens_per_second")),
        number(memory, 1 / MIB, 0),
    ]


def markdown_table(summaries: list[dict]) -> str:
    rows = [table_row(s) for s in sorted(summaries, key=lambda s: (s.get("benchmark", ""), s.get("model", ""), str(s.get("setting", ""))))]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def load_summary(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RunError(f"cannot parse {path}: {error}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="summary.json files or directories to search")
    args = parser.parse_args(argv)
    main_guard(lambda: print(markdown_table([load_summary(p) for p in find_summaries(args.paths)])))


if __name__ == "__main__":
    main()
