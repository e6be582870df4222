"""VQAv2 submission file: every test question present, answers normalised, missing ones "", errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.vqav2 import main, upload_entries
from tests.conftest import REPO_ROOT

SPLIT = "llava_vqav2_mscoco_test-dev2015"
CKPT = "llava-tiny-64"
TEST_SPLIT_IDS = [262144000, 262144001, 262144002, 393225000]  # the last is outside test-dev


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def vqav2_dir(tmp_path: Path) -> Path:
    write_jsonl(tmp_path / "llava_vqav2_mscoco_test2015.jsonl",
                [{"question_id": qid, "image": f"COCO_test2015_{qid // 1000:012d}.jpg", "text": "q?",
                  "category": "default"} for qid in TEST_SPLIT_IDS])
    write_jsonl(tmp_path / "answers" / SPLIT / CKPT / "merge.jsonl", [
        {"question_id": 262144000, "prompt": "q", "text": "Two.", "answer_id": "a", "model_id": "m", "metadata": {}},
        {"question_id": 262144002, "prompt": "q", "text": "Yes", "answer_id": "b", "model_id": "m", "metadata": {}},
    ])
    return tmp_path


def test_upload_entries_normalise_and_fill_missing() -> None:
    entries = upload_entries([1, 2, 3], {"1": "The Coca-Cola.", "3": "dont know"})
    assert entries == [
        {"question_id": 1, "answer": "coca cola"},
        {"question_id": 2, "answer": ""},
        {"question_id": 3, "answer": "don't know"},
    ]


def test_cli_writes_llava_upload_layout(vqav2_dir: Path, capsys) -> None:
    scores = vqav2_dir / "scores.json"
    main(["--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", CKPT, "--scores-file", str(scores)])
    assert f"coverage not checked: no question file {vqav2_dir / SPLIT}.jsonl" in capsys.readouterr().out
    upload = json.loads((vqav2_dir / "answers_upload" / SPLIT / f"{CKPT}.json").read_text())
    assert upload == [
        {"question_id": 262144000, "answer": "2"},
        {"question_id": 262144001, "answer": ""},  # in test-dev, not answered
        {"question_id": 262144002, "answer": "yes"},
        {"question_id": 393225000, "answer": ""},  # test only
    ]
    assert json.loads(scores.read_text()) == {"answered": 2, "total": 4}


def test_split_question_file_needs_every_answer(vqav2_dir: Path, capsys) -> None:
    write_jsonl(vqav2_dir / f"{SPLIT}.jsonl", [{"question_id": qid, "text": "q?"} for qid in TEST_SPLIT_IDS[:3]])
    args = ["--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", CKPT]
    error = _cli_error(capsys, *args)
    assert "1 of 3 questions unanswered, e.g. question_id 262144001" in error
    assert not (vqav2_dir / "answers_upload").exists()
    main([*args, "--allow-partial", "--scores-file", str(vqav2_dir / "scores.json")])
    output = capsys.readouterr().out
    assert "total results: 2, total split: 4" in output and "Unanswered: 1 of 3 questions" in output
    assert json.loads((vqav2_dir / "scores.json").read_text()) == {"answered": 2, "total": 4, "unanswered": 1}


def test_answer_outside_the_split_question_file_is_named(vqav2_dir: Path, tmp_path: Path, capsys) -> None:
    write_jsonl(vqav2_dir / f"{SPLIT}.jsonl", [{"question_id": qid, "text": "q?"} for qid in TEST_SPLIT_IDS[:3]])
    merged = write_jsonl(tmp_path / "test.jsonl", [{"question_id": 393225000, "text": "red"}])
    error = _cli_error(capsys, "--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", CKPT, "--result-file", str(merged))
    assert "test.jsonl, line 1: question_id 393225000 is not in the split question file" in error


def test_result_file_flag_overrides_default_layout(vqav2_dir: Path, tmp_path: Path) -> None:
    merged = write_jsonl(tmp_path / "elsewhere" / "merge.jsonl", [{"question_id": 393225000, "text": "red"}])
    main(["--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", "other", "--result-file", str(merged)])
    upload = json.loads((vqav2_dir / "answers_upload" / SPLIT / "other.json").read_text())
    assert [entry["answer"] for entry in upload] == ["", "", "", "red"]


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_answer_outside_test_split_is_named(vqav2_dir: Path, tmp_path: Path, capsys) -> None:
    merged = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 5, "text": "x"}])
    error = _cli_error(capsys, "--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", CKPT, "--result-file", str(merged))
    assert "question_id 5 is not in the test split" in error and "bad.jsonl" in error


def test_duplicate_answer_is_an_error(vqav2_dir: Path, tmp_path: Path, capsys) -> None:
    merged = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 262144000, "text": "a"}] * 2)
    error = _cli_error(capsys, "--dir", str(vqav2_dir), "--split", SPLIT, "--ckpt", CKPT, "--result-file", str(merged))
    assert "262144000 is answered twice, on lines 1 and 2" in error


def test_missing_test_split_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llava.eval.convert_vqav2_for_submission", "--dir", str(tmp_path), "--split", SPLIT,
         "--ckpt", CKPT], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "llava_vqav2_mscoco_test2015.jsonl" in done.stderr and "Traceback" not in done.stderr
