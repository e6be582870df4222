"""Score MMBench answers (circular, single-round and per-category accuracy) and write the upload sheet.

    python -m llava.eval.eval_mmbench --question-file mmbench_dev_20230712.tsv --result-file merge.jsonl \
        [--upload-file submission.xlsx] [--scores-file scores.json] [--allow-partial]

The TSV has the columns index, question, hint, A, B, C, D (E, ...), answer (dev split only),
category, l2-category, image (base64). Answers come from `llava.eval.model_vqa_mmbench`; with
`--all-rounds` each question is asked once per option, the options rotated ("circular" rounds), and
a question counts as right only if every one of its rounds is right. An answer is identified by its
(question_id, round_id). Every TSV row needs an answer in round 0, and in every round when the file
holds rotated rounds at all; a row short of a round is unanswered. Unanswered rows are an error unless
--allow-partial is given; then, as in LLaVA, they count wrong, accuracy staying over every row with an
answer column value. Accuracy needs the answer column; the submission sheet for the evaluation server
is written always. This module also holds the TSV reading and round rotation that the answering CLI
uses, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from llava.eval.cli_errors import interruptible
from llava.eval.option_letters import (
    FAILED,
    OPTION_LETTERS,
    option_letters,
    parse_option_letter,
)
from llava.eval.scoring.results import (
    ALLOW_PARTIAL_HELP,
    AnswerKey,
    ScoringError,
    check_coverage,
    json_type,
    percent,
    read_results,
    refuse_input,
    write_json,
)

REQUIRED_COLUMNS = ("index", "question", "A", "B")
IMAGE_COLUMN = "image"
PREDICTION_COLUMN = "prediction"
MISSING_VALUES = ("", "nan", "none")  # how pandas-written TSVs spell an empty cell (LLaVA's is_none)
TSV_FIELD_LIMIT = 2**31 - 1  # base64 images are far longer than csv's 128 KiB default field limit
SHEET_TITLE = "Sheet1"  # the name pandas' to_excel gives, which LLaVA's converter produced
UPLOAD_SUFFIX = ".xlsx"
FIRST_ROUND = 0

RoundKey = tuple[str, int]  # question_id (the TSV index, as a string), round_id


class MMBenchError(ScoringError):
    """A problem with the TSV or the answers; the answering CLI reports it as a RunError."""


@dataclass
class MMBenchRow:
    """One TSV row: the question, its present options in order, and the answer letter when known."""

    index: int
    question: str
    hint: str | None
    options: list[str]
    answer: str | None
    category: str | None
    image: str  # base64
    cells: dict[str, str]  # every column as read, for the submission sheet
    line: int = 0  # the TSV line the row starts on (the header is line 1), for messages


def is_missing(value: str | None) -> bool:
    return value is None or value.strip().lower() in MISSING_VALUES


@contextmanager
def _large_csv_fields() -> Iterator[None]:
    """Allow base64 image cells while reading, then restore csv's process-wide limit."""
    previous = csv.field_size_limit(TSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def read_tsv(path: str | Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and the rows of a tab-separated file, quoted as pandas writes them; each row with the
    line it starts on (a quoted cell may span lines)."""
    try:
        with _large_csv_fields(), Path(path).open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t")
            header = next(reader, [])
            rows = []
            while True:
                line = reader.line_num + 1
                fields = next(reader, None)
                if fields is None:
                    break
                if fields:  # blank lines are skipped, as csv.DictReader skips them
                    rows.append((line, fields))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MMBenchError(f"cannot read question file {str(path)!r}: {error}") from error
    short = next(((line, fields) for line, fields in rows if len(fields) < len(header)), None)
    if short is not None:
        raise MMBenchError(f"question file {str(path)!r}, line {short[0]}: {len(short[1])} cells where the header "
                           f"has {len(header)} columns (a truncated file?)")
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise MMBenchError(f"question file {str(path)!r} lacks the columns {missing}; it has {header}")
    return header, [(line, dict(zip(header, fields))) for line, fields in rows]


def option_columns(header: list[str]) -> list[str]:
    """The option letters that are columns of the TSV: A, B, ... up to the first absent letter."""
    columns = []
    for letter in OPTION_LETTERS:
        if letter not in header:
            break
        columns.append(letter)
    return columns


def parse_row(cells: dict[str, str], letters: list[str], path: str | Path, line: int = 0) -> MMBenchRow:
    """One TSV row (starting on `line`) as an MMBenchRow; options stop at the first empty one, as in LLaVA."""
    where = f"question file {str(path)!r}, line {line}" if line else f"question file {str(path)!r}"
    try:
        index = int(cells["index"])
    except ValueError:
        raise MMBenchError(f"{where}: index {cells['index']!r} is not an integer") from None
    options = []
    for letter in letters:
        if is_missing(cells.get(letter)):
            break
        options.append(cells[letter])
    if not options:
        raise MMBenchError(f"{where}: question {index} has no options")
    answer = None if is_missing(cells.get("answer")) else cells["answer"].strip()
    if answer is not None and answer not in option_letters(len(options)):
        raise MMBenchError(f"{where}: question {index} has answer {answer!r} but {len(options)} options")
    return MMBenchRow(
        index=index, question=cells["question"], hint=None if is_missing(cells.get("hint")) else cells["hint"],
        options=options, answer=answer, category=None if is_missing(cells.get("category")) else cells["category"],
        image=cells.get(IMAGE_COLUMN) or "", cells=cells, line=line,
    )


def read_mmbench(path: str | Path) -> tuple[list[str], list[MMBenchRow]]:
    """The TSV's header and its questions."""
    header, rows = read_tsv(path)
    letters = option_columns(header)
    return header, [parse_row(cells, letters, path, line) for line, cells in rows]


def rotate(items: list, round_id: int) -> list:
    """Round r of the circular evaluation shows option r first: the list rotated left by r."""
    shift = round_id % len(items)
    return items[shift:] + items[:shift]


def round_answer(row: MMBenchRow, round_id: int) -> str:
    """The letter of the right option in round `round_id`: the original letter moved back by the rotation."""
    letters = option_letters(len(row.options))
    original = letters.index(row.answer)
    return letters[(original - round_id) % len(letters)]


def _round_key(record: dict[str, Any]) -> RoundKey:
    round_id = record.get("round_id", FIRST_ROUND)
    if isinstance(round_id, bool) or not isinstance(round_id, int) or round_id < FIRST_ROUND:
        raise ScoringError(f"round_id {round_id!r} is not a round number (got {json_type(round_id)})")
    return str(record["question_id"]), round_id


ROUND_KEY = AnswerKey("question_id and round_id", _round_key)


def is_circular(round_ids: Iterable[int]) -> bool:
    """Whether an answers file comes from --all-rounds: it answers some round past the first."""
    return any(round_id > FIRST_ROUND for round_id in round_ids)


def expected_rounds(row: MMBenchRow, all_rounds: bool) -> range:
    """The rounds a row must be answered in: every rotation in a circular file, else round 0 alone."""
    return range(len(row.options) if all_rounds else FIRST_ROUND + 1)


def load_answers(result_file: str | Path, rows: list[MMBenchRow], allow_partial: bool = False
                 ) -> dict[int, dict[int, str]]:
    """Answer texts by question index and round. An answer to an index or round the TSV does not have is
    an error, and so is a row short of a round (see the module docstring) unless `allow_partial`."""
    results = read_results(result_file, ROUND_KEY)
    all_rounds = is_circular(round_id for _, round_id in results.answers)
    known = {(str(row.index), round_id) for row in rows for round_id in range(len(row.options))}
    results.refuse_unknown(known, "the question file's questions and rounds")
    complete = [str(row.index) for row in rows
                if all((str(row.index), round_id) in results.answers for round_id in expected_rounds(row, all_rounds))]
    check_coverage(set(complete), [str(row.index) for row in rows], allow_partial, results.source)
    answers: dict[int, dict[int, str]] = defaultdict(dict)
    by_index = {str(row.index): row.index for row in rows}
    for (question_id, round_id), answer in results.answers.items():
        answers[by_index[question_id]][round_id] = answer.text
    return dict(answers)


def rounds_right(row: MMBenchRow, texts: dict[int, str]) -> dict[int, bool]:
    """Whether each answered round picked the right option."""
    letters = option_letters(len(row.options))
    return {r: parse_option_letter(text, letters) == round_answer(row, r) for r, text in texts.items()}



def score_mmbench(rows: list[MMBenchRow], answers: dict[int, dict[int, str]]) -> dict[str, Any]:
    """Circular accuracy (every expected round right; an unanswered round counts wrong), round-0 accuracy,
    and per category, all over the rows with an answer."""
    scored = [row for row in rows if row.answer is not None]
    all_rounds = is_circular(round_id for texts in answers.values() for round_id in texts)
    circular: dict[int, bool] = {}
    single: dict[int, bool] = {}
    unanswered = 0
    for row in scored:
        texts = answers.get(row.index, {})
        right = rounds_right(row, texts)
        rounds = expected_rounds(row, all_rounds)
        circular[row.index] = all(right.get(round_id, False) for round_id in rounds)
        single[row.index] = right.get(FIRST_ROUND, False)
        unanswered += not all(round_id in texts for round_id in rounds)
    by_category: dict[str, list[bool]] = defaultdict(list)
    for row in scored:
        by_category[row.category or ""].append(circular[row.index])
    return {
        "samples": len(scored),
        "unanswered": unanswered,
        "rounds": sum(len(answers.get(row.index, {})) for row in scored),
        "accuracy": percent(sum(circular.values()), len(scored)),
        "single_round_accuracy": percent(sum(single.values()), len(scored)),
        "categories": {name: percent(sum(hits), len(hits)) for name, hits in sorted(by_category.items())},
    }


def prediction(row: MMBenchRow, texts: dict[int, str]) -> str | None:
    """The sheet's prediction: round 0's letter, or its raw text when no letter could be read from it."""
    if FIRST_ROUND not in texts:
        return None
    letter = parse_option_letter(texts[FIRST_ROUND], option_letters(len(row.options)))
    return texts[FIRST_ROUND] if letter == FAILED else letter


def submission_header(header: list[str]) -> list[str]:
    """The TSV columns without the image, with the prediction right after the last option column."""
    columns = [column for column in header if column != IMAGE_COLUMN]
    last_option = columns.index(option_columns(header)[-1])
    return columns[: last_option + 1] + [PREDICTION_COLUMN] + columns[last_option + 1 :]


def _cell(column: str, value: str | None) -> str | int | None:
    if column == "index":
        return int(value)
    if is_missing(value):
        return None
    return ILLEGAL_CHARACTERS_RE.sub("", value)


def write_submission(path: str | Path, header: list[str], rows: list[MMBenchRow],
                     answers: dict[int, dict[int, str]]) -> None:
    """The .xlsx the MMBench server takes: one line per TSV row."""
    columns = submission_header(header)
    workbook = Workbook()
    sheet = workbook.active
    sheet.title = SHEET_TITLE
    sheet.append(columns)
    for row in rows:
        values = {**row.cells, PREDICTION_COLUMN: prediction(row, answers.get(row.index, {}))}
        sheet.append([_cell(column, values.get(column)) for column in columns])
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        workbook.save(path)
    except OSError as error:
        raise MMBenchError(f"cannot write upload file {str(path)!r}: {error}") from error


def evaluate(question_file: str | Path, result_file: str | Path, upload_file: str | Path,
             allow_partial: bool = False) -> dict[str, Any] | None:
    """Write the submission sheet; return the scores, or None when the TSV has no answers (test split)."""
    header, rows = read_mmbench(question_file)
    answers = load_answers(result_file, rows, allow_partial)
    write_submission(upload_file, header, rows, answers)
    if not any(row.answer is not None for row in rows):
        return None
    return score_mmbench(rows, answers)


def print_scores(scores: dict[str, Any]) -> None:
    print(f"Questions: {scores['samples']} ({scores['rounds']} rounds answered, {scores['unanswered']} unanswered)")
    print(f"Circular accuracy: {scores['accuracy']:.2f}%")
    print(f"Single-round accuracy: {scores['single_round_accuracy']:.2f}%")
    for name, accuracy in scores["categories"].items():
        print(f"  {name or '(no category)'}: {accuracy:.2f}%")


@interruptible
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question-file", required=True, help="MMBench TSV")
    parser.add_argument("--result-file", required=True, help="answers JSONL from llava.eval.model_vqa_mmbench")
    parser.add_argument("--upload-file", help=f"submission sheet (default: the result file with {UPLOAD_SUFFIX})")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    parser.add_argument("--allow-partial", action="store_true", help=ALLOW_PARTIAL_HELP)
    args = parser.parse_args(argv)
    upload_file = Path(args.upload_file or Path(args.result_file).with_suffix(UPLOAD_SUFFIX))
    try:
        scores = evaluate(args.question_file, args.result_file, upload_file, args.allow_partial)
        if scores is not None and args.scores_file:
            write_json(args.scores_file, scores)
    except ScoringError as error:
        refuse_input(parser, error)
    if scores is None:
        print("the question file has no answer column values: no accuracy (test split)")
    else:
        print_scores(scores)
    print(f"Submission file: {upload_file}")


if __name__ == "__main__":
    main()
