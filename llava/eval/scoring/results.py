"""The one reader of LLaVA answers files for every scorer, so no score is inflated or silently shrunk.

A result file holds one JSON object per line (`question_id`, `prompt`, `text`, ...). `read_results`
refuses what would distort a score: a line that is not an object, a missing field, an answer `text`
that is not a string (a `null` would score as a wrong answer, a number might score as a right one),
a second answer to a question already answered (twelve copies of one right answer must not score
100 %), and lines of different runs (their recorded `metadata.run` settings differ). A question is
what the benchmark's own key says it is (`AnswerKey`): MME asks two questions per image id, MMBench one
per round. `check_coverage` then says how many questions of the benchmark
are unanswered and refuses a partial file unless the user passed `--allow-partial`.

Every error is a `ScoringError` whose message names the file and the 1-based line, so each scorer's
CLI prints it as one `error:` line and exits non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.eval.answering.answers_file import RUN_KEY, first_difference, with_current_option_names
from llava.eval.jsonl import JsonlError, iter_jsonl
from llava.output_paths import OutputPathError, check_output_file

ANSWER_FIELDS = ("question_id", "text")
PERCENT = 100.0
OUTPUT_FILE_FLAGS = {"scores_file": "--scores-file", "result_upload_file": "--result-upload-file"}  # what scorers write
SHOWN_KEYS = 5  # unanswered questions named in an error; the count says how many there are in all
ALLOW_PARTIAL_HELP = "score a result file that leaves questions unanswered (the count is reported)"
SCORES_FILE_HELP = "also write the scores as JSON here (for summary.json)"
JSON_TYPE_NAMES = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
                   list: "a list", dict: "an object"}


class ScoringError(ValueError):
    """A scorer input the user must fix; the message names the file (and line), CLIs print it as one line."""


@dataclass(frozen=True)
class AnswerKey:
    """What makes two answers answer the same question: `of(record)` is the key, `name` says what it is."""

    name: str
    of: Callable[[dict[str, Any]], Hashable]

    def show(self, key: Hashable) -> str:
        return key if isinstance(key, str) else repr(key)


def question_id(record: dict[str, Any]) -> str:
    """The question id as a string: LLaVA's files spell the same id as a number or a string."""
    return str(record["question_id"])


QUESTION_ID = AnswerKey("question_id", question_id)


@dataclass(frozen=True)
class Answer:
    """One answers-file line: where it is, the question it answers, and the record itself."""

    line: int
    key: Hashable
    record: dict[str, Any]

    @property
    def text(self) -> str:
        return self.record["text"]


@dataclass
class Results:
    """A checked result file: at most one answer per question, in file order."""

    path: Path
    key: AnswerKey
    what: str
    answers: dict[Hashable, Answer] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"{self.what} {self.path}"

    def texts(self) -> dict[Hashable, str]:
        return {key: answer.text for key, answer in self.answers.items()}

    def refuse_unknown(self, known: Collection[Hashable], where: str) -> None:
        """Refuse an answer to a question that `where` (e.g. "the annotation file") does not ask."""
        for answer in self.answers.values():
            if answer.key not in known:
                raise ScoringError(f"{self.source}, line {answer.line}: {self.key.name} "
                                   f"{self.key.show(answer.key)} is not in {where}")

    def unanswered(self, expected: Sequence[Hashable], allow_partial: bool) -> int:
        """How many `expected` questions this file leaves unanswered (see `check_coverage`)."""
        return check_coverage(self.answers, expected, allow_partial, self.source, self.key)


def json_type(value: Any) -> str:
    """How JSON spells the type of `value` ("null", "a number", ...), for error messages."""
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def read_records(path: str | Path, what: str, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every line of a JSONL question or annotation file, each an object with the `required` fields
    (`question_id` a string or an integer, any other a string)."""
    return [record for _, record in numbered_records(path, what, required)]


def numbered_records(path: str | Path, what: str, required: Iterable[str] = ()) -> list[tuple[int, dict[str, Any]]]:
    """`read_records` with each record's 1-based line number, for messages that name the line."""
    return _numbered_objects(path, what, tuple(required))


def check_label(value: Any, vocabulary: Sequence[str], where: str) -> str:
    """An annotation's label, refused when outside the benchmark's vocabulary: any other value would
    silently count as one of them (POPE reads every label but "no" as "yes")."""
    if isinstance(value, str) and value in vocabulary:
        return value
    raise ScoringError(f"{where}: label {value!r} is not one of {', '.join(map(repr, vocabulary))}")


def _numbered_objects(path: str | Path, what: str, required: tuple[str, ...]) -> list[tuple[int, dict[str, Any]]]:
    """`(line, object)` for every line of a JSONL file whose lines must be objects with `required` fields."""
    try:
        lines = list(iter_jsonl(path, what))
    except JsonlError as error:
        raise ScoringError(str(error)) from None
    for number, record in lines:
        if not isinstance(record, dict):
            raise ScoringError(f"{what} {path}, line {number}: expected a JSON object, got {json_type(record)}")
        missing = [name for name in required if name not in record]
        if missing:
            raise ScoringError(f"{what} {path}, line {number}: lacks {', '.join(map(repr, missing))}")
        _check_types(record, required, f"{what} {path}, line {number}")
    return lines


def read_results(path: str | Path, key: AnswerKey = QUESTION_ID, required: Sequence[str] = ANSWER_FIELDS,
                 what: str = "result file") -> Results:
    """Read and check a LLaVA answers file: one answer per question, by the benchmark's `key`.

    `question_id` must be a string or an integer; every other `required` field (the answer `text`, the
    `prompt` where the key reads it) must be a string. An empty file is an error: it answers nothing.
    """
    results = Results(Path(path), key, what)
    for number, record in _numbered_objects(path, what, tuple(required)):
        try:
            answer_key = key.of(record)
        except ValueError as error:
            raise ScoringError(f"{what} {path}, line {number}: {error}") from None
        first = results.answers.get(answer_key)
        if first is not None:
            raise ScoringError(f"{what} {path}: {key.name} {key.show(answer_key)} is answered twice, on lines "
                               f"{first.line} and {number}")
        results.answers[answer_key] = Answer(number, answer_key, record)
    if not results.answers:
        raise ScoringError(f"{what} {path} holds no answers")
    check_one_run(results)
    return results


def run_settings(record: dict[str, Any]) -> dict | None:
    """The settings an answers line records it was made with (`metadata.run`), None for lines without."""
    metadata = record.get("metadata")
    settings = metadata.get(RUN_KEY) if isinstance(metadata, dict) else None
    return settings if isinstance(settings, dict) else None


def check_one_run(results: Results) -> None:
    """Refuse a file whose lines were written by different runs (their recorded settings differ): two
    runs' answers merged or concatenated would be scored as one."""
    first, *others = results.answers.values()
    settings = run_settings(first.record)
    for answer in others:
        these = run_settings(answer.record)
        if these == settings:
            continue
        if these is not None and settings is not None:  # a run resumed across the options' renaming
            these, settings = with_current_option_names(these), with_current_option_names(settings)
            if these == settings:
                continue
        if these is None or settings is None:
            recorded, missing = (first, answer) if these is None else (answer, first)
            detail = f"line {recorded.line} records its run's settings, line {missing.line} does not"
        else:
            name, before, now = first_difference(settings, these)
            detail = f"{name}={before!r} on line {first.line}, {name}={now!r} on line {answer.line}"
        raise ScoringError(f"{results.source} mixes the answers of different runs ({detail}); score one run's "
                           "answers at a time")


def _check_types(record: dict[str, Any], required: Sequence[str], where: str) -> None:
    """A `null` or a number where a string belongs would be scored, not refused, further on."""
    for name in required:
        value = record[name]
        if name == "question_id":
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ScoringError(f"{where}: question_id must be a string or an integer, got {json_type(value)}")
        elif not isinstance(value, str):
            raise ScoringError(f"{where}: {name!r} must be a string, got {json_type(value)}")


def check_coverage(answered: Collection[Hashable], expected: Sequence[Hashable], allow_partial: bool,
                   source: str, key: AnswerKey = QUESTION_ID) -> int:
    """The number of `expected` questions not in `answered`; more than none is an error unless allowed."""
    missing = [question for question in expected if question not in answered]
    if missing and not allow_partial:
        shown = ", ".join(key.show(question) for question in missing[:SHOWN_KEYS])
        raise ScoringError(f"{source}: {len(missing)} of {len(expected)} questions unanswered, e.g. {key.name} "
                           f"{shown}; pass --allow-partial to score the answered ones")
    return len(missing)


def percent(part: float, total: float) -> float | None:
    """`part` of `total` in percent; None when there is nothing to count, so an empty subset (e.g. a split
    without image questions) never shows as 0 %."""
    return PERCENT * part / total if total else None


def unanswered_line(unanswered: int, expected: int) -> str:
    """The line a scorer prints when --allow-partial let it score a partial file."""
    return f"Unanswered: {unanswered} of {expected} questions"


def read_json(path: str | Path, what: str) -> Any:
    """A JSON annotation file's content; unreadable or invalid JSON is a ScoringError naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ScoringError(f"{what} {path}, line {error.lineno}: not valid JSON ({error.msg}: column "
                           f"{error.colno})") from None
    except UnicodeDecodeError as error:
        raise ScoringError(f"{what} {path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ScoringError(f"cannot read {what} {path}: {error.strerror or error}") from None


def add_scoring_flags(parser: argparse.ArgumentParser, scores_help: str = SCORES_FILE_HELP) -> None:
    """The two flags every scorer takes: --scores-file and --allow-partial."""
    parser.add_argument("--scores-file", help=scores_help)
    parser.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)


def run_scorer_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                   run: Callable[[argparse.Namespace], Any]) -> None:
    """A scorer's main(): parse the flags and run; a ScoringError becomes one `error:` line."""
    args = parser.parse_args(argv)
    try:
        check_output_flags(args)
        run(args)
    except (ScoringError, OutputPathError) as error:
        refuse_input(parser, error)


def refuse_input(parser: argparse.ArgumentParser, error: Exception) -> None:
    """End a scorer on a bad file: one `<prog>: error:` line and exit code 2, as argparse ends on a bad flag,
    but without the usage text, which says nothing about a file's contents."""
    sys.stderr.write(f"{parser.prog}: error: {error}\n")
    sys.exit(2)


def check_output_flags(args: argparse.Namespace) -> None:
    """The files a scorer writes, checked before it reads and scores anything."""
    for name, flag in OUTPUT_FILE_FLAGS.items():
        if getattr(args, name, None):
            check_output_file(getattr(args, name), flag)


def write_scores_if_asked(args: argparse.Namespace, scores: dict) -> None:
    """The scores, also as JSON in --scores-file when given (what summary.json reads)."""
    if args.scores_file:
        write_json(args.scores_file, scores)


def write_json(path: str | Path, content: Any, what: str = "scores file") -> None:
    """Write a scorer's JSON output (its scores, for summary.json), indented for people to read."""
    write_output(path, json.dumps(content, indent=2) + "\n", what)


def write_output(path: str | Path, text: str, what: str) -> None:
    """Write one of a scorer's output files, creating its folder; a failure is a ScoringError."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as error:
        raise ScoringError(f"cannot write {what} {path}: {error.strerror or error}") from None
