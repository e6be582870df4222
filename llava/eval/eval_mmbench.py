"""Score MMBench answers (circular, single-round and per-category accuracy) and write the upload sheet.

    python -m llava.eval.eval_mmbench --question-file mmbench_dev_20230712.tsv --result-file merge.jsonl \
        [--upload-file submission.xlsx] [--scores-file scores.json]

The TSV has the columns index, question, hint, A, B, C, D (E, ...), answer (dev split only),
category, l2-category, image (base64). Answers come from `llava.eval.model_vqa_mmbench`; with
`--all-rounds` each question is asked once per option, the options rotated ("circular" rounds), and
a question counts as right only if every one of its rounds is right. Accuracy needs the answer
column; the submission sheet for the evaluation server is written always. This module also holds the
TSV reading and round rotation that the answering CLI uses, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openpyxl import Workbook
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE

from llava.eval.answers_file import read_jsonl, write_scores
from llava.eval.option_letters import (
    FAILED,
    OPTION_LETTERS,
    option_letters,
    parse_option_letter,
)

REQUIRED_COLUMNS = ("index", "question", "A", "B")
IMAGE_COLUMN = "image"
PREDICTION_COLUMN = "prediction"
MISSING_VALUES = ("", "nan", "none")  # how pandas-written TSVs spell an empty cell (LLaVA's is_none)
TSV_FIELD_LIMIT = 2**31 - 1  # base64 images are far longer than csv's 128 KiB default field limit
SHEET_TITLE = "Sheet1"  # the name pandas' to_excel gives, which LLaVA's converter produced
UPLOAD_SUFFIX = ".xlsx"


class MMBenchError(ValueError):
    """A problem with the TSV or the answers that the user must fix; CLIs print it without a traceback."""


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


def read_tsv(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows of a tab-separated file, quoted as pandas writes them."""
    try:
        with _large_csv_fields(), Path(path).open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise MMBenchError(f"cannot read question file {str(path)!r}: {error}") from error
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise MMBenchError(f"question file {str(path)!r} lacks the columns {missing}; it has {header}")
    return header, rows


def option_columns(header: list[str]) -> list[str]:
    """The option letters that are columns of the TSV: A, B, ... up to the first absent letter."""
    columns = []
    for letter in OPTION_LETTERS:
        if letter not in header:
            break
        columns.append(letter)
    return columns


def parse_row(cells: dict[str, str], letters: list[str], path: str | Path) -> MMBenchRow:
    """One TSV row as an MMBenchRow; options stop at the first empty one, as in LLaVA."""
    try:
        index = int(cells["index"])
    except ValueError:
        raise MMBenchError(f"question file {str(path)!r}: index {cells['index']!r} is not an integer") from None
    options = []
    for letter in letters:
        if is_missing(cells.get(letter)):
            break
        options.append(cells[letter])
    if not options:
        raise MMBenchError(f"question file {str(path)!r}: question {index} has no options")
    answer = None if is_missing(cells.get("answer")) else cells["answer"].strip()
    if answer is not None and answer not in option_letters(len(options)):
        raise MMBenchError(f"question file {str(path)!r}: question {index} has answer {answer!r} but "
                           f"{len(options)} options")
    return MMBenchRow(
        index=index, question=cells["question"], hint=None if is_missing(cells.get("hint")) else cells["hint"],
        options=options, answer=answer, category=None if is_missing(cells.get("category")) else cells["category"],
        image=cells.get(IMAGE_COLUMN) or "", cells=cells,
    )


def read_mmbench(path: str | Path) -> tuple[list[str], list[MMBenchRow]]:
    """The TSV's header and its questions."""
    header, rows = read_tsv(path)
    letters = option_columns(header)
    return header, [parse_row(cells, letters, path) for cells in rows]


def rotate(items: list, round_id: int) -> list:
    """Round r of the circular evaluation shows option r first: the list rotated left by r."""
    shift = round_id % len(items)
    return items[shift:] + items[:shift]


def round_answer(row: MMBenchRow, round_id: int) -> str:
    """The letter of the right option in round `round_id`: the original letter moved back by the rotation."""
    letters = option_letters(len(row.options))
    original = letters.index(row.answer)
    return letters[(original - round_id) % len(letters)]


def load_answers(result_file: str | Path, rows: dict[int, MMBenchRow]) -> dict[int, dict[int, str]]:
    """Answer texts by question index and round; an index the TSV does not have is an error."""
    try:
        records = read_jsonl(result_file, "result file")
    except (OSError, ValueError) as error:
        raise MMBenchError(str(error)) from error
    answers: dict[int, dict[int, str]] = defaultdict(dict)
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not {"question_id", "text"} <= set(record):
            raise MMBenchError(f"result file {str(result_file)!r} line {number} lacks 'question_id' or 'text'")
        if record["question_id"] not in rows:
            raise MMBenchError(f"result file {str(result_file)!r} line {number}: question_id "
                               f"{record['question_id']!r} is not an index of the question file")
        round_id = record.get("round_id", 0)
        if not isinstance(round_id, int) or round_id < 0:
            raise MMBenchError(f"result file {str(result_file)!r} line {number}: round_id {round_id!r} is not a "
                               "round number")
        answers[record["question_id"]][round_id] = str(record["text"])
    return dict(answers)


def rounds_right(row: MMBenchRow, texts: dict[int, str]) -> dict[int, bool]:
    """Whether each answered round picked the right option."""
    letters = option_letters(len(row.options))
    return {r: parse_option_letter(text, letters) == round_answer(row, r) for r, text in texts.items()}


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total


def score_mmbench(rows: list[MMBenchRow], answers: dict[int, dict[int, str]]) -> dict[str, Any]:
    """Circular accuracy (all rounds right; unanswered counts wrong), round-0 accuracy, and per category."""
    scored = [row for row in rows if row.answer is not None]
    circular: dict[int, bool] = {}
    single: dict[int, bool] = {}
    for row in scored:
        right = rounds_right(row, answers.get(row.index, {}))
        circular[row.index] = bool(right) and all(right.values())
        single[row.index] = right.get(0, False)
    by_category: dict[str, list[bool]] = defaultdict(list)
    for row in scored:
        by_category[row.category or ""].append(circular[row.index])
    return {
        "samples": len(scored),
        "unanswered": sum(row.index not in answers for row in scored),
        "rounds": sum(len(answers.get(row.index, {})) for row in scored),
        "accuracy": _percent(sum(circular.values()), len(scored)),
        "single_round_accuracy": _percent(sum(single.values()), len(scored)),
        "categories": {name: _percent(sum(hits), len(hits)) for name, hits in sorted(by_category.items())},
    }


def prediction(row: MMBenchRow, texts: dict[int, str]) -> str | None:
    """The sheet's prediction: round 0's letter, or its raw text when no letter could be read from it."""
    if 0 not in texts:
        return None
    letter = parse_option_letter(texts[0], option_letters(len(row.options)))
    return texts[0] if letter == FAILED else letter


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


def evaluate(question_file: str | Path, result_file: str | Path, upload_file: str | Path) -> dict[str, Any] | None:
    """Write the submission sheet; return the scores, or None when the TSV has no answers (test split)."""
    header, rows = read_mmbench(question_file)
    answers = load_answers(result_file, {row.index: row for row in rows})
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--question-file", required=True, help="MMBench TSV")
    parser.add_argument("--result-file", required=True, help="answers JSONL from llava.eval.model_vqa_mmbench")
    parser.add_argument("--upload-file", help=f"submission sheet (default: the result file with {UPLOAD_SUFFIX})")
    parser.add_argument("--scores-file", help="also write the scores as JSON here (for summary.json)")
    args = parser.parse_args(argv)
    upload_file = Path(args.upload_file or Path(args.result_file).with_suffix(UPLOAD_SUFFIX))
    try:
        scores = evaluate(args.question_file, args.result_file, upload_file)
        if scores is not None:
            write_scores(args.scores_file, scores)
    except (MMBenchError, OSError) as error:
        parser.error(str(error))
    if scores is None:
        print("the question file has no answer column values: no accuracy (test split)")
    else:
        print_scores(scores)
    print(f"Submission file: {upload_file}")


if __name__ == "__main__":
    main()
