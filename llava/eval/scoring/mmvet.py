"""Turn LLaVA MM-Vet answers into the results JSON the official MM-Vet evaluator grades.

    python -m llava.eval.convert_mmvet_for_eval --src merge.jsonl --dst results/llava-v1.5-7b.json \
        [--question-file llava-mm-vet.jsonl] [--allow-partial]

The output maps "v1_<question_id>" to the answer text. MM-Vet is graded by GPT-4 in the official
evaluator (github.com/yuweihao/MM-Vet), so nothing is scored here. With --question-file every question
needs an answer (unless --allow-partial) and an answer to another question is an error; without it,
coverage is not checked and a line says so.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    ALLOW_PARTIAL_HELP,
    Results,
    ScoringError,
    question_id,
    read_records,
    read_results,
    refuse_input,
    unanswered_line,
    write_json,
)

MMVET_KEY_PREFIX = "v1_"
ANSWERS_FILE = "answers file"


def mmvet_results(answers: Results) -> dict[str, str]:
    """{"v1_<question_id>": answer text} for every answer, in file order."""
    return {f"{MMVET_KEY_PREFIX}{key}": text for key, text in answers.texts().items()}


def check_questions(answers: Results, question_file: str | Path, allow_partial: bool) -> int:
    """Refuse answers to questions the file does not ask; the number of its questions left unanswered."""
    question_ids = [question_id(record) for record in read_records(question_file, "question file", ("question_id",))]
    answers.refuse_unknown(set(question_ids), "the question file")
    return answers.unanswered(question_ids, allow_partial)


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="LLaVA answers JSONL (merge.jsonl)")
    parser.add_argument("--dst", required=True, help="results JSON for the MM-Vet evaluator")
    parser.add_argument("--question-file", help="MM-Vet question JSONL (llava-mm-vet.jsonl), to check coverage")
    parser.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    args = parser.parse_args(argv)
    try:
        answers = read_results(args.src, what=ANSWERS_FILE)
        unanswered = check_questions(answers, args.question_file, args.allow_partial) if args.question_file else None
        results = mmvet_results(answers)
        write_json(args.dst, results, "results file")
    except ScoringError as error:
        refuse_input(parser, error)
    if unanswered is None:
        print("coverage not checked: give --question-file to check that every question is answered")
    elif args.allow_partial:
        print(unanswered_line(unanswered, len(results) + unanswered))
    print(f"{len(results)} answers written to {args.dst}; grade them with the official MM-Vet evaluator "
          "(GPT-4), as MM-Vet is not scored locally")


if __name__ == "__main__":
    main()
