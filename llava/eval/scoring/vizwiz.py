"""Turn LLaVA VizWiz answers into the JSON list the VizWiz test-dev server accepts.

    python -m llava.eval.convert_vizwiz_for_submission --annotation-file llava_test.jsonl \
        --result-file merge.jsonl --result-upload-file answers_upload/<model>.json [--scores-file S] \
        [--allow-partial]

The upload holds one `{"image", "answer"}` per question of the question file, in its order, so every
question needs an answer; with --allow-partial the unanswered ones are left out of the upload (and
counted). Answers are normalised with the EvalAI VQA processor; one that normalises to nothing (e.g.
"." or "The") is sent as "unanswerable", VizWiz's label for questions the image cannot answer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    add_scoring_flags,
    question_id,
    read_records,
    read_results,
    run_scorer_cli,
    unanswered_line,
    write_output,
    write_scores_if_asked,
)
from llava.eval.scoring.vqa_accuracy import normalize_answer

UNANSWERABLE = "unanswerable"


def submission_answer(text: str) -> str:
    """The answer as the server should see it: EvalAI-normalised, never empty."""
    return normalize_answer(text) or UNANSWERABLE


def build_submission(questions: list[dict[str, Any]], answers: dict[str, str]) -> list[dict[str, str]]:
    """One upload entry per answered question, in question order."""
    return [
        {"image": question["image"], "answer": submission_answer(answers[question_id(question)])}
        for question in questions if question_id(question) in answers
    ]


def convert_vizwiz(annotation_file: str | Path, result_file: str | Path, upload_file: str | Path,
                   allow_partial: bool = False) -> dict[str, int]:
    """Write the upload file; returns `{"answers": n, "unanswerable": k}` (+ "unanswered" when partial)."""
    questions = read_records(annotation_file, "question file", ("question_id", "image"))
    results = read_results(result_file)
    results.refuse_unknown({question_id(question) for question in questions}, "the question file")
    unanswered = results.unanswered([question_id(question) for question in questions], allow_partial)
    submission = build_submission(questions, results.texts())
    write_output(upload_file, json.dumps(submission), "upload file")
    counts = {"answers": len(submission), "unanswerable": sum(entry["answer"] == UNANSWERABLE for entry in submission)}
    if allow_partial:
        counts["unanswered"] = unanswered
    return counts


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-file", required=True, help="VizWiz question file (llava_test.jsonl)")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--result-upload-file", required=True, help="JSON file to upload to the VizWiz server")
    add_scoring_flags(parser, "also write the answer counts as JSON here (for summary.json)")

    def run(args: argparse.Namespace) -> None:
        counts = convert_vizwiz(args.annotation_file, args.result_file, args.result_upload_file, args.allow_partial)
        write_scores_if_asked(args, counts)
        print(f"Answers: {counts['answers']}\nUnanswerable: {counts['unanswerable']}")
        if "unanswered" in counts:
            print(unanswered_line(counts["unanswered"], counts["answers"] + counts["unanswered"]))
        print(f"Upload file: {args.result_upload_file}")

    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
