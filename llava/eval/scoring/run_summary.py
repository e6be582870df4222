"""Write a run's `summary.json`: what was run, its scores and its efficiency figures, in one file.

    python -m llava.eval.scoring.run_summary --answers-file A --benchmark gqa --setting 64 --model-path M \
        [--scores-file scores.json] [--drop-flags "--sparse --global_thr 0.011 --individual_thr 0.01"] --out summary.json

`python -m llava.eval.report DIR...` turns many of these into one table.
"""

from __future__ import annotations

import argparse
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from llava.drop.methods.registry import family_of
from llava.eval.jsonl import read_jsonl
from llava.eval.cli_errors import RunError, interruptible, main_guard
from llava.eval.scoring.summary import summarize_answers
from llava.output_paths import OutputPathError, check_output_file

VERSIONED_PACKAGES = ("mustdrop", "torch", "transformers", "accelerate")


def software_versions() -> dict:
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def method_of(drop_flags: str) -> str:
    """The method a run used, read back from its dropping flags (`--method X` or `--sparse`)."""
    flags = drop_flags.split()
    if "--method" in flags and flags.index("--method") + 1 < len(flags):
        return flags[flags.index("--method") + 1]
    return "mustdrop" if "--sparse" in flags else "none"


def build_summary(answers_file: Path, benchmark: str, setting: str, model_path: str, drop_flags: str,
                  scores: dict) -> dict:
    try:
        records = read_jsonl(answers_file, "answers file")
        statistics = summarize_answers(records, f"answers file {answers_file}")
    except (OSError, ValueError) as error:
        raise RunError(str(error)) from None
    return {
        "benchmark": benchmark,
        "model": Path(model_path.rstrip("/")).name,
        "model_path": model_path,
        "method": method_of(drop_flags),
        "family": family_of(method_of(drop_flags)),
        "setting": setting,
        "drop_flags": drop_flags,
        "questions": len(records),
        "scores": scores,
        **statistics,
        "versions": software_versions(),
    }


def read_scores(path: str | None) -> dict:
    """A scorer's scores.json: a JSON object of scores (numbers, or objects of them per category)."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        scores = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunError(f"cannot parse scores file {path}: {error}") from None
    except UnicodeDecodeError as error:
        raise RunError(f"scores file {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise RunError(f"cannot read scores file {path}: {error.strerror or error}") from None
    if not isinstance(scores, dict):
        raise RunError(f"scores file {path} is not a scorer's output: expected a JSON object, got "
                       f"{type(scores).__name__}")
    return scores


@interruptible
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--answers-file", required=True)
    parser.add_argument("--benchmark", required=True)
    parser.add_argument("--setting", required=True)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--scores-file", default=None, help="JSON dict written by the benchmark's scorer")
    parser.add_argument("--drop-flags", default="", help="the dropping flags the run used, as one string")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    def run() -> None:
        try:
            check_output_file(args.out, "--out")
        except OutputPathError as error:
            raise RunError(str(error)) from None
        summary = build_summary(Path(args.answers_file), args.benchmark, args.setting, args.model_path,
                                args.drop_flags, read_scores(args.scores_file))
        try:
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
        except OSError as error:
            raise RunError(f"cannot write --out {args.out}: {error.strerror or error}") from None
        print(f"summary: {args.out}")

    main_guard(run)


if __name__ == "__main__":
    main()
