"""Score LLaVA answers on GQA testdev-balanced: exact-match accuracy, overall and per question type.

    python -m llava.eval.eval_gqa --questions testdev_balanced_questions.json \
        (--predictions testdev_balanced_predictions.json | --result-file merge.jsonl [--predictions P]) \
        [--scores-file S]

With --result-file the LLaVA answers are first converted as LLaVA's convert_gqa_for_eval does
(`[{"questionId", "prediction"}]`, prediction = answer with trailing periods removed, lower-cased)
and, if --predictions is given, written there; otherwise the predictions file is read. As in GQA's
own eval.py, only questions marked `isBalanced` (all of testdev_balanced) are scored, a prediction
must equal the question's "answer" exactly, and every scored question needs a prediction.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.answers_file import read_jsonl, write_scores

TYPE_KINDS = ("structural", "semantic")
MISSING_IDS_SHOWN = 5
PERCENT = 100.0


class GQAScoringError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def _read_json(path: str | Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise GQAScoringError(f"cannot read {what} {str(path)!r}: {error}") from None


def load_questions(path: str | Path) -> dict[str, dict[str, Any]]:
    """The balanced questions of a GQA questions JSON (question id -> question)."""
    questions = _read_json(path, "questions file")
    if not isinstance(questions, dict):
        raise GQAScoringError(f"questions file {str(path)!r} is not a GQA dict of question id -> question")
    for question_id, question in questions.items():
        if not isinstance(question, dict) or "answer" not in question:
            raise GQAScoringError(f"questions file {str(path)!r}: question {question_id!r} has no 'answer'")
    return {str(qid): question for qid, question in questions.items() if question.get("isBalanced", True)}


def prediction_text(answer: str) -> str:
    """LLaVA's conversion of a free-form answer into a GQA prediction."""
    return answer.rstrip(".").lower()


def convert_results(result_file: str | Path) -> list[dict[str, str]]:
    """LLaVA answers JSONL -> GQA predictions list."""
    try:
        results = read_jsonl(result_file, "result file")
    except (OSError, ValueError) as error:
        raise GQAScoringError(str(error)) from None
    predictions = []
    for number, result in enumerate(results, start=1):
        if not isinstance(result, dict) or not {"question_id", "text"} <= set(result):
            raise GQAScoringError(f"result file {result_file}, record {number}: lacks 'question_id' or 'text'")
        predictions.append({"questionId": result["question_id"], "prediction": prediction_text(result["text"])})
    return predictions


def load_predictions(path: str | Path) -> list[dict[str, Any]]:
    predictions = _read_json(path, "predictions file")
    if not isinstance(predictions, list) or not all(
        isinstance(entry, dict) and {"questionId", "prediction"} <= set(entry) for entry in predictions
    ):
        raise GQAScoringError(f"predictions file {str(path)!r} is not a list of {{'questionId', 'prediction'}}")
    return predictions


def _percent(correct: int, total: int) -> float:
    return PERCENT * correct / total


def score_predictions(questions: dict[str, dict[str, Any]], predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """`{"questions", "accuracy", "structural": {type: acc}, "semantic": {type: acc}}`, accuracies in percent."""
    if not questions:
        raise GQAScoringError("no balanced questions to score")
    by_id = {str(entry["questionId"]): entry["prediction"] for entry in predictions}
    missing = [question_id for question_id in questions if question_id not in by_id]
    if missing:
        shown = ", ".join(map(repr, missing[:MISSING_IDS_SHOWN]))
        raise GQAScoringError(f"{len(missing)} question(s) have no prediction, e.g. questionId {shown}")
    correct = 0
    per_type = {kind: defaultdict(lambda: [0, 0]) for kind in TYPE_KINDS}
    for question_id, question in questions.items():
        right = by_id[question_id] == question["answer"]
        correct += right
        for kind in TYPE_KINDS:
            type_name = question.get("types", {}).get(kind)
            if type_name is not None:
                per_type[kind][type_name][0] += right
                per_type[kind][type_name][1] += 1
    scores: dict[str, Any] = {"questions": len(questions), "accuracy": _percent(correct, len(questions))}
    for kind in TYPE_KINDS:
        scores[kind] = {name: _percent(*counts) for name, counts in sorted(per_type[kind].items())}
    return scores


def score_gqa(questions_file: str | Path, predictions: list[dict[str, Any]]) -> dict[str, Any]:
    """Score a predictions list against a GQA questions file; raises GQAScoringError on bad input."""
    return score_predictions(load_questions(questions_file), predictions)


def _print_scores(scores: dict[str, Any]) -> None:
    print(f"Questions: {scores['questions']}\nAccuracy: {scores['accuracy']:.2f}%")
    for kind in TYPE_KINDS:
        for name, accuracy in scores[kind].items():
            print(f"  {kind} {name}: {accuracy:.2f}%")


def _predictions_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Convert --result-file (saving to --predictions if given), or read --predictions."""
    if args.result_file is None:
        return load_predictions(args.predictions)
    predictions = convert_results(args.result_file)
    if args.predictions:
        Path(args.predictions).parent.mkdir(parents=True, exist_ok=True)
        Path(args.predictions).write_text(json.dumps(predictions))
    return predictions


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--questions", required=True, help="GQA questions JSON (testdev_balanced_questions.json)")
    parser.add_argument("--predictions", help="GQA predictions JSON: read it, or with --result-file write it")
    parser.add_argument("--result-file", help="LLaVA answers JSONL to convert and score")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    if not args.result_file and not args.predictions:
        parser.error("give --predictions and/or --result-file")
    try:
        scores = score_gqa(args.questions, _predictions_from_args(args))
    except GQAScoringError as error:
        parser.error(str(error))
    _print_scores(scores)
    write_scores(args.scores_file, scores)


if __name__ == "__main__":
    main()
