"""Score LLaVA answers on MME: per-category acc and acc+, perception and cognition totals.

    python -m llava.eval.eval_mme --question-file llava_mme.jsonl --result-file merge.jsonl \
        --gt-dir MME_Benchmark_release_version [--scores-file S]

Ground truth layout read from --gt-dir (MME_Benchmark_release_version), per category folder either
    <category>/<image stem>.txt                         (e.g. code_reasoning/0020.txt), or
    <category>/questions_answers_YN/<image stem>.txt    (when <category>/images/ exists),
each line "question<TAB>Yes|No". An answer's question_id is "<category>/.../<image file>", and its
prompt is the question plus LLaVA's "Answer the question using a single word or phrase." hint;
questions are compared without that hint, MME's "Please answer yes or no." and surrounding spaces.
A prediction is read as MME's calculation.py does: lower-cased, "yes"/"no" when it is exactly that
or its first four characters contain it ("yes" checked first), else "other" (wrong).
Per category: acc = % questions right, acc+ = % images with all questions right, score = acc + acc+.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.answers_file import read_jsonl, write_scores

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
MISSING_SHOWN = 5
PERCENT = 100.0

GTKey = tuple[str, str, str]  # category, image stem, question


class MMEScoringError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


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
        raise MMEScoringError(f"cannot read ground-truth file {str(path)!r}: {error}") from None


def load_ground_truth(gt_dir: str | Path) -> dict[GTKey, str]:
    """(category, image stem, plain question) -> "yes"/"no", for every category folder in gt_dir."""
    root = Path(gt_dir)
    if not root.is_dir():
        raise MMEScoringError(f"ground-truth folder {str(root)!r} does not exist")
    truth: dict[GTKey, str] = {}
    for category_dir in sorted(path for path in root.iterdir() if path.is_dir()):
        for qa_file in sorted(_qa_folder(category_dir).glob("*.txt")):
            for number, line in enumerate(_read_lines(qa_file), start=1):
                if not line.strip():
                    continue
                question, tab, answer = line.rpartition("\t")
                if not tab or answer.strip().lower() not in GT_LABELS:
                    raise MMEScoringError(f"{qa_file} line {number}: expected 'question<TAB>Yes|No', got {line!r}")
                truth[category_dir.name, qa_file.stem, plain_question(question)] = answer.strip().lower()
    return truth


def _read(path: str | Path, what: str, required: set[str]) -> list[dict[str, Any]]:
    try:
        records = read_jsonl(path, what)
    except (OSError, ValueError) as error:
        raise MMEScoringError(str(error)) from None
    for number, record in enumerate(records, start=1):
        missing = required - set(record) if isinstance(record, dict) else required
        if missing:
            raise MMEScoringError(f"{what} {path}, record {number}: lacks {sorted(missing)}")
    return records


def _gt_key(question_id: str, question: str) -> GTKey:
    parts = Path(question_id).parts
    return parts[0], Path(parts[-1]).stem, plain_question(question)


def _answers_by_question(
    questions: list[dict], results: list[dict], result_file: str | Path
) -> list[tuple[GTKey, str]]:
    """(GT key, answer text) per question; ids repeat (two questions per image), so match on id and prompt."""
    answers = {(r["question_id"], plain_question(r["prompt"])): r["text"] for r in results}
    paired, missing = [], []
    for question in questions:
        key = (question["question_id"], plain_question(question["text"]))
        if key in answers:
            paired.append((_gt_key(*key), answers[key]))
        else:
            missing.append(question["question_id"])
    if missing:
        shown = ", ".join(map(repr, missing[:MISSING_SHOWN]))
        raise MMEScoringError(f"{len(missing)} question(s) have no answer in {result_file}, e.g. question_id {shown}")
    return paired


def _category_scores(outcomes: dict[str, list[bool]], others: int) -> dict[str, Any]:
    """acc, acc+ and score of one category from its per-image lists of right/wrong."""
    answers = [right for image in outcomes.values() for right in image]
    acc = PERCENT * sum(answers) / len(answers)
    acc_plus = PERCENT * sum(all(image) for image in outcomes.values()) / len(outcomes)
    return {"questions": len(answers), "images": len(outcomes), "other": others,
            "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


Outcomes = dict[str, dict[str, list[bool]]]  # category -> image -> right/wrong per question


def _grade(paired: list[tuple[GTKey, str]], truth: dict[GTKey, str], gt_dir: str | Path) -> tuple[Outcomes, dict]:
    """Right/wrong per question grouped by category and image, and the count of "other" answers."""
    outcomes: Outcomes = defaultdict(lambda: defaultdict(list))
    others: dict[str, int] = defaultdict(int)
    for key, text in paired:
        category, image, question = key
        if category not in ALL_CATEGORIES:
            raise MMEScoringError(f"unknown MME category {category!r}; expected one of {ALL_CATEGORIES}")
        if key not in truth:
            raise MMEScoringError(f"no ground truth in {gt_dir} for category {category!r}, image {image!r}, "
                                  f"question {question!r}")
        prediction = parse_prediction(text)
        outcomes[category][image].append(prediction == truth[key])
        others[category] += prediction == OTHER
    return outcomes, others


def score_mme(question_file: str | Path, result_file: str | Path, gt_dir: str | Path) -> dict[str, Any]:
    """`{"categories": {name: {...}}, "perception", "cognition", "total"}` over the categories answered."""
    truth = load_ground_truth(gt_dir)
    questions = _read(question_file, "question file", {"question_id", "text"})
    if not questions:
        raise MMEScoringError(f"question file {question_file} holds no questions")
    results = _read(result_file, "result file", {"question_id", "prompt", "text"})
    outcomes, others = _grade(_answers_by_question(questions, results, result_file), truth, gt_dir)
    categories = {name: _category_scores(outcomes[name], others[name]) for name in ALL_CATEGORIES if name in outcomes}
    perception = sum(categories[name]["score"] for name in PERCEPTION if name in categories)
    cognition = sum(categories[name]["score"] for name in COGNITION if name in categories)
    return {"categories": categories, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


def _print_scores(scores: dict[str, Any]) -> None:
    for group, names in (("Perception", PERCEPTION), ("Cognition", COGNITION)):
        print(f"=========== {group} ===========")
        print(f"total score: {scores[group.lower()]:.2f}")
        for name in names:
            if name in scores["categories"]:
                category = scores["categories"][name]
                print(f"  {name}: {category['score']:.2f} (acc {category['acc']:.2f}, acc+ {category['acc_plus']:.2f})")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question-file", required=True, help="llava_mme.jsonl")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--gt-dir", required=True, help="MME_Benchmark_release_version folder")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    try:
        scores = score_mme(args.question_file, args.result_file, args.gt_dir)
    except MMEScoringError as error:
        parser.error(str(error))
    _print_scores(scores)
    write_scores(args.scores_file, scores)


if __name__ == "__main__":
    main()
