"""Score LLaVA TextVQA answer files against TextVQA_0.5.1 annotations (VQA accuracy).

    python -m llava.eval.eval_textvqa --annotation-file A --result-file R [--result-dir D] [--allow-partial]

LLaVA's TextVQA question file uses the image id as `question_id`, so an answer is matched to its
annotation by (image id, question text), the question being recovered from the prompt; that pair is
also what makes two answers answer the same question. Every annotated question needs an answer unless
--allow-partial is given; accuracy is then, as in LLaVA's scorer, the mean over the answered questions
("samples"), and the scores say how many were left unanswered.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llava.eval.cli_errors import interruptible
from llava.eval.scoring.results import (
    ALLOW_PARTIAL_HELP,
    AnswerKey,
    Results,
    ScoringError,
    read_json,
    read_results,
    refuse_input,
    unanswered_line,
    write_json,
)
from llava.eval.scoring.vqa_accuracy import (
    HUMAN_ANSWERS_PER_QUESTION,
    TextVQAAccuracyEvaluator,
)

RESULT_FILE_SUFFIX = ".jsonl"
RESULT_FIELDS = ("question_id", "prompt", "text")
REFERENCE_OCR_PREFIX = "Reference OCR token:"
OCR_TOKENS_PREFIX = "OCR tokens: "
SHORT_ANSWER_QUESTION = re.compile(r"Question: (.*?) Short answer:", re.DOTALL)
LINES_WITH_OCR_REFERENCE = 3  # question, OCR tokens, answer instruction (either of the first two may lead)
LINES_WITHOUT_OCR_REFERENCE = 2  # question, answer instruction
PERCENT = 100.0

AnnotationKey = tuple[str, str]  # image id, lower-cased question
OccurrenceKey = tuple[str, str, int]  # ... and which repeat of that pair


def question_from_prompt(prompt: str) -> str:
    """Recover the lower-cased question from one of the prompt layouts LLaVA's question files use."""
    lines = prompt.split("\n")
    if prompt.startswith(OCR_TOKENS_PREFIX):
        match = SHORT_ANSWER_QUESTION.search(prompt)
        if match is None:
            raise ScoringError(
                f"prompt {prompt!r} starts with {OCR_TOKENS_PREFIX!r} but has no 'Question: ... Short answer:'"
            )
        question = match.group(1)
    elif f"{REFERENCE_OCR_PREFIX} " in prompt and len(lines) == LINES_WITH_OCR_REFERENCE:
        question = lines[1] if prompt.startswith(REFERENCE_OCR_PREFIX) else lines[0]
    elif len(lines) == LINES_WITHOUT_OCR_REFERENCE:
        question = lines[0]
    else:
        raise ScoringError(f"prompt {prompt!r} is not in a known TextVQA layout")
    return question.lower()


def annotation_key(image_id: Any, question: str) -> AnnotationKey:
    """The key an answer and its annotation share: image id and lower-cased question text."""
    return str(image_id), question.lower()


def occurrence_key() -> AnswerKey:
    """(image id, question, n) for the n-th answer (from 0) to the same image and question text.

    An annotation file may ask the same question twice about one image; LLaVA's question file then asks
    it twice too, so each of those answers is a question of its own. Numbering the repeats lets the
    checks below allow exactly as many answers as the annotation file asks, and not one more.
    """
    seen: Counter[AnnotationKey] = Counter()

    def key_of(record: dict[str, Any]) -> OccurrenceKey:
        key = annotation_key(record["question_id"], question_from_prompt(record["prompt"]))
        seen[key] += 1
        return (*key, seen[key] - 1)

    return AnswerKey("image id, question and repeat", key_of)


def load_annotations(annotation_file: str | Path) -> dict[AnnotationKey, list[dict[str, Any]]]:
    """Group a TextVQA_0.5.1 annotation file's questions by `annotation_key`, in file order."""
    grouped: dict[AnnotationKey, list[dict[str, Any]]] = defaultdict(list)
    try:
        for entry in read_json(annotation_file, "annotation file")["data"]:
            grouped[annotation_key(entry["image_id"], entry["question"])].append(entry)
    except (KeyError, TypeError, AttributeError) as error:
        raise ScoringError(
            f"annotation file {annotation_file} is not TextVQA JSON with a 'data' list of questions: {error!r}"
        ) from None
    return dict(grouped)


def load_results(result_file: str | Path, annotations: dict[AnnotationKey, list[dict[str, Any]]]) -> Results:
    """A LLaVA answers file with no more answers per (image id, question) than the annotations ask."""
    results = read_results(result_file, occurrence_key(), RESULT_FIELDS)
    lines: dict[AnnotationKey, list[int]] = defaultdict(list)
    for answer in results.answers.values():
        key = answer.key[:2]
        if key not in annotations:
            raise ScoringError(f"{results.source}, line {answer.line}: image id and question {key!r} is not in the "
                               "annotation file")
        lines[key].append(answer.line)
    for key, answered_on in lines.items():
        asked = len(annotations[key])
        if len(answered_on) > asked:
            shown = answered_on[: asked + 1]  # up to the first answer too many
            raise ScoringError(f"{results.source}: image id and question {key!r} is answered {_times(len(shown))}, "
                               f"on lines {', '.join(map(str, shown[:-1]))} and {shown[-1]}, but the annotation "
                               f"file asks it {_times(asked)}")
    return results


def _times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def _human_answers(annotation: dict[str, Any]) -> list[str]:
    answers = annotation.get("answers")
    if not isinstance(answers, list) or len(answers) != HUMAN_ANSWERS_PER_QUESTION:
        raise ScoringError(f"annotation {annotation.get('question_id')!r} needs {HUMAN_ANSWERS_PER_QUESTION} "
                           f"answers, has {answers!r}")
    return answers


def score_textvqa(annotations: dict[AnnotationKey, list[dict[str, Any]]], result_file: str | Path,
                  allow_partial: bool = False) -> dict[str, Any]:
    """`{"samples": answered, "accuracy": percent over them}` (+ "unanswered" when partial files are allowed),
    against annotations from `load_annotations` (read once for every result file scored)."""
    results = load_results(result_file, annotations)
    asked = [(*key, repeat) for key, entries in annotations.items() for repeat in range(len(entries))]
    unanswered = results.unanswered(asked, allow_partial)
    # As in LLaVA's scorer, a repeated question is graded against its last annotation.
    pred_list = [{"pred_answer": answer.text, "gt_answers": _human_answers(annotations[answer.key[:2]][-1])}
                 for answer in results.answers.values()]
    scores: dict[str, Any] = {"samples": len(pred_list),
                              "accuracy": PERCENT * TextVQAAccuracyEvaluator().eval_pred_list(pred_list)}
    if allow_partial:
        scores["unanswered"] = unanswered
    return scores


def _result_files(result_file: str | None, result_dir: str | None) -> list[Path]:
    """The answers files to score: the named one, then every *.jsonl in the directory, sorted."""
    files = [Path(result_file)] if result_file else []
    if result_dir:
        directory = Path(result_dir)
        if not directory.is_dir():
            raise ScoringError(f"result directory {result_dir} does not exist")
        found = sorted(path for path in directory.iterdir() if path.suffix == RESULT_FILE_SUFFIX)
        if not found:
            raise ScoringError(f"result directory {result_dir} holds no *{RESULT_FILE_SUFFIX} files")
        files.extend(found)
    return files


def _print_scores(result_file: Path, scores: dict[str, Any]) -> None:
    print(result_file.stem)
    print(f"Samples: {scores['samples']}\nAccuracy: {scores['accuracy']:.2f}%")
    if "unanswered" in scores:
        print(unanswered_line(scores["unanswered"], scores["samples"] + scores["unanswered"]))
    print()


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--annotation-file", required=True, help="TextVQA_0.5.1 annotation JSON")
    parser.add_argument("--result-file", help="LLaVA answers JSONL")
    parser.add_argument("--result-dir", help="score every *.jsonl answers file in this directory")
    parser.add_argument("--scores-file", help="also write the scores of --result-file as JSON here (for summary.json)")
    parser.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    args = parser.parse_args(argv)
    if not args.result_file and not args.result_dir:
        parser.error("give --result-file and/or --result-dir")
    try:
        annotations = load_annotations(args.annotation_file)
        scored = [(path, score_textvqa(annotations, path, args.allow_partial))
                  for path in _result_files(args.result_file, args.result_dir)]
        if args.scores_file and args.result_file:
            write_json(args.scores_file, scored[0][1])
    except ScoringError as error:
        refuse_input(parser, error)
    for result_file, scores in scored:
        _print_scores(result_file, scores)


if __name__ == "__main__":
    main()
