"""MMBench: TSV reading, prompts and circular rounds, scoring (hand-computed), and the upload sheet."""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pytest
from openpyxl import load_workbook
from PIL import Image

from llava.eval.answering import loop as question_loop
from llava.eval.answering.mmbench import build_parser, questions_from_file
from llava.eval.answering.mmbench import main as answer_main
from llava.eval.answering.loop import RunError
from llava.eval.scoring.mmbench import (
    MMBenchError,
    evaluate,
    main,
    read_mmbench,
    rotate,
    round_answer,
)
from llava.eval.scoring.results import ScoringError
from tests.conftest import MMBENCH_COLUMNS, REPO_ROOT, cli_refusal, sample_rows, write_tsv

INSTRUCTION = "Answer with the option's letter from the given choices directly."
NOISE_SIDE = 256  # a random-noise PNG this size is ~260k base64 characters, beyond csv's default field limit


# Answers for every round. Question 0 (answer red): all right. Question 1 (answer "3"): round 2 wrong.
# Question 2 (answer "no"): round 0 wrong. Rounds rotate the options left, so the right letter moves.
ROUND_ANSWERS = [
    (0, 0, "A"), (0, 1, "C"), (0, 2, "B. red"),  # [red, blue, green] [blue, green, red] [green, red, blue]
    (1, 0, "C"), (1, 1, "B"), (1, 2, "C"), (1, 3, "The answer is D."),  # right letters C, B, A, D
    (2, 0, "A"), (2, 1, "A"),  # [yes, no] -> B; [no, yes] -> A
]


def write_answers(path: Path, answers: list[tuple[int, int, str]]) -> Path:
    lines = [json.dumps({"question_id": index, "round_id": round_id, "prompt": "p", "text": text})
             for index, round_id, text in answers]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def tsv(tmp_path: Path) -> Path:
    return write_tsv(tmp_path / "mmbench_dev_20230712.tsv", sample_rows())


# ---------------------------------------------------------------- rounds and prompts


def test_rotation_moves_the_answer_letter(tsv: Path) -> None:
    _, rows = read_mmbench(tsv)
    assert [len(row.options) for row in rows] == [3, 4, 2]  # options stop at the first empty one
    assert rotate(["1", "2", "3", "4"], 1) == ["2", "3", "4", "1"]
    assert [round_answer(rows[1], r) for r in range(4)] == ["C", "B", "A", "D"]
    for r in range(4):  # the right letter always points at the original right option, "3"
        assert rotate(rows[1].options, r)["ABCD".index(round_answer(rows[1], r))] == "3"


def _args(tsv: Path, *extra: str):
    return build_parser().parse_args(["--question-file", str(tsv), *extra])


def test_prompt_and_record_of_a_rotated_round(tsv: Path) -> None:
    questions = questions_from_file(_args(tsv, "--all-rounds"))
    assert [(q.question_id, q.record["round_id"]) for q in questions] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    second_round = questions[1]
    prompt = "A sign by the road.\nWhat color is the sign?\nA. blue\nB. green\nC. red"
    assert second_round.text == f"{prompt}\n{INSTRUCTION}"
    assert second_round.record == {"round_id": 1, "prompt": prompt, "options": ["blue", "green", "red"],
                                   "option_char": ["A", "B", "C"], "answer": "C"}


def test_missing_hints_and_single_round(tsv: Path) -> None:
    questions = questions_from_file(_args(tsv, "--lang", "cn"))
    assert [q.record["round_id"] for q in questions] == [0, 0, 0]
    assert questions[1].text == "How many cars?\nA. 1\nB. 2\nC. 3\nD. 4\n请直接回答选项字母。"  # "nan" hint
    assert questions[2].text.startswith("Is it day?\nA. yes\nB. no\n")  # empty hint
    plain = questions_from_file(_args(tsv, "--no-single-pred-prompt"))
    assert plain[2].text == "Is it day?\nA. yes\nB. no"


def test_image_is_decoded_from_base64(tsv: Path) -> None:
    image = questions_from_file(_args(tsv))[0].load_image()
    assert image.mode == "RGB" and image.size == (24, 16)


def truncated_png() -> str:
    """A noise PNG cut in half, as base64: its header reads, its pixels do not."""
    buffer = BytesIO()
    Image.frombytes("RGB", (32, 32), os.urandom(3 * 32 * 32)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[: len(buffer.getvalue()) // 2]).decode("ascii")

# (the image cells of TSV rows 0, 1, 2 (None: a good image), what the one line says); the header is line 1
BAD_IMAGE_CELLS = [
    ((None, "bm90IGFuIGltYWdl", None),  # base64 of "not an image"
     "line 3 (index 1): its image cell is base64 but not an image (12 bytes in no format PIL knows)"),
    ((None, None, "abc"), "line 4 (index 2): its image cell is not valid base64 (Incorrect padding)"),
    (("é", None, None), "line 2 (index 0): its image cell is not valid base64 (string argument should contain only "
                        "ASCII characters)"),
    ((None, "", None), "line 3 (index 1): its image cell is empty"),
    ((None, "nan", "bmFu"), "line 3 (index 1): its image cell is empty (and 1 more of the 3 rows)"),  # pandas' nan
]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading weights."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the question file could be refused before")

    monkeypatch.setattr(question_loop, "load_pretrained_model", forbidden)


def _answer_argv(tsv: Path, tmp_path: Path) -> list[str]:
    return ["--question-file", str(tsv), "--answers-file", str(tmp_path / "answers.jsonl"),
            "--model-path", str(tmp_path / "no-model")]


@pytest.mark.parametrize(("cells", "message"), BAD_IMAGE_CELLS,
                         ids=["not-an-image", "bad-padding", "not-ascii", "empty", "two-bad"])
def test_every_image_cell_is_checked_before_the_model_loads(tmp_path: Path, no_model_load, cells, message) -> None:
    rows = sample_rows()
    for row, cell in zip(rows, cells):
        if cell is not None:
            row["image"] = cell
    tsv = write_tsv(tmp_path / "bad.tsv", rows)
    error = cli_refusal(answer_main, _answer_argv(tsv, tmp_path))
    assert error == f"error: question file {str(tsv)!r}, {message}"
    assert not (tmp_path / "answers.jsonl").exists()


def test_a_tsv_without_an_image_column_is_refused(tmp_path: Path, no_model_load) -> None:
    tsv = write_tsv(tmp_path / "bad.tsv", sample_rows(), [c for c in MMBENCH_COLUMNS if c != "image"])
    error = cli_refusal(answer_main, _answer_argv(tsv, tmp_path))
    assert error.startswith(f"error: question file {str(tsv)!r} has no 'image' column (MMBench's base64 images)")


def test_a_truncated_row_is_named_by_its_line(tmp_path: Path, no_model_load) -> None:
    tsv = write_tsv(tmp_path / "cut.tsv", sample_rows())
    text = tsv.read_text()
    tsv.write_text(text[: text.rindex("\t", 0, text.rindex("\t"))] + "\n")  # the last row loses two cells
    error = cli_refusal(answer_main, _answer_argv(tsv, tmp_path))
    assert error == (f"error: question file {str(tsv)!r}, line 4: {len(MMBENCH_COLUMNS) - 2} cells where the header "
                     f"has {len(MMBENCH_COLUMNS)} columns (a truncated file?)")


def test_line_numbers_count_cells_that_span_lines_and_skip_blank_lines(tmp_path: Path) -> None:
    rows = sample_rows()
    rows[0]["hint"] = "A sign\nby the road."  # quoted over two lines
    rows[2]["image"] = "abc"
    tsv = write_tsv(tmp_path / "multi.tsv", rows)
    lines = tsv.read_text().split("\n")
    tsv.write_text("\n".join([*lines[:3], "", *lines[3:]]))  # a blank line between rows 0 and 1
    _, parsed = read_mmbench(tsv)
    assert [row.line for row in parsed] == [2, 5, 6]
    assert parsed[0].hint == "A sign\nby the road." and parsed[1].index == 1
    with pytest.raises(RunError, match=r"line 6 \(index 2\): its image cell is not valid base64"):
        questions_from_file(_args(tsv))


def test_a_header_readable_image_that_cannot_decode_names_its_question_when_asked(tmp_path: Path) -> None:
    rows = sample_rows()
    rows[1]["image"] = truncated_png()  # passes the header check, as a truncated image file does
    questions = questions_from_file(_args(write_tsv(tmp_path / "cut.tsv", rows)))
    assert questions[0].load_image().size == (24, 16)
    with pytest.raises(RunError, match=r"question 1: cannot decode its base64 image \(image file is truncated"):
        questions[1].load_image()


def test_a_bad_image_cell_stops_a_real_process_in_one_line(tmp_path: Path) -> None:
    rows = sample_rows()
    rows[2]["image"] = "abc"
    tsv = write_tsv(tmp_path / "bad.tsv", rows)
    done = subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_mmbench", *_answer_argv(tsv, tmp_path)],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: question file {str(tsv)!r}, line 4 (index 2): its image "
                                                "cell is not valid base64 (Incorrect padding)"]


def test_image_cells_beyond_csv_default_limit(tmp_path: Path) -> None:
    buffer = BytesIO()
    Image.frombytes("RGB", (NOISE_SIDE, NOISE_SIDE), os.urandom(3 * NOISE_SIDE**2)).save(buffer, format="PNG")
    rows = sample_rows()
    rows[0]["image"] = base64.b64encode(buffer.getvalue()).decode("ascii")
    assert len(rows[0]["image"]) > csv.field_size_limit()
    limit = csv.field_size_limit()
    _, parsed = read_mmbench(write_tsv(tmp_path / "big.tsv", rows))
    assert parsed[0].image == rows[0]["image"]
    assert csv.field_size_limit() == limit  # restored


# ---------------------------------------------------------------- scoring


def test_circular_single_round_and_category_accuracy(tsv: Path, tmp_path: Path) -> None:
    scores = evaluate(tsv, write_answers(tmp_path / "merge.jsonl", ROUND_ANSWERS), tmp_path / "up.xlsx")
    assert (scores["samples"], scores["rounds"], scores["unanswered"]) == (3, 9, 0)
    assert scores["accuracy"] == pytest.approx(100 / 3)  # only question 0 is right in every round
    assert scores["single_round_accuracy"] == pytest.approx(200 / 3)  # round 0: questions 0 and 1
    assert scores["categories"] == {"color": pytest.approx(50.0), "count": 0.0}  # color: 0 right, 2 wrong


def test_unanswered_questions_count_wrong(tsv: Path, tmp_path: Path) -> None:
    result = write_answers(tmp_path / "merge.jsonl", ROUND_ANSWERS[:3])
    with pytest.raises(ScoringError, match="2 of 3 questions unanswered, e.g. question_id 1, 2"):
        evaluate(tsv, result, tmp_path / "up.xlsx")
    assert not (tmp_path / "up.xlsx").exists()
    scores = evaluate(tsv, result, tmp_path / "up.xlsx", allow_partial=True)
    assert scores["unanswered"] == 2
    assert scores["accuracy"] == pytest.approx(100 / 3) and scores["single_round_accuracy"] == pytest.approx(100 / 3)


def test_a_round_short_is_partial_and_wrong(tsv: Path, tmp_path: Path) -> None:
    # question 0 misses round 2 of 3; its rounds 0 and 1 are right, yet it must not count circular-right
    result = write_answers(tmp_path / "merge.jsonl", [a for a in ROUND_ANSWERS if a[:2] != (0, 2)])
    with pytest.raises(ScoringError, match="1 of 3 questions unanswered, e.g. question_id 0"):
        evaluate(tsv, result, tmp_path / "up.xlsx")
    scores = evaluate(tsv, result, tmp_path / "up.xlsx", allow_partial=True)
    # circular: question 0 misses a round, 1 is wrong in round 2, 2 in round 0 -> 0 of 3
    assert scores["unanswered"] == 1 and scores["accuracy"] == 0.0
    assert scores["single_round_accuracy"] == pytest.approx(200 / 3)


def _sheet(path: Path) -> list[tuple]:
    return list(load_workbook(path).active.iter_rows(values_only=True))


def test_upload_sheet_has_llava_columns_and_parsed_letters(tsv: Path, tmp_path: Path, capsys) -> None:
    answers = [(0, 0, "A. red"), (1, 0, "I cannot tell")]  # question 2 unanswered
    upload = tmp_path / "answers_upload" / "tiny.xlsx"
    main(["--question-file", str(tsv), "--result-file", str(write_answers(tmp_path / "merge.jsonl", answers)),
          "--upload-file", str(upload), "--allow-partial"])
    header, *rows = _sheet(upload)
    assert header == ("index", "question", "hint", "A", "B", "C", "D", "prediction", "answer", "category",
                      "l2-category")
    assert rows[0] == (0, "What color is the sign?", "A sign by the road.", "red", "blue", "green", None, "A", "A",
                       "color", "attribute")
    assert [row[7] for row in rows] == ["A", "I cannot tell", None]  # no letter read: the text, for the server
    output = capsys.readouterr().out
    assert "Circular accuracy: 33.33%" in output and str(upload) in output


def test_test_split_without_answers_only_writes_the_sheet(tmp_path: Path, capsys) -> None:
    columns = [column for column in MMBENCH_COLUMNS if column != "answer"]
    tsv = write_tsv(tmp_path / "mmbench_test.tsv", sample_rows(), columns)
    result = write_answers(tmp_path / "merge.jsonl", [(0, 0, "B"), (1, 0, "D"), (2, 0, "A")])
    scores_file = tmp_path / "scores.json"
    main(["--question-file", str(tsv), "--result-file", str(result), "--scores-file", str(scores_file)])
    header, *rows = _sheet(tmp_path / "merge.xlsx")  # default: next to the result file
    assert "answer" not in header and [row[header.index("prediction")] for row in rows] == ["B", "D", "A"]
    assert not scores_file.exists()
    assert "no accuracy" in capsys.readouterr().out


# ---------------------------------------------------------------- errors


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_answer_for_an_unknown_index(tsv: Path, tmp_path: Path, capsys) -> None:
    result = write_answers(tmp_path / "merge.jsonl", [(0, 0, "A"), (42, 0, "B"), (0, 3, "A")])
    error = _cli_error(capsys, "--question-file", str(tsv), "--result-file", str(result))
    assert "line 2" in error and "('42', 0)" in error
    result = write_answers(tmp_path / "merge.jsonl", [(0, 0, "A"), (0, 3, "A")])  # question 0 has 3 options
    error = _cli_error(capsys, "--question-file", str(tsv), "--result-file", str(result))
    assert "line 2" in error and "('0', 3)" in error


def test_round_id_must_be_a_number(tsv: Path, tmp_path: Path) -> None:
    result = tmp_path / "merge.jsonl"
    result.write_text(json.dumps({"question_id": 0, "round_id": "1", "text": "A"}) + "\n")
    with pytest.raises(ScoringError, match="line 1: round_id '1' is not a round number"):
        evaluate(tsv, result, tmp_path / "up.xlsx")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"index": "seven"}, "index 'seven' is not an integer"),
        ({"answer": "D"}, "question 0 has answer 'D' but 3 options"),
        ({"A": ""}, "question 0 has no options"),
    ],
)
def test_bad_rows_name_the_question(tmp_path: Path, change: dict, message: str) -> None:
    rows = sample_rows()
    rows[0].update(change)
    with pytest.raises(MMBenchError, match=message):
        read_mmbench(write_tsv(tmp_path / "bad.tsv", rows))


def test_missing_columns_are_named(tmp_path: Path) -> None:
    tsv = write_tsv(tmp_path / "bad.tsv", sample_rows(), ["index", "question", "A"])
    with pytest.raises(MMBenchError, match=r"bad.tsv.*\['B'\]"):
        read_mmbench(tsv)


def test_clis_exit_with_one_line_for_a_missing_tsv(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.tsv")
    for module, extra in (("llava.eval.eval_mmbench", ["--result-file", "x.jsonl"]),
                          ("llava.eval.model_vqa_mmbench", ["--answers-file", str(tmp_path / "a.jsonl"),
                                                            "--model-path", str(tmp_path / "model")])):
        completed = subprocess.run([sys.executable, "-m", module, "--question-file", missing, *extra],
                                   capture_output=True, text=True, cwd=REPO_ROOT)
        assert completed.returncode != 0
        assert "nope.tsv" in completed.stderr and "Traceback" not in completed.stderr
