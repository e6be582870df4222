"""Score LLaVA answers on GQA testdev-balanced: exact-match accuracy, overall and per question type.

    python -m llava.eval.eval_gqa --questions testdev_balanced_questions.json \
        (--predictions testdev_balanced_predictions.json | --result-file merge.jsonl [--predictions P]) \
        [--scores-file S] [--allow-partial]

With --result-file the LLaVA answers are first converted as LLaVA's convert_gqa_for_eval does
(`[{"questionId", "prediction"}]`, prediction = answer with trailing periods removed, lower-cased)
and, once scored, written to --predictions if given; otherwise the predictions file is read. As in
GQA's own eval.py, only questions marked `isBalanced` (all of testdev_balanced) are scored, a
prediction must equal the question's "answer" exactly, and accuracy is over every balanced question:
each needs a prediction, unless --allow-partial is given, which counts the unpredicted ones wrong.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    AnswerKey,
    ScoringError,
    add_scoring_flags,
    check_coverage,
    json_type,
    percent,
    read_json,
    read_results,
    run_scorer_cli,
    unanswered_line,
    write_output,
    write_scores_if_asked,
)

TYPE_KINDS = ("structural", "semantic")
PREDICTION_FIELDS = ("questionId", "prediction")
PREDICTION_KEY = AnswerKey("questionId", str)


def load_questions(path: str | Path) -> dict[str, dict[str, Any]]:
    """Every question of a GQA questions JSON (question id -> question), balanced or not."""
    questions = read_json(path, "questions file")
    if not isinstance(questions, dict):
        raise ScoringError(f"questions file {path} is not a GQA dict of question id -> question")
    for question_id, question in questions.items():
        if not isinstance(question, dict) or "answer" not in question:
            raise ScoringError(f"questions file {path}: question {question_id!r} has no 'answer'")
    return {str(question_id): question for question_id, question in questions.items()}


def prediction_text(answer: str) -> str:
    """LLaVA's conversion of a free-form answer into a GQA prediction."""
    return answer.rstrip(".").lower()


def convert_results(result_file: str | Path, questions: Collection[str] | None = None) -> list[dict[str, Any]]:
    """LLaVA answers JSONL -> GQA predictions list; with `questions`, an answer to another question is refused."""
    results = read_results(result_file)
    if questions is not None:
        results.refuse_unknown(questions, "the questions file")
    return [{"questionId": answer.record["question_id"], "prediction": prediction_text(answer.text)}
            for answer in results.answers.values()]


def load_predictions(path: str | Path) -> list[Any]:
    predictions = read_json(path, "predictions file")
    if not isinstance(predictions, list):
        raise ScoringError(f"predictions file {path} is not a list of {{'questionId', 'prediction'}}")
    return predictions


def index_predictions(predictions: list[Any], source: str) -> dict[str, str]:
    """Prediction by question id; entries (counted from 1) must be well formed and predict a question once."""
    by_id: dict[str, str] = {}
    first_entry: dict[str, int] = {}
    for number, entry in enumerate(predictions, start=1):
        where = f"{source}, entry {number}"
        if not isinstance(entry, dict) or not all(name in entry for name in PREDICTION_FIELDS):
            raise ScoringError(f"{where}: expected an object with 'questionId' and 'prediction'")
        question_id, prediction = entry["questionId"], entry["prediction"]
        if isinstance(question_id, bool) or not isinstance(question_id, (str, int)):
            raise ScoringError(f"{where}: questionId must be a string or an integer, got {json_type(question_id)}")
        if not isinstance(prediction, str):
            raise ScoringError(f"{where}: 'prediction' must be a string, got {json_type(prediction)}")
        key = str(question_id)
        if key in by_id:
            raise ScoringError(f"{source}: questionId {key} is predicted twice, in entries {first_entry[key]} "
                               f"and {number}")
        by_id[key], first_entry[key] = prediction, number
    return by_id



def score_predictions(questions: dict[str, dict[str, Any]], predictions: list[Any], source: str = "predictions",
                      allow_partial: bool = False) -> dict[str, Any]:
    """`{"questions", "accuracy", "structural": {type: acc}, "semantic": {type: acc}}`, accuracies in percent
    over every balanced question (+ "unanswered" when partial predictions are allowed)."""
    balanced = [question_id for question_id, question in questions.items() if question.get("isBalanced", True)]
    if not balanced:
        raise ScoringError("no balanced questions to score")
    by_id = index_predictions(predictions, source)
    unknown = next((question_id for question_id in by_id if question_id not in questions), None)
    if unknown is not None:
        raise ScoringError(f"{source}: questionId {unknown} is not in the questions file")
    unanswered = check_coverage(by_id, balanced, allow_partial, source, PREDICTION_KEY)
    correct = 0
    per_type = {kind: defaultdict(lambda: [0, 0]) for kind in TYPE_KINDS}
    for question_id in balanced:
        question = questions[question_id]
        right = by_id.get(question_id) == question["answer"]
        correct += right
        for kind in TYPE_KINDS:
            type_name = question.get("types", {}).get(kind)
            if type_name is not None:
                per_type[kind][type_name][0] += right
                per_type[kind][type_name][1] += 1
    scores: dict[str, Any] = {"questions": len(balanced), "accuracy": percent(correct, len(balanced))}
    for kind in TYPE_KINDS:
        scores[kind] = {name: percent(*counts) for name, counts in sorted(per_type[kind].items())}
    if allow_partial:
        scores["unanswered"] = unanswered
    return scores


def _print_scores(scores: dict[str, Any]) -> None:
    print(f"Questions: {scores['questions']}\nAccuracy: {scores['accuracy']:.2f}%")
    if "unanswered" in scores:
        print(unanswered_line(scores["unanswered"], scores["questions"]))
    for kind in TYPE_KINDS:
        for name, accuracy in scores[kind].items():
            print(f"  {kind} {name}: {accuracy:.2f}%")


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", required=True, help="GQA questions JSON (testdev_balanced_questions.json)")
    parser.add_argument("--predictions", help="GQA predictions JSON: read it, or with --result-file write it")
    parser.add_argument("--result-file", help="LLaVA answers JSONL to convert and score")
    add_scoring_flags(parser)

    def run(args: argparse.Namespace) -> None:
        if not args.result_file and not args.predictions:
            parser.error("give --predictions and/or --result-file")
        questions = load_questions(args.questions)
        if args.result_file:
            predictions = convert_results(args.result_file, questions)
            source = f"result file {args.result_file}"
        else:
            predictions = load_predictions(args.predictions)
            source = f"predictions file {args.predictions}"
        scores = score_predictions(questions, predictions, source, args.allow_partial)
        if args.result_file and args.predictions:
            write_output(args.predictions, json.dumps(predictions), "predictions file")
        write_scores_if_asked(args, scores)
        _print_scores(scores)

    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
