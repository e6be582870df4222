"""LLaVA-Bench (in-the-Wild) scores from a review file, computed exactly as LLaVA's summary script does.

    python -m llava.eval.summarize_review --review-file reviews/llava-v1.5-7b-64.jsonl [--scores-file S]

A review file holds one JSON object per question, as LLaVA's `eval_gpt_review_bench.py` writes it:
`{"question_id", "category": "llava_bench_conv", "tuple": [reference score, model score], ...}` (the
reference answer is GPT-4's, scored by the judge on a 1-10 scale; a review the judge's text could not
be parsed from holds [-1, -1] and counts, as in LLaVA). Lines without a category may give `score`
instead of `tuple`. For `all` and each category, the two scores are averaged and each mean rounded to
3 decimals; the relative score is model / reference x 100 (1 decimal), and each mean x 10 is printed
after it, as LLaVA prints `category relative reference model`.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.jsonl import JsonlError, iter_jsonl
from llava.eval.scoring.results import ScoringError, json_type, refuse_input, write_json

ALL = "all"
MEAN_DIGITS = 3  # LLaVA rounds each mean before dividing
SCORE_DIGITS = 1
PERCENT = 100
TEN_POINT_SCALE = 10  # the judge scores 1-10; LLaVA prints means x 10
UNPARSED = [-1, -1]  # what LLaVA's review step records when the judge's text has no score pair


def review_pair(review: Any, where: str) -> tuple[str | None, list[float]]:
    """The review's category (None without one) and its [reference, model] score pair."""
    if not isinstance(review, dict):
        raise ScoringError(f"{where}: expected a JSON object, got {json_type(review)}")
    category = review.get("category")
    if category is not None and not isinstance(category, str):
        raise ScoringError(f"{where}: 'category' must be a string, got {json_type(category)}")
    field = "tuple" if "tuple" in review or category is not None else "score"
    pair = review.get(field)
    if (not isinstance(pair, list) or len(pair) != 2
            or any(isinstance(value, bool) or not isinstance(value, (int, float)) for value in pair)):
        raise ScoringError(f"{where}: {field!r} must be a list of two numbers [reference, model], got {pair!r}")
    return category, pair


def read_reviews(path: str | Path, ignore: Collection[Any] = ()) -> tuple[dict[str, list[list[float]]], int]:
    """Score pairs by category (and under `all`), skipping `ignore`d question ids; and how many reviews
    hold LLaVA's unparsed pair [-1, -1]."""
    pairs: dict[str, list[list[float]]] = defaultdict(list)
    unparsed = 0
    try:
        for number, review in iter_jsonl(path, "review file"):
            category, pair = review_pair(review, f"review file {path}, line {number}")
            if review.get("question_id") in ignore:
                continue
            if category is not None:
                pairs[category].append(pair)
            pairs[ALL].append(pair)
            unparsed += pair == UNPARSED
    except JsonlError as error:
        raise ScoringError(str(error)) from None
    if not pairs:
        raise ScoringError(f"review file {path} holds no reviews")
    return dict(pairs), unparsed


def category_scores(pairs: list[list[float]], category: str) -> dict[str, float | int]:
    reference, model = (round(sum(column) / len(column), MEAN_DIGITS) for column in zip(*pairs))
    if reference == 0:
        raise ScoringError(f"category {category}: the reference answers' mean score is 0, no relative score")
    return {"relative": round(model / reference * PERCENT, SCORE_DIGITS),
            "reference": round(reference * TEN_POINT_SCALE, SCORE_DIGITS),
            "model": round(model * TEN_POINT_SCALE, SCORE_DIGITS),
            "reviews": len(pairs)}


def summarize_review(path: str | Path, ignore: Collection[Any] = ()) -> dict[str, Any]:
    """`{category: {"relative", "reference", "model", "reviews"}}` for `all` and each category, sorted
    by name as LLaVA prints them, and "unparsed_reviews"."""
    pairs, unparsed = read_reviews(path, ignore)
    scores: dict[str, Any] = {category: category_scores(pairs[category], category) for category in sorted(pairs)}
    scores["unparsed_reviews"] = unparsed
    return scores


def print_scores(path: str | Path, scores: dict[str, Any]) -> None:
    print(Path(path).stem)
    for category, values in scores.items():
        if isinstance(values, dict):
            print(category, values["relative"], values["reference"], values["model"])
    if scores["unparsed_reviews"]:
        print(f"({scores['unparsed_reviews']} reviews hold the judge's unparsed score [-1, -1] and count as such)")
    print("=================================")


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--review-file", required=True, help="review JSONL (LLaVA's eval_gpt_review_bench.py output)")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    parser.add_argument("--ignore", nargs="*", type=int, default=[], help="question ids to leave out, as LLaVA's -i")
    args = parser.parse_args(argv)
    try:
        scores = summarize_review(args.review_file, set(args.ignore))
        if args.scores_file:
            write_json(args.scores_file, scores)
    except ScoringError as error:
        refuse_input(parser, error)
    print_scores(args.review_file, scores)


if __name__ == "__main__":
    main()
