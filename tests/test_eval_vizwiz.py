"""VizWiz submission converter: answer normalisation, "unanswerable" fallback, order, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.results import ScoringError
from llava.eval.scoring.vizwiz import (
    convert_vizwiz,
    main,
    submission_answer,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = ("What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
          "Answer the question using a single word or phrase.")


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def question_file(tmp_path: Path) -> Path:
    # llava_test.jsonl lines: question_id, image, text, category
    return _write_jsonl(tmp_path / "llava_test.jsonl", [
        {"question_id": index, "image": f"VizWiz_test_{index:08d}.jpg", "text": PROMPT, "category": "default"}
        for index in range(4)
    ])


@pytest.fixture
def result_file(tmp_path: Path) -> Path:
    # answered out of order on purpose: the upload follows the question file
    texts = {2: "Unanswerable.", 0: "Two", 3: "The.", 1: "Coca-Cola"}
    return _write_jsonl(tmp_path / "merge.jsonl", [
        {"question_id": qid, "prompt": PROMPT, "text": text, "answer_id": "x", "model_id": "tiny", "metadata": {}}
        for qid, text in texts.items()
    ])


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Two", "2"),  # number word -> digit
        ("Coca-Cola", "coca cola"),  # hyphen touching no space -> space
        ("Unanswerable.", "unanswerable"),  # period dropped
        ("The.", "unanswerable"),  # "the" is an article and "." goes -> empty -> unanswerable
        ("", "unanswerable"),
        ("?", "unanswerable"),
        ("a red can", "red can"),
    ],
)
def test_submission_answer(text: str, answer: str) -> None:
    assert submission_answer(text) == answer


def test_convert_writes_upload_in_question_order(question_file: Path, result_file: Path, tmp_path: Path) -> None:
    upload = tmp_path / "answers_upload" / "tiny.json"
    counts = convert_vizwiz(question_file, result_file, upload)
    assert json.loads(upload.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "2"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "coca cola"},
        {"image": "VizWiz_test_00000002.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000003.jpg", "answer": "unanswerable"},
    ]
    # questions 2 ("Unanswerable.") and 3 ("The." -> empty) are unanswerable
    assert counts == {"answers": 4, "unanswerable": 2}


def test_missing_answer_names_question_id(question_file: Path, tmp_path: Path) -> None:
    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"question_id": 0, "text": "yes"}])
    with pytest.raises(ScoringError, match="3 of 4 questions unanswered, e.g. question_id 1, 2, 3"):
        convert_vizwiz(question_file, partial, tmp_path / "up.json")
    assert not (tmp_path / "up.json").exists()
    # allowed: the upload holds the answered question only
    counts = convert_vizwiz(question_file, partial, tmp_path / "up.json", allow_partial=True)
    assert counts == {"answers": 1, "unanswerable": 0, "unanswered": 3}
    assert json.loads((tmp_path / "up.json").read_text()) == [{"image": "VizWiz_test_00000000.jpg", "answer": "yes"}]


def test_question_without_image_is_an_error(tmp_path: Path, result_file: Path) -> None:
    questions = _write_jsonl(tmp_path / "q.jsonl", [{"question_id": 0, "text": PROMPT}])
    with pytest.raises(ScoringError, match="q.jsonl, line 1: lacks 'image'"):
        convert_vizwiz(questions, result_file, tmp_path / "up.json")


def test_cli_writes_scores_file(question_file: Path, result_file: Path, tmp_path: Path, capsys) -> None:
    scores = tmp_path / "scores.json"
    main(["--annotation-file", str(question_file), "--result-file", str(result_file),
          "--result-upload-file", str(tmp_path / "up.json"), "--scores-file", str(scores)])
    assert json.loads(scores.read_text()) == {"answers": 4, "unanswerable": 2}
    assert "Answers: 4" in capsys.readouterr().out


def test_cli_missing_result_file_exits_2_without_traceback(question_file: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "llava.eval.convert_vizwiz_for_submission", "--annotation-file", str(question_file),
         "--result-file", str(tmp_path / "nope.jsonl"), "--result-upload-file", str(tmp_path / "up.json")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 2
    assert "nope.jsonl" in completed.stderr and "Traceback" not in completed.stderr
