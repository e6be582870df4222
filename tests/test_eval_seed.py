"""SEED-Bench scoring: option-letter parsing, per-type accuracy by hand, the upload file, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.results import ScoringError
from llava.eval.scoring.seed import (
    load_annotations,
    main,
    option_letter,
    read_answers,
    score_seed,
)
from tests.conftest import REPO_ROOT

QUESTION_TYPES = {"Scene Understanding": 1, "Instance Identity": 2, "Action Recognition": 10}
# (question_id, question_type_id, answer, data_type)
QUESTIONS = [
    ("101669", 1, "A", "image"),
    ("101670", 1, "B", "image"),
    ("101671", 1, "C", "image"),
    ("200001", 2, "D", "image"),
    ("200002", 2, "A", "image"),
    ("200003", 2, "B", "image"),  # not answered: an error, or with --allow-partial left out of the accuracy
    ("v0001", 10, "C", "video"),  # answered, but video questions are not scored
]
# (question_id as LLaVA's answers file may spell it, model answer)
ANSWERS = [
    (101669, "A"),  # right (a numeric id matches the annotation's string id)
    ("101670", "B. a dog"),  # right
    ("101671", "The answer is C"),  # starts with no option letter: wrong
    ("200001", "(D)"),  # right
    ("200002", "Apple"),  # a word, not the option letter A: wrong
    ("v0001", "C"),  # video: ignored
]


def write_annotations(path: Path) -> Path:
    questions = [
        {"question_id": qid, "question_type_id": type_id, "answer": answer, "data_type": data_type,
         "question": f"question {qid}?", "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
         "data_id": f"{qid}.jpg"}
        for qid, type_id, answer, data_type in QUESTIONS
    ]
    path.write_text(json.dumps({"questions": questions, "question_type": QUESTION_TYPES}))
    return path


def write_answers(path: Path, answers: list[tuple] = ANSWERS) -> Path:
    path.write_text("".join(
        json.dumps({"question_id": qid, "prompt": "q", "text": text, "answer_id": "x", "model_id": "m",
                    "metadata": {}}) + "\n"
        for qid, text in answers
    ))
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_annotations(tmp_path / "SEED-Bench.json"), write_answers(tmp_path / "merge.jsonl")


@pytest.mark.parametrize(("answer", "letter"), [
    ("A", "A"), ("B.", "B"), ("(C) a cat", "C"), (" D\n", "D"), ("B, because", "B"),
    ("Apple", None), ("a", None), ("E", None), ("The answer is A", None), ("", None),
])
def test_option_letter(answer: str, letter: str | None) -> None:
    assert option_letter(answer) == letter


def test_scores_by_hand(files: tuple[Path, Path]) -> None:
    questions = load_annotations(files[0])
    scores = score_seed(questions, read_answers(files[1], questions).texts())
    # 5 answered image questions, right: 101669, 101670, 200001 -> 3/5
    assert scores["samples"] == 5
    assert scores["accuracy"] == pytest.approx(60.0)
    # Scene Understanding: 2 of 3 right; Instance Identity: 1 of 2 answered right; no video type
    assert scores["per_type"] == pytest.approx({"Scene Understanding": 200 / 3, "Instance Identity": 50.0})
    assert list(scores["per_type"]) == ["Scene Understanding", "Instance Identity"]  # by type id


def test_cli_prints_writes_upload_and_scores(files: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    upload = tmp_path / "answers_upload" / "model.jsonl"
    scores_file = tmp_path / "scores.json"
    main(["--annotation-file", str(files[0]), "--result-file", str(files[1]),
          "--result-upload-file", str(upload), "--scores-file", str(scores_file), "--allow-partial"])
    output = capsys.readouterr().out.splitlines()
    assert output == ["Scene Understanding: 66.67%", "Instance Identity: 50.00%", "Samples: 5",
                      "Unanswered: 1 of 6 questions", "image accuracy: 60.00%"]
    lines = [json.loads(line) for line in upload.read_text().splitlines()]
    assert lines == [
        {"question_id": "101669", "prediction": "A"},
        {"question_id": "101670", "prediction": "B"},
        {"question_id": "101671", "prediction": "The answer is C"},  # unparsable: kept as written
        {"question_id": "200001", "prediction": "D"},
        {"question_id": "200002", "prediction": "Apple"},
        {"question_id": "v0001", "prediction": "C"},
    ]
    assert json.loads(scores_file.read_text())["accuracy"] == pytest.approx(60.0)
    assert json.loads(scores_file.read_text())["unanswered"] == 1


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unanswered_image_question_fails_without_allow_partial(files: tuple[Path, Path], tmp_path: Path,
                                                               capsys) -> None:
    upload = tmp_path / "u.jsonl"
    error = _cli_error(capsys, "--annotation-file", str(files[0]), "--result-file", str(files[1]),
                       "--result-upload-file", str(upload))
    assert "1 of 6 questions unanswered, e.g. question_id 200003" in error
    assert not upload.exists()


def test_answer_to_unknown_question_is_named(files: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    answers = write_answers(tmp_path / "other.jsonl", [("999999", "A")])
    error = _cli_error(capsys, "--annotation-file", str(files[0]), "--result-file", str(answers),
                       "--result-upload-file", str(tmp_path / "u.jsonl"))
    assert "question_id 999999 is not in the annotation file" in error and "other.jsonl" in error


def test_duplicate_and_video_only_answers_are_errors(files: tuple[Path, Path], tmp_path: Path) -> None:
    questions = load_annotations(files[0])
    with pytest.raises(ScoringError, match="question_id 101669 is answered twice, on lines 1 and 2"):
        read_answers(write_answers(tmp_path / "dup.jsonl", [("101669", "A"), (101669, "B")]), questions)
    video_only = read_answers(write_answers(tmp_path / "video.jsonl", [("v0001", "C")]), questions).texts()
    with pytest.raises(ScoringError, match="none of the annotation file's image questions"):
        score_seed(questions, video_only)


def test_annotation_with_unknown_type_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"questions": [{"question_id": "1", "question_type_id": 7, "answer": "A",
                                               "data_type": "image"}], "question_type": {}}))
    with pytest.raises(ScoringError, match="bad.json"):
        load_annotations(path)


def test_missing_file_exits_2_without_traceback(files: tuple[Path, Path], tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llava.eval.convert_seed_for_submission", "--annotation-file", str(files[0]),
         "--result-file", str(tmp_path / "nope.jsonl"), "--result-upload-file", str(tmp_path / "u.jsonl")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "nope.jsonl" in done.stderr and "Traceback" not in done.stderr
