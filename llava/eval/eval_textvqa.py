"""Score LLaVA TextVQA answer files against TextVQA_0.5.1 annotations (VQA accuracy).

    python -m llava.eval.eval_textvqa --annotation-file A --result-file R [--result-dir D]

LLaVA's TextVQA question file uses the image id as `question_id`, so an answer is matched to its
annotation by (image id, question text), the question being recovered from the prompt.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.answers_file import write_scores
from llava.eval.m4c_evaluator import (
    HUMAN_ANSWERS_PER_QUESTION,
    TextVQAAccuracyEvaluator,
)

RESULT_FILE_SUFFIX = ".jsonl"
REFERENCE_OCR_PREFIX = "Reference OCR token:"
OCR_TOKENS_PREFIX = "OCR tokens: "
SHORT_ANSWER_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
LINES_WITH_OCR_REFERENCE = 3  # question, OCR tokens, answer instruction (either of the first two may lead)
LINES_WITHOUT_OCR_REFERENCE = 2  # question, answer instruction

AnnotationKey = tuple[str, str]


class TextVQAScoringError(ValueError):
    """A problem with the inputs that the user must fix; the CLI prints it without a traceback."""


def question_from_prompt(prompt: str) -> str:
    """Recover the lower-cased question from one of the prompt layouts LLaVA's question files use."""
    lines = prompt.split("\n")
    if prompt.startswith(OCR_TOKENS_PREFIX):
        match = SHORT_ANSWER_QUESTION.search(prompt)
        if match is None:
            raise TextVQAScoringError(
                f"prompt starts with {OCR_TOKENS_PREFIX!r} but has no 'Question: ... Short answer:'"
            )
        question = match.group(1)
    elif f"{REFERENCE_OCR_PREFIX} " in prompt and len(lines) == LINES_WITH_OCR_REFERENCE:
        question = lines[1] if prompt.startswith(REFERENCE_OCR_PREFIX) else lines[0]
    elif len(lines) == LINES_WITHOUT_OCR_REFERENCE:
        question = lines[0]
    else:
        raise TextVQAScoringError("prompt is not in a known TextVQA layout")
    return question.lower()


def annotation_key(image_id: Any, question: str) -> AnnotationKey:
    """The key an answer and its annotation share: image id and lower-cased question text."""
    return str(image_id), question.lower()


def _read_text(path: Path, kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise TextVQAScoringError(f"cannot read {kind} file {str(path)!r}: {error}") from error


def load_annotations(annotation_file: str | Path) -> dict[AnnotationKey, dict[str, Any]]:
    """Index a TextVQA_0.5.1 annotation file by `annotation_key` (a later duplicate wins, as in LLaVA)."""
    path = Path(annotation_file)
    text = _read_text(path, "annotation")
    try:
        entries = json.loads(text)["data"]
        return {annotation_key(entry["image_id"], entry["question"]): entry for entry in entries}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise TextVQAScoringError(
            f"annotation file {str(path)!r} is not TextVQA JSON with a 'data' list of questions: {error!r}"
        ) from error


def load_results(result_file: str | Path) -> list[dict[str, Any]]:
    """Read a LLaVA answers file: one JSON object per non-blank line."""
    path = Path(result_file)
    results = []
    for line_number, line in enumerate(_read_text(path, "result").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            result = json.loads(line)
        except ValueError as error:
            raise TextVQAScoringError(f"{str(path)!r} line {line_number} is not JSON: {error}") from error
        missing = {"question_id", "prompt", "text"} - set(result) if isinstance(result, dict) else {"an object"}
        if missing:
            raise TextVQAScoringError(f"{str(path)!r} line {line_number} lacks {sorted(missing)}")
        results.append(result)
    if not results:
        raise TextVQAScoringError(f"result file {str(path)!r} holds no answers")
    return results


def _pair_with_annotation(result: dict[str, Any], annotations: dict[AnnotationKey, dict[str, Any]]) -> dict[str, Any]:
    """The evaluator's entry for one answer; errors name the question id and prompt."""
    where = f"question_id {result['question_id']!r} with prompt {result['prompt']!r}"
    try:
        key = annotation_key(result["question_id"], question_from_prompt(result["prompt"]))
    except TextVQAScoringError as error:
        raise TextVQAScoringError(f"{where}: {error}") from error
    annotation = annotations.get(key)
    if annotation is None:
        raise TextVQAScoringError(f"{where}: no annotation with image_id {key[0]!r} and question {key[1]!r}")
    answers = annotation.get("answers")
    if not isinstance(answers, list) or len(answers) != HUMAN_ANSWERS_PER_QUESTION:
        raise TextVQAScoringError(
            f"{where}: annotation {annotation.get('question_id')!r} needs {HUMAN_ANSWERS_PER_QUESTION} answers, "
            f"has {answers!r}"
        )
    return {"pred_answer": result["text"], "gt_answers": answers}


def _score_results(annotations: dict[AnnotationKey, dict[str, Any]], result_file: str | Path) -> dict[str, float]:
    pred_list = [_pair_with_annotation(result, annotations) for result in load_results(result_file)]
    accuracy = TextVQAAccuracyEvaluator().eval_pred_list(pred_list)
    return {"samples": len(pred_list), "accuracy": 100.0 * accuracy}


def score_textvqa(annotation_file: str | Path, result_file: str | Path) -> dict[str, float]:
    """`{"samples": N, "accuracy": percent}` for one answers file; raises TextVQAScoringError on bad input."""
    return _score_results(load_annotations(annotation_file), result_file)


def _result_files(result_file: str | None, result_dir: str | None) -> list[Path]:
    """The answers files to score: the named one, then every *.jsonl in the directory, sorted."""
    files = [Path(result_file)] if result_file else []
    if result_dir:
        directory = Path(result_dir)
        if not directory.is_dir():
            raise TextVQAScoringError(f"result directory {result_dir!r} does not exist")
        found = sorted(path for path in directory.iterdir() if path.suffix == RESULT_FILE_SUFFIX)
        if not found:
            raise TextVQAScoringError(f"result directory {result_dir!r} holds no *{RESULT_FILE_SUFFIX} files")
        files.extend(found)
    return files


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1 annotation JSON")
    parser.add_argument("--result-file", help="LLaVA answers JSONL")
    parser.add_argument("--result-dir", help="score every *.jsonl answers file in this directory")
    parser.add_argument("--scores-file", help="also write the scores of --result-file as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    if not args.result_file and not args.result_dir:
        parser.error("give --result-file and/or --result-dir")
    try:
        result_files = _result_files(args.result_file, args.result_dir)
        annotations = load_annotations(args.annotation_file)
        for result_file in result_files:
            scores = _score_results(annotations, result_file)
            print(result_file.stem)
            print(f"Samples: {scores['samples']}\nAccuracy: {scores['accuracy']:.2f}%\n")
            if args.scores_file and args.result_file and result_file == Path(args.result_file):
                write_scores(args.scores_file, scores)
    except TextVQAScoringError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
