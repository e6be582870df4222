"""Score ScienceQA answers: accuracy over a split and over its IMG subset (the number LLaVA reports).

    python -m llava.eval.eval_science_qa --base-dir DIR --result-file merge.jsonl \
        --output-file out.json --output-result out_result.json [--split test] [--scores-file scores.json] \
        [--allow-partial]

DIR holds ScienceQA's problems.json and pid_splits.json. The option letter is read from each answer
with `llava.eval.option_letters`; an answer without a readable letter counts as wrong. Accuracy is over
every problem of the split (and of its IMG subset, the problems with an image in problems.json): each
needs an answer, unless --allow-partial is given, which counts the unanswered ones wrong, as LLaVA does.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.option_letters import (
    FAILED,
    OPTION_LETTERS,
    option_letters,
    parse_option_letter,
)
from llava.eval.scoring.results import (
    ALLOW_PARTIAL_HELP,
    ScoringError,
    percent,
    read_json,
    read_results,
    refuse_input,
    unanswered_line,
    write_json,
)

PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"
MISSING_PROMPT = "Unknown"  # LLaVA's prompt for a problem the result file does not answer
NO_PREDICTION = -1  # LLaVA's predicted index when no option was chosen


@dataclass
class Graded:
    """One problem's outcome, in the shape of LLaVA's analysis record."""

    question_id: str
    parsed_ans: str
    ground_truth: str
    question: str
    pred: str
    is_multimodal: bool
    correct: bool
    answered: bool

    def analysis(self) -> dict[str, Any]:
        return {"question_id": self.question_id, "parsed_ans": self.parsed_ans, "ground_truth": self.ground_truth,
                "question": self.question, "pred": self.pred, "is_multimodal": self.is_multimodal}


def load_split_problems(base_dir: str | Path, split: str) -> dict[str, dict[str, Any]]:
    """The problems of one split, by problem id, in pid_splits.json order."""
    base = Path(base_dir)
    problems = read_json(base / PROBLEMS_FILE, "problems file")
    splits = read_json(base / SPLITS_FILE, "splits file")
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ScoringError(f"{str(base)!r}: {PROBLEMS_FILE} and {SPLITS_FILE} must be JSON objects")
    if split not in splits:
        raise ScoringError(f"split {split!r} is not in {str(base / SPLITS_FILE)!r}; it has {sorted(splits)}")
    missing = [pid for pid in splits[split] if pid not in problems]
    if missing:
        raise ScoringError(f"{str(base / PROBLEMS_FILE)!r} lacks problems {missing[:5]} of split {split!r}")
    return {pid: problems[pid] for pid in splits[split]}


def answer_index(answer: Any, choices: int) -> int:
    """A problem's answer: an index into its choices (a negative one, or a boolean, would pick a choice too)."""
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < choices:
        raise ValueError(f"answer {answer!r} is not an index of its {choices} choices")
    return answer


def grade(problem_id: str, problem: dict[str, Any], prediction: dict[str, Any] | None) -> Graded:
    """Parse the answer's letter and compare it with the problem's answer index."""
    try:
        letters = option_letters(len(problem["choices"]))
        truth = letters[answer_index(problem["answer"], len(letters))]
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise ScoringError(
            f"problem {problem_id!r} needs 'choices' and an 'answer' index ({error!r})"
        ) from None
    text = FAILED if prediction is None else prediction["text"]
    parsed = parse_option_letter(text, letters)
    return Graded(
        question_id=problem_id, parsed_ans=parsed, ground_truth=truth,
        question=MISSING_PROMPT if prediction is None else prediction.get("prompt", ""), pred=text,
        is_multimodal=bool(problem.get("image")), correct=parsed == truth, answered=prediction is not None,
    )


def grade_split(base_dir: str | Path, result_file: str | Path, split: str, allow_partial: bool = False
                ) -> list[Graded]:
    """Every problem of the split graded; an answers file that answers none of them is an error."""
    problems = load_split_problems(base_dir, split)
    results = read_results(result_file)
    if not results.answers.keys() & problems.keys():
        raise ScoringError(f"{results.source} answers no problem of split {split!r}")
    results.refuse_unknown(problems, f"split {split!r}")
    results.unanswered(list(problems), allow_partial)
    records = {pid: answer.record for pid, answer in results.answers.items()}
    return [grade(pid, problem, records.get(pid)) for pid, problem in problems.items()]



def summarize(graded: list[Graded], allow_partial: bool = False) -> dict[str, Any]:
    """Counts and accuracies (percent) for the split and its IMG subset (+ "unanswered" when partial)."""
    with_image = [item for item in graded if item.is_multimodal]
    correct = sum(item.correct for item in graded)
    img_correct = sum(item.correct for item in with_image)
    scores = {
        "samples": len(graded), "correct": correct, "accuracy": percent(correct, len(graded)),
        "img_samples": len(with_image), "img_correct": img_correct,
        "img_accuracy": percent(img_correct, len(with_image)),
        "failed_parses": sum(item.parsed_ans == FAILED for item in graded),
    }
    if allow_partial:
        scores["unanswered"] = sum(not item.answered for item in graded)
    return scores


def llava_outputs(graded: list[Graded], scores: dict[str, Any]) -> tuple[dict, dict]:
    """LLaVA's --output-file (correct/incorrect analyses) and --output-result (acc, per-problem index)."""
    analyses = {"correct": [g.analysis() for g in graded if g.correct],
                "incorrect": [g.analysis() for g in graded if not g.correct]}
    result = {
        "acc": scores["accuracy"], "correct": scores["correct"], "count": scores["samples"],
        "results": {g.question_id: _predicted_index(g.parsed_ans) for g in graded},
        "outputs": {g.question_id: g.pred for g in graded},
    }
    return analyses, result


def _predicted_index(letter: str) -> int:
    return NO_PREDICTION if letter == FAILED else OPTION_LETTERS.index(letter)


def _format_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-dir", required=True, help="folder with problems.json and pid_splits.json")
    parser.add_argument("--result-file", required=True, help="LLaVA answers JSONL")
    parser.add_argument("--output-file", help="write the correct/incorrect analyses here (JSON)")
    parser.add_argument("--output-result", help="write accuracy and per-problem predictions here (JSON)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    parser.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    args = parser.parse_args(argv)
    try:
        graded = grade_split(args.base_dir, args.result_file, args.split, args.allow_partial)
        scores = summarize(graded, args.allow_partial)
        analyses, result = llava_outputs(graded, scores)
        outputs = ((args.output_file, analyses, "output file"), (args.output_result, result, "output result file"),
                   (args.scores_file, scores, "scores file"))
        for path, content, what in outputs:
            if path:
                write_json(path, content, what)
    except ScoringError as error:
        refuse_input(parser, error)
    print(f"Total: {scores['samples']}, Correct: {scores['correct']}, Accuracy: {_format_percent(scores['accuracy'])}, "
          f"IMG-Accuracy: {_format_percent(scores['img_accuracy'])}")
    if "unanswered" in scores:
        print(unanswered_line(scores["unanswered"], scores["samples"]))


if __name__ == "__main__":
    main()
