"""Score LLaVA answers on MME: per-category acc and acc+, perception and cognition totals.

    python -m llava.eval.eval_mme --question-file llava_mme.jsonl --result-file merge.jsonl \
        --gt-dir MME_Benchmark_release_version [--scores-file S] [--allow-partial]

Ground truth layout read from --gt-dir (MME_Benchmark_release_version), per category folder either
    <category>/<image stem>.txt                         (e.g. code_reasoning/0020.txt), or
    <category>/questions_answers_YN/<image stem>.txt    (when <category>/images/ exists),
each line "question<TAB>Yes|No". An answer's question_id is "<category>/.../<image file>", and its
prompt is the question plus LLaVA's "Answer the question using a single word or phrase." hint;
questions are compared without that hint, MME's "Please answer yes or no." and surrounding spaces.
MME asks two questions per image, so a question is its (question_id, question) pair.
A prediction is read as MME's calculation.py does: lower-cased, "yes"/"no" when it is exactly that
or its first four characters contain it ("yes" checked first), else "other" (wrong).
Per category: acc = % questions right, acc+ = % images with all questions right, score = acc + acc+,
over every question of the question file: each needs an answer, unless --allow-partial is given,
which counts the unanswered ones wrong.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    AnswerKey,
    ScoringError,
    add_scoring_flags,
    read_records,
    read_results,
    run_scorer_cli,
    unanswered_line,
    write_scores_if_asked,
)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
ALL_CATEGORIES = PERCEPTION + COGNITION
LLAVA_HINT = "Answer the question using a single word or phrase."
MME_HINT = "Please answer yes or no."
SUBFOLDER_IMAGES = "images"
SUBFOLDER_QA = "questions_answers_YN"
GT_LABELS = ("yes", "no")
OTHER = "other"
PREFIX_CHARS = 4
PERCENT = 100.0
RESULT_FIELDS = ("question_id", "prompt", "text")

GTKey = tuple[str, str, str]  # category, image stem, question
QuestionKey = tuple[str, str]  # question_id, plain question


def plain_question(text: str) -> str:
    """The question without LLaVA's and MME's answer hints, so prompts and GT lines compare equal."""
    return " ".join(text.replace(LLAVA_HINT, " ").replace(MME_HINT, " ").split())


def parse_prediction(text: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other"."""
    text = text.lower()
    if text in GT_LABELS:
        return text
    prefix = text[:PREFIX_CHARS]
    return next((label for label in GT_LABELS if label in prefix), OTHER)


def _qa_folder(category_dir: Path) -> Path:
    """Where a category keeps its question files (the two MME release layouts)."""
    if (category_dir / SUBFOLDER_IMAGES).is_dir():
        return category_dir / SUBFOLDER_QA
    return category_dir


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ScoringError(f"cannot read ground-truth file {str(path)!r}: {error}") from None


def load_ground_truth(gt_dir: str | Path) -> dict[GTKey, str]:
    """(category, image stem, plain question) -> "yes"/"no", for every category folder in gt_dir."""
    root = Path(gt_dir)
    if not root.is_dir():
        raise ScoringError(f"ground-truth folder {str(root)!r} does not exist")
    truth: dict[GTKey, str] = {}
    for category_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        for qa_file in sorted(_qa_folder(category_dir).glob("*.txt")):
            for number, line in enumerate(_read_lines(qa_file), start=1):
                if not line.strip():
                    continue
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip().lower() not in GT_LABELS:
                    raise ScoringError(f"{qa_file} line {number}: expected 'question<TAB>Yes|No', got {line!r}")
                truth[category_dir.name, qa_file.stem, plain_question(question)] = answer.strip().lower()
    return truth


def _question_key(question_id: str | int, question: str) -> QuestionKey:
    return str(question_id), plain_question(question)


def _answer_key(record: dict[str, Any]) -> QuestionKey:
    return _question_key(record["question_id"], record["prompt"])


MME_KEY = AnswerKey("question_id and question", _answer_key)


def _gt_key(key: QuestionKey) -> GTKey:
    question_id, question = key
    parts = Path(question_id).parts
    return parts[0], Path(parts[-1]).stem, question


def _category_scores(outcomes: dict[str, list[bool]], others: int) -> dict[str, Any]:
    """acc, acc+ and score of one category from its per-image lists of right/wrong."""
    answers = [right for image in outcomes.values() for right in image]
    acc = PERCENT * sum(answers) / len(answers)
    acc_plus = PERCENT * sum(all(image) for image in outcomes.values()) / len(outcomes)
    return {"questions": len(answers), "images": len(outcomes), "other": others,
            "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


Outcomes = dict[str, dict[str, list[bool]]]  # category -> image -> right/wrong per question


def _grade(answers: list[tuple[GTKey, str | None]], truth: dict[GTKey, str], gt_dir: str | Path
           ) -> tuple[Outcomes, dict]:
    """Right/wrong per question grouped by category and image (unanswered: wrong), and the "other" counts."""
    outcomes: Outcomes = defaultdict(lambda: defaultdict(list))
    others: dict[str, int] = defaultdict(int)
    for key, text in answers:
        category, image, question = key
        if category not in ALL_CATEGORIES:
            raise ScoringError(f"unknown MME category {category!r}; expected one of {ALL_CATEGORIES}")
        if key not in truth:
            raise ScoringError(f"no ground truth in {gt_dir} for category {category!r}, image {image!r}, "
                               f"question {question!r}")
        prediction = None if text is None else parse_prediction(text)
        outcomes[category][image].append(prediction == truth[key])
        others[category] += prediction == OTHER
    return outcomes, others


def score_mme(question_file: str | Path, result_file: str | Path, gt_dir: str | Path,
              allow_partial: bool = False) -> dict[str, Any]:
    """`{"categories": {name: {...}}, "perception", "cognition", "total"}` over the question file's categories
    (+ "unanswered" when partial files are allowed)."""
    truth = load_ground_truth(gt_dir)
    questions = [_question_key(q["question_id"], q["text"])
                 for q in read_records(question_file, "question file", ("question_id", "text"))]
    if not questions:
        raise ScoringError(f"question file {question_file} holds no questions")
    results = read_results(result_file, MME_KEY, RESULT_FIELDS)
    results.refuse_unknown(set(questions), "the question file")
    unanswered = results.unanswered(questions, allow_partial)
    answers = results.texts()
    outcomes, others = _grade([(_gt_key(key), answers.get(key)) for key in questions], truth, gt_dir)
    categories = {name: _category_scores(outcomes[name], others[name]) for name in ALL_CATEGORIES if name in outcomes}
    perception = sum(categories[name]["score"] for name in PERCEPTION if name in categories)
    cognition = sum(categories[name]["score"] for name in COGNITION if name in categories)
    scores: dict[str, Any] = {"categories": categories, "perception": perception, "cognition": cognition,
                              "total": perception + cognition}
    if allow_partial:
        scores["unanswered"] = unanswered
    return scores


def _print_scores(scores: dict[str, Any]) -> None:
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        print(f"=========== {group} ===========")
        print(f"total score: {scores[group.lower()]:.2f}")
        for name in names:
            if name in scores["categories"]:
                category = scores["categories"][name]
                print(f"  {name}: {category['score']:.2f} (acc {category['acc']:.2f}, acc+ {category['acc_plus']:.2f})")
    if "unanswered" in scores:
        questions = sum(category["questions"] for category in scores["categories"].values())
        print(unanswered_line(scores["unanswered"], questions))


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question-file", required=True, help="llava_mme.jsonl")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--gt-dir", required=True, help="MME_Benchmark_release_version folder")
    add_scoring_flags(parser)

    def run(args: argparse.Namespace) -> None:
        scores = score_mme(args.question_file, args.result_file, args.gt_dir, args.allow_partial)
        write_scores_if_asked(args, scores)
        _print_scores(scores)

    run_scorer_cli(parser, argv, run)


if __name__ == "__main__":
    main()
