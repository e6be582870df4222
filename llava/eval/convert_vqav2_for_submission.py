"""Turn LLaVA VQAv2 answers into the EvalAI upload file (test-dev answers inside the full test split).

    python -m llava.eval.convert_vqav2_for_submission --split llava_vqav2_mscoco_test-dev2015 \
        --ckpt llava-v1.5-7b [--dir ./playground/data/eval/vqav2] [--result-file merge.jsonl] [--scores-file S]

Reads DIR/answers/SPLIT/CKPT/merge.jsonl (or --result-file) and writes DIR/answers_upload/SPLIT/CKPT.json:
a JSON list with one {"question_id", "answer"} per question of DIR/llava_vqav2_mscoco_test2015.jsonl, the
answer normalised as the VQA evaluator does. EvalAI wants every test question, so questions without an
answer (all those outside test-dev) get "". The VQAv2 score itself comes from the EvalAI server.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from llava.eval.answers_file import answers_by_question_id, read_jsonl
from llava.eval.m4c_evaluator import normalize_answer

DEFAULT_DIR = "./playground/data/eval/vqav2"
TEST_SPLIT_FILE = "llava_vqav2_mscoco_test2015.jsonl"
MERGED_ANSWERS_FILE = "merge.jsonl"
UNANSWERED = ""


class VQAv2ConversionError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def _read(path: Path, what: str) -> list[dict]:
    try:
        records = read_jsonl(path, what)
    except (OSError, ValueError) as error:
        raise VQAv2ConversionError(str(error)) from None
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or "question_id" not in record:
            raise VQAv2ConversionError(f"{what} {path}, record {number}: has no 'question_id'")
    return records


def load_test_question_ids(path: Path) -> list:
    """The test split's question ids in file order, as the file spells them (integers in VQAv2)."""
    return [record["question_id"] for record in _read(path, "test split file")]


def load_answers(path: Path, test_ids: Sequence) -> dict[str, str]:
    """Answer text by question id; every answer must belong to the test split."""
    known = {str(question_id) for question_id in test_ids}
    try:
        return answers_by_question_id(path, known, "is not in the test split; is --dir right?")
    except (OSError, ValueError) as error:
        raise VQAv2ConversionError(str(error)) from None


def upload_entries(test_ids: Sequence, answers: dict[str, str]) -> list[dict]:
    """One entry per test question, in split order: the normalised answer, or "" when unanswered."""
    return [
        {"question_id": question_id,
         "answer": normalize_answer(answers[str(question_id)]) if str(question_id) in answers else UNANSWERED}
        for question_id in test_ids
    ]


def _write(path: Path, text: str, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise VQAv2ConversionError(f"cannot write {what} {str(path)!r}: {error}") from None


def run(args: argparse.Namespace) -> dict:
    data_dir = Path(args.dir)
    default_result = data_dir / "answers" / args.split / args.ckpt / MERGED_ANSWERS_FILE
    result_file = Path(args.result_file) if args.result_file else default_result
    upload_file = data_dir / "answers_upload" / args.split / f"{args.ckpt}.json"
    test_ids = load_test_question_ids(data_dir / TEST_SPLIT_FILE)
    answers = load_answers(result_file, test_ids)
    print(f"total results: {len(answers)}, total split: {len(test_ids)}")
    _write(upload_file, json.dumps(upload_entries(test_ids, answers)), "upload file")
    print(f"upload file for EvalAI: {upload_file}")
    scores = {"answered": len(answers), "total": len(test_ids)}
    if args.scores_file:
        _write(Path(args.scores_file), json.dumps(scores, indent=2) + "\n", "scores file")
    return scores


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=DEFAULT_DIR, help="the vqav2 folder (holds the test split file)")
    parser.add_argument("--ckpt", required=True, help="name of the answers folder and of the upload file")
    parser.add_argument("--split", required=True, help="question file name without .jsonl")
    parser.add_argument("--result-file", help="answers JSONL (default: DIR/answers/SPLIT/CKPT/merge.jsonl)")
    parser.add_argument("--scores-file", help="also write {answered, total} as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    try:
        run(args)
    except VQAv2ConversionError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
