"""Turn LLaVA VizWiz answers into the JSON list the VizWiz test-dev server accepts.

    python -m llava.eval.convert_vizwiz_for_submission --annotation-file llava_test.jsonl \
        --result-file merge.jsonl --result-upload-file answers_upload/<model>.json [--scores-file S]

The upload holds one `{"image", "answer"}` per question of the question file, in its order. Answers
are normalised with the EvalAI VQA processor; one that normalises to nothing (e.g. "." or "The") is
sent as "unanswerable", VizWiz's label for questions the image cannot answer.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.answers_file import read_jsonl, write_scores
from llava.eval.m4c_evaluator import normalize_answer

UNANSWERABLE = "unanswerable"
MISSING_IDS_SHOWN = 5


class VizWizConversionError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def _read_records(path: str | Path, what: str, required: set[str]) -> list[dict[str, Any]]:
    """JSONL records, each checked for the fields this converter reads."""
    try:
        records = read_jsonl(path, what)
    except (OSError, ValueError) as error:
        raise VizWizConversionError(str(error)) from None
    for number, record in enumerate(records, start=1):
        missing = required - set(record) if isinstance(record, dict) else required
        if missing:
            raise VizWizConversionError(f"{what} {path}, record {number}: lacks {sorted(missing)}")
    return records


def submission_answer(text: str) -> str:
    """The answer as the server should see it: EvalAI-normalised, never empty."""
    return normalize_answer(text) or UNANSWERABLE


def build_submission(questions: list[dict[str, Any]], results: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One upload entry per question, in question order; a later answer to the same id wins."""
    answers = {result["question_id"]: result["text"] for result in results}
    missing = [question["question_id"] for question in questions if question["question_id"] not in answers]
    if missing:
        shown = ", ".join(map(repr, missing[:MISSING_IDS_SHOWN]))
        raise VizWizConversionError(f"{len(missing)} question(s) have no answer, e.g. question_id {shown}")
    return [
        {"image": question["image"], "answer": submission_answer(answers[question["question_id"]])}
        for question in questions
    ]


def convert_vizwiz(annotation_file: str | Path, result_file: str | Path, upload_file: str | Path) -> dict[str, int]:
    """Write the upload file; returns `{"answers": n, "unanswerable": k}` for the run summary."""
    questions = _read_records(annotation_file, "question file", {"question_id", "image"})
    results = _read_records(result_file, "result file", {"question_id", "text"})
    submission = build_submission(questions, results)
    upload_path = Path(upload_file)
    upload_path.parent.mkdir(parents=True, exist_ok=True)
    upload_path.write_text(json.dumps(submission))
    unanswerable = sum(entry["answer"] == UNANSWERABLE for entry in submission)
    return {"answers": len(submission), "unanswerable": unanswerable}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-file", required=True, help="VizWiz question file (llava_test.jsonl)")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--result-upload-file", required=True, help="JSON file to upload to the VizWiz server")
    parser.add_argument("--scores-file", help="also write the answer counts as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    try:
        counts = convert_vizwiz(args.annotation_file, args.result_file, args.result_upload_file)
    except VizWizConversionError as error:
        parser.error(str(error))
    print(f"Answers: {counts['answers']}\nUnanswerable: {counts['unanswerable']}")
    print(f"Upload file: {args.result_upload_file}")
    write_scores(args.scores_file, counts)


if __name__ == "__main__":
    main()
