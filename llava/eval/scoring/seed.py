"""Score LLaVA SEED-Bench answers (image questions) and write the leaderboard's upload JSONL.

    python -m llava.eval.convert_seed_for_submission --annotation-file SEED-Bench.json \
        --result-file merge.jsonl --result-upload-file upload.jsonl [--scores-file scores.json] [--allow-partial]

Every image question of SEED-Bench.json needs an answer unless --allow-partial is given; accuracy, as
in LLaVA's converter, counts the image questions the result file answers, overall and per question
type. An answer is read as the option letter it starts with ("B", "B.", "(B) a dog"); an answer that
starts with no option letter is wrong. Video questions may be answered but are not scored.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    Results,
    ScoringError,
    add_scoring_flags,
    check_label,
    percent,
    read_json,
    read_results,
    run_scorer_cli,
    unanswered_line,
    write_output,
    write_scores_if_asked,
)

SCORED_DATA_TYPE = "image"
# An upper-case option letter, after any leading spaces or brackets, that does not begin a word:
# "A", "A.", "(A) cat" parse; "Apple" and "a cat" (the article) do not.
OPTION_LETTERS = ("A", "B", "C", "D")  # every SEED-Bench question has four options
OPTION_LETTER = re.compile(rf"^\W*([{''.join(OPTION_LETTERS)}])(?![A-Za-z])")


@dataclass(frozen=True)
class SeedQuestion:
    """The fields of one SEED-Bench.json question that scoring needs."""

    question_id: str
    answer: str
    data_type: str
    type_id: int
    type_name: str


def option_letter(answer: str) -> str | None:
    """The option letter a model's answer starts with, or None when it starts with none."""
    match = OPTION_LETTER.match(answer)
    return match.group(1) if match else None


def load_annotations(annotation_file: str | Path) -> list[SeedQuestion]:
    """Every question of SEED-Bench.json with its question type's name, in file order."""
    path = Path(annotation_file)
    data = read_json(path, "annotation file")
    try:
        type_names = {type_id: name for name, type_id in data["question_type"].items()}
        return [
            SeedQuestion(str(q["question_id"]), check_label(q["answer"], OPTION_LETTERS, f"annotation file {path}, "
                                                            f"question {q['question_id']}"),
                         q["data_type"], q["question_type_id"], type_names[q["question_type_id"]])
            for q in data["questions"]
        ]
    except (KeyError, TypeError, AttributeError) as error:
        raise ScoringError(
            f"annotation file {str(path)!r} is not SEED-Bench JSON ('questions' with question_id, answer, "
            f"data_type and a question_type_id listed in 'question_type'): missing {error}"
        ) from None


def read_answers(result_file: str | Path, questions: Sequence[SeedQuestion]) -> Results:
    """The checked result file; an answer to a question SEED-Bench.json does not ask is an error."""
    results = read_results(result_file)
    results.refuse_unknown({q.question_id for q in questions}, "the annotation file; is it the right SEED-Bench.json?")
    return results



def score_seed(questions: Sequence[SeedQuestion], answers: dict[str, str]) -> dict:
    """`{"samples", "accuracy", "per_type": {type name: accuracy}}` over the answered image questions."""
    scored = [q for q in questions if q.data_type == SCORED_DATA_TYPE and q.question_id in answers]
    if not scored:
        raise ScoringError("the result file answers none of the annotation file's image questions")
    correct = {q.question_id for q in scored if option_letter(answers[q.question_id]) == q.answer}
    per_type = {}
    for type_id, name in sorted({(q.type_id, q.type_name) for q in scored}):
        of_type = [q for q in scored if q.type_id == type_id]
        per_type[name] = percent(sum(q.question_id in correct for q in of_type), len(of_type))
    return {"samples": len(scored), "accuracy": percent(len(correct), len(scored)), "per_type": per_type}


def upload_records(questions: Sequence[SeedQuestion], answers: dict[str, str]) -> list[dict]:
    """The leaderboard's lines for the answered questions, in annotation order; an answer with no
    option letter is kept as written (the leaderboard counts it wrong, as we do)."""
    records = []
    for question in questions:
        if question.question_id in answers:
            text = answers[question.question_id]
            records.append({"question_id": question.question_id, "prediction": option_letter(text) or text})
    return records


def print_scores(scores: dict) -> None:
    """LLaVA's report: one line per question type, then the image accuracy."""
    for name, accuracy in scores["per_type"].items():
        print(f"{name}: {accuracy:.2f}%")
    print(f"Samples: {scores['samples']}")
    if "unanswered" in scores:
        print(unanswered_line(scores["unanswered"], scores["samples"] + scores["unanswered"]))
    print(f"{SCORED_DATA_TYPE} accuracy: {scores['accuracy']:.2f}%")


def run(args: argparse.Namespace) -> dict:
    questions = load_annotations(args.annotation_file)
    results = read_answers(args.result_file, questions)
    image_questions = [q.question_id for q in questions if q.data_type == SCORED_DATA_TYPE]
    unanswered = results.unanswered(image_questions, args.allow_partial)
    answers = results.texts()
    scores = score_seed(questions, answers)
    if args.allow_partial:
        scores["unanswered"] = unanswered
    upload = "".join(json.dumps(record) + "\n" for record in upload_records(questions, answers))
    write_output(args.result_upload_file, upload, "upload file")
    write_scores_if_asked(args, scores)
    print_scores(scores)
    return scores


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotation-file", required=True, help="SEED-Bench.json")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL (merge.jsonl)")
    parser.add_argument("--result-upload-file", required=True, help="JSONL to upload to the SEED-Bench leaderboard")
    add_scoring_flags(parser)
    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
