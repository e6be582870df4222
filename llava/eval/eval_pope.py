"""Score LLaVA answers on POPE (COCO): accuracy, precision, recall, F1 and yes-ratio per category.

    python -m llava.eval.eval_pope --annotation-dir coco --question-file llava_pope_test.jsonl \
        --result-file merge.jsonl [--scores-file S]

Each question line carries a "category" (adversarial, popular, random); its labels are the JSON lines
of `<annotation-dir>/coco_pope_<category>.json`, whose question ids restart per file, so as in LLaVA
the i-th question of a category is paired with the i-th label line (we also check that both name the
same image). An answer counts as "no" when its first sentence holds the word "No", "no" or "not"
(LLaVA's case-sensitive rule: "NO" or "Not sure" count as "yes"), otherwise as "yes".
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.eval.answers_file import read_jsonl, write_scores

NEGATIVE_WORDS = frozenset({"No", "no", "not"})
SENTENCE_END = re.compile(r"[.\n]")
ANNOTATION_FILE = "coco_pope_{category}.json"
MISSING_IDS_SHOWN = 5
PERCENT = 100.0


class POPEScoringError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def answer_is_yes(text: str) -> bool:
    """LLaVA's reading of a free-form answer: "no" if its first sentence negates, else "yes"."""
    first_sentence = SENTENCE_END.split(text, maxsplit=1)[0].replace(",", "")
    return NEGATIVE_WORDS.isdisjoint(first_sentence.split())


@dataclass
class Confusion:
    """Counts of one category's predictions against its labels (positive = "yes")."""

    true_pos: int = 0
    true_neg: int = 0
    false_pos: int = 0
    false_neg: int = 0

    def add(self, predicted_yes: bool, label_yes: bool) -> None:
        if predicted_yes:
            self.true_pos += label_yes
            self.false_pos += not label_yes
        else:
            self.false_neg += label_yes
            self.true_neg += not label_yes

    def metrics(self) -> dict[str, float]:
        """Percentages; a ratio with an empty denominator (e.g. precision with no "yes") is 0."""
        total = self.true_pos + self.true_neg + self.false_pos + self.false_neg
        precision = _ratio(self.true_pos, self.true_pos + self.false_pos)
        recall = _ratio(self.true_pos, self.true_pos + self.false_neg)
        return {
            "samples": total,
            "accuracy": PERCENT * _ratio(self.true_pos + self.true_neg, total),
            "precision": PERCENT * precision,
            "recall": PERCENT * recall,
            "f1": PERCENT * _ratio(2 * precision * recall, precision + recall),
            "yes_ratio": PERCENT * _ratio(self.true_pos + self.false_pos, total),
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _read(path: str | Path, what: str, required: set[str]) -> list[dict[str, Any]]:
    try:
        records = read_jsonl(path, what)
    except (OSError, ValueError) as error:
        raise POPEScoringError(str(error)) from None
    for number, record in enumerate(records, start=1):
        missing = required - set(record) if isinstance(record, dict) else required
        if missing:
            raise POPEScoringError(f"{what} {path}, record {number}: lacks {sorted(missing)}")
    return records


def _questions_by_category(questions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Questions grouped by category, both in question-file order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for question in questions:
        grouped.setdefault(question["category"], []).append(question)
    return grouped


def score_category(questions: list[dict[str, Any]], answers: dict[Any, str], label_file: Path) -> dict[str, float]:
    """Metrics of one category; its questions and label lines are paired in order."""
    labels = _read(label_file, "annotation file", {"image", "label"})
    if len(labels) != len(questions):
        raise POPEScoringError(
            f"{label_file} has {len(labels)} labels but the question file {len(questions)} questions"
        )
    confusion = Confusion()
    for question, label in zip(questions, labels):
        if question.get("image") != label["image"]:
            raise POPEScoringError(
                f"question_id {question['question_id']!r} shows {question.get('image')!r} but its label in "
                f"{label_file} is for {label['image']!r}: the question file and annotations are out of order"
            )
        confusion.add(answer_is_yes(answers[question["question_id"]]), label["label"] != "no")
    return confusion.metrics()


def score_pope(annotation_dir: str | Path, question_file: str | Path, result_file: str | Path) -> dict[str, Any]:
    """`{"categories": {category: metrics}, "mean_f1", "mean_accuracy"}`, all in percent."""
    questions = _read(question_file, "question file", {"question_id", "category"})
    answers = {r["question_id"]: r["text"] for r in _read(result_file, "result file", {"question_id", "text"})}
    missing = [question["question_id"] for question in questions if question["question_id"] not in answers]
    if missing:
        shown = ", ".join(map(repr, missing[:MISSING_IDS_SHOWN]))
        raise POPEScoringError(f"{len(missing)} question(s) have no answer in {result_file}, e.g. question_id {shown}")
    categories = {
        category: score_category(members, answers, Path(annotation_dir) / ANNOTATION_FILE.format(category=category))
        for category, members in _questions_by_category(questions).items()
    }
    if not categories:
        raise POPEScoringError(f"question file {question_file} holds no questions")
    return {
        "categories": categories,
        "mean_f1": sum(m["f1"] for m in categories.values()) / len(categories),
        "mean_accuracy": sum(m["accuracy"] for m in categories.values()) / len(categories),
    }


def _print_scores(scores: dict[str, Any]) -> None:
    for category, metrics in scores["categories"].items():
        print(f"Category: {category}, # samples: {metrics['samples']}")
        print("  " + ", ".join(f"{name}: {value:.2f}" for name, value in metrics.items() if name != "samples"))
    print(f"Mean F1: {scores['mean_f1']:.2f}\nMean accuracy: {scores['mean_accuracy']:.2f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-dir", required=True, help="folder with coco_pope_<category>.json")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    try:
        scores = score_pope(args.annotation_dir, args.question_file, args.result_file)
    except POPEScoringError as error:
        parser.error(str(error))
    _print_scores(scores)
    write_scores(args.scores_file, scores)


if __name__ == "__main__":
    main()
