"""Score LLaVA answers on POPE (COCO): accuracy, precision, recall, F1 and yes-ratio per category.

    python -m llava.eval.eval_pope --annotation-dir coco --question-file llava_pope_test.jsonl \
        --result-file merge.jsonl [--scores-file S] [--allow-partial]

Each question line carries a "category" (adversarial, popular, random); its labels are the JSON lines
of `<annotation-dir>/coco_pope_<category>.json`, whose question ids restart per file, so as in LLaVA
the i-th question of a category is paired with the i-th label line (we also check that both name the
same image). An answer counts as "no" when its first sentence holds the word "No", "no" or "not"
(LLaVA's case-sensitive rule: "NO" or "Not sure" count as "yes"), otherwise as "yes". Every question
needs an answer unless --allow-partial is given; the metrics are then over the answered questions (an
unanswered one is neither a "yes" nor a "no"), and a category with no answer is left out.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    ScoringError,
    add_scoring_flags,
    check_label,
    numbered_records,
    question_id,
    read_records,
    read_results,
    run_scorer_cli,
    unanswered_line,
    write_scores_if_asked,
)

YES, NO = "yes", "no"
LABELS = (YES, NO)  # POPE's annotations say exactly one of these
NEGATIVE_WORDS = frozenset({"No", "no", "not"})
SENTENCE_END = re.compile(r"[.\n]")
ANNOTATION_FILE = "coco_pope_{category}.json"
PERCENT = 100.0


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


def _questions_by_category(questions: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Questions grouped by category, both in question-file order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for question in questions:
        grouped.setdefault(question["category"], []).append(question)
    return grouped


def score_category(questions: list[dict[str, Any]], answers: dict[str, str], label_file: Path) -> dict[str, float]:
    """Metrics of one category's answered questions; its questions and label lines are paired in order."""
    labels = numbered_records(label_file, "annotation file", ("image", "label"))
    if len(labels) != len(questions):
        raise ScoringError(f"{label_file} has {len(labels)} labels but the question file {len(questions)} questions")
    confusion = Confusion()
    for question, (line, label) in zip(questions, labels):
        check_label(label["label"], LABELS, f"annotation file {label_file}, line {line}")
        if question.get("image") != label["image"]:
            raise ScoringError(
                f"question_id {question['question_id']!r} shows {question.get('image')!r} but its label in "
                f"{label_file} is for {label['image']!r}: the question file and annotations are out of order"
            )
        answer = answers.get(question_id(question))
        if answer is not None:
            confusion.add(answer_is_yes(answer), label["label"] == YES)
    return confusion.metrics()


def score_pope(annotation_dir: str | Path, question_file: str | Path, result_file: str | Path,
               allow_partial: bool = False) -> dict[str, Any]:
    """`{"categories": {category: metrics}, "mean_f1", "mean_accuracy"}`, all in percent, over the answered
    questions (+ "unanswered" when partial files are allowed)."""
    questions = read_records(question_file, "question file", ("question_id", "category"))
    if not questions:
        raise ScoringError(f"question file {question_file} holds no questions")
    results = read_results(result_file)
    results.refuse_unknown({question_id(question) for question in questions}, "the question file")
    unanswered = results.unanswered([question_id(question) for question in questions], allow_partial)
    answers = results.texts()
    categories = {
        category: score_category(members, answers, Path(annotation_dir) / ANNOTATION_FILE.format(category=category))
        for category, members in _questions_by_category(questions).items()
    }
    categories = {category: metrics for category, metrics in categories.items() if metrics["samples"]}
    scores: dict[str, Any] = {
        "categories": categories,
        "mean_f1": sum(m["f1"] for m in categories.values()) / len(categories),
        "mean_accuracy": sum(m["accuracy"] for m in categories.values()) / len(categories),
    }
    if allow_partial:
        scores["unanswered"] = unanswered
    return scores


def _print_scores(scores: dict[str, Any]) -> None:
    for category, metrics in scores["categories"].items():
        print(f"Category: {category}, # samples: {metrics['samples']}")
        print("  " + ", ".join(f"{name}: {value:.2f}" for name, value in metrics.items() if name != "samples"))
    print(f"Mean F1: {scores['mean_f1']:.2f}\nMean accuracy: {scores['mean_accuracy']:.2f}")
    if "unanswered" in scores:
        answered = sum(metrics["samples"] for metrics in scores["categories"].values())
        print(unanswered_line(scores["unanswered"], answered + scores["unanswered"]))


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-dir", required=True, help="folder with coco_pope_<category>.json")
    parser.add_argument("--question-file", required=True, help="llava_pope_test.jsonl")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    add_scoring_flags(parser)

    def run(args: argparse.Namespace) -> None:
        scores = score_pope(args.annotation_dir, args.question_file, args.result_file, args.allow_partial)
        write_scores_if_asked(args, scores)
        _print_scores(scores)

    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
