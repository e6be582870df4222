"""Turn LLaVA VQAv2 answers into the EvalAI upload file (test-dev answers inside the full test split).

    python -m llava.eval.convert_vqav2_for_submission --split llava_vqav2_mscoco_test-dev2015 \
        --ckpt llava-v1.5-7b [--dir ./playground/data/eval/vqav2] [--result-file merge.jsonl] [--scores-file S] \
        [--allow-partial]

Reads DIR/answers/SPLIT/CKPT/merge.jsonl (or --result-file) and writes DIR/answers_upload/SPLIT/CKPT.json:
a JSON list with one {"question_id", "answer"} per question of DIR/llava_vqav2_mscoco_test2015.jsonl, the
answer normalised as the VQA evaluator does. EvalAI wants every test question, so questions without an
answer (all those outside test-dev) get "". The answered split's own question file, DIR/SPLIT.jsonl,
says which questions need an answer: one it leaves unanswered is an error unless --allow-partial is
given (without that file, coverage is not checked and a line says so). The VQAv2 score itself comes
from the EvalAI server.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    Results,
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

DEFAULT_DIR = "./playground/data/eval/vqav2"
TEST_SPLIT_FILE = "llava_vqav2_mscoco_test2015.jsonl"
MERGED_ANSWERS_FILE = "merge.jsonl"
UNANSWERED = ""
SPLIT_FILE_SUFFIX = ".jsonl"


def load_question_ids(path: Path, what: str) -> list:
    """A question file's ids in file order, as the file spells them (integers in VQAv2)."""
    return [record["question_id"] for record in read_records(path, what, ("question_id",))]


def check_split(results: Results, split_file: Path, allow_partial: bool) -> int | None:
    """Unanswered questions of the answered split, or None (and a line saying so) without its question file."""
    if not split_file.is_file():
        print(f"coverage not checked: no question file {split_file} for this split")
        return None
    split_ids = [question_id(record) for record in read_records(split_file, "split question file", ("question_id",))]
    results.refuse_unknown(set(split_ids), f"the split question file {split_file}")
    return results.unanswered(split_ids, allow_partial)


def upload_entries(test_ids: Sequence, answers: dict[str, str]) -> list[dict]:
    """One entry per test question, in split order: the normalised answer, or "" when unanswered."""
    return [
        {"question_id": question,
         "answer": normalize_answer(answers[str(question)]) if str(question) in answers else UNANSWERED}
        for question in test_ids
    ]


def run(args: argparse.Namespace) -> dict:
    data_dir = Path(args.dir)
    default_result = data_dir / "answers" / args.split / args.ckpt / MERGED_ANSWERS_FILE
    result_file = Path(args.result_file) if args.result_file else default_result
    upload_file = data_dir / "answers_upload" / args.split / f"{args.ckpt}.json"
    test_ids = load_question_ids(data_dir / TEST_SPLIT_FILE, "test split file")
    results = read_results(result_file)
    results.refuse_unknown({str(question) for question in test_ids}, "the test split; is --dir right?")
    unanswered = check_split(results, data_dir / f"{args.split}{SPLIT_FILE_SUFFIX}", args.allow_partial)
    answers = results.texts()
    scores = {"answered": len(answers), "total": len(test_ids)}
    if args.allow_partial and unanswered is not None:
        scores["unanswered"] = unanswered
    write_output(upload_file, json.dumps(upload_entries(test_ids, answers)), "upload file")
    write_scores_if_asked(args, scores)
    print(f"total results: {len(answers)}, total split: {len(test_ids)}")
    if "unanswered" in scores:
        print(unanswered_line(unanswered, len(answers) + unanswered))
    print(f"upload file for EvalAI: {upload_file}")
    return scores


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=DEFAULT_DIR, help="the vqav2 folder (holds the test split file)")
    parser.add_argument("--ckpt", required=True, help="name of the answers folder and of the upload file")
    parser.add_argument("--split", required=True, help="question file name without .jsonl")
    parser.add_argument("--result-file", help="answers JSONL (default: DIR/answers/SPLIT/CKPT/merge.jsonl)")
    add_scoring_flags(parser, "also write {answered, total} as JSON here (for summary.json)")
    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
