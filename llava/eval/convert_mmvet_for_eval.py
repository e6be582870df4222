"""Turn LLaVA MM-Vet answers into the results JSON the official MM-Vet evaluator grades.

    python -m llava.eval.convert_mmvet_for_eval --src merge.jsonl --dst results/llava-v1.5-7b.json

The output maps "v1_<question_id>" to the answer text. MM-Vet is graded by GPT-4 in the official
evaluator (github.com/yuweihao/MM-Vet), so nothing is scored here.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from llava.eval.answers_file import answers_by_question_id

MMVET_KEY_PREFIX = "v1_"


class MMVetConversionError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def mmvet_results(src: str | Path) -> dict[str, str]:
    """{"v1_<question_id>": answer text} for every answer in `src`, in file order."""
    try:
        answers = answers_by_question_id(src)
    except (OSError, ValueError) as error:
        raise MMVetConversionError(str(error)) from None
    results = {f"{MMVET_KEY_PREFIX}{question_id}": text for question_id, text in answers.items()}
    if not results:
        raise MMVetConversionError(f"answers file {src} holds no answers")
    return results


def write_results(results: dict[str, str], dst: Path) -> None:
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    except OSError as error:
        raise MMVetConversionError(f"cannot write results file {str(dst)!r}: {error}") from None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="LLaVA answers JSONL (merge.jsonl)")
    parser.add_argument("--dst", required=True, help="results JSON for the MM-Vet evaluator")
    args = parser.parse_args(argv)
    try:
        results = mmvet_results(args.src)
        write_results(results, Path(args.dst))
    except MMVetConversionError as error:
        parser.error(str(error))
    print(f"{len(results)} answers written to {args.dst}; grade them with the official MM-Vet evaluator "
          "(GPT-4), as MM-Vet is not scored locally")


if __name__ == "__main__":
    main()
