"""MM-Vet: the model_vqa CLI's flags, and the results JSON keyed "v1_<question_id>" for the evaluator."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval import model_vqa, model_vqa_loader
from llava.eval.scoring.mmvet import main, mmvet_results
from llava.eval.scoring.results import read_results
from tests.conftest import REPO_ROOT


def write_answers(path: Path, answers: list[tuple]) -> Path:
    path.write_text("".join(
        json.dumps({"question_id": qid, "prompt": "q", "text": text, "answer_id": "x", "model_id": "m",
                    "metadata": {}}) + "\n"
        for qid, text in answers
    ))
    return path


def test_model_vqa_has_the_loader_flags() -> None:
    def flags(parser) -> set[str]:
        return {option for action in parser._actions for option in action.option_strings}

    assert flags(model_vqa.build_parser()) == flags(model_vqa_loader.build_parser())


def write_questions(path: Path, question_ids: list) -> Path:
    path.write_text("".join(json.dumps({"question_id": qid, "image": f"v1_{qid}.png", "text": "q"}) + "\n"
                            for qid in question_ids))
    return path


def test_results_keys_and_order(tmp_path: Path) -> None:
    src = write_answers(tmp_path / "merge.jsonl", [(0, "A red car."), (12, "3"), ("217", "")])
    assert list(mmvet_results(read_results(src)).items()) == [("v1_0", "A red car."), ("v1_12", "3"), ("v1_217", "")]


def test_cli_writes_results_json(tmp_path: Path, capsys) -> None:
    src = write_answers(tmp_path / "merge.jsonl", [(0, "yes"), (1, "The sign says \"stop\".")])
    dst = tmp_path / "results" / "llava-tiny.json"
    main(["--src", str(src), "--dst", str(dst)])
    assert json.loads(dst.read_text()) == {"v1_0": "yes", "v1_1": "The sign says \"stop\"."}
    output = capsys.readouterr().out
    assert "not scored locally" in output and "coverage not checked" in output


def test_question_file_checks_coverage(tmp_path: Path, capsys) -> None:
    src = write_answers(tmp_path / "merge.jsonl", [(0, "yes"), (1, "no")])
    dst = tmp_path / "results.json"
    questions = write_questions(tmp_path / "llava-mm-vet.jsonl", [0, 1, 2])
    with pytest.raises(SystemExit):
        main(["--src", str(src), "--dst", str(dst), "--question-file", str(questions)])
    assert "1 of 3 questions unanswered, e.g. question_id 2" in capsys.readouterr().err
    assert not dst.exists()
    main(["--src", str(src), "--dst", str(dst), "--question-file", str(questions), "--allow-partial"])
    assert "Unanswered: 1 of 3 questions" in capsys.readouterr().out
    assert list(json.loads(dst.read_text())) == ["v1_0", "v1_1"]
    main(["--src", str(src), "--dst", str(dst), "--question-file", str(write_questions(questions, [0, 1]))])
    assert "coverage not checked" not in capsys.readouterr().out


@pytest.mark.parametrize(("lines", "message"), [
    ('{"question_id": 0, "text": "a"}\n{"question_id": 0, "text": "b"}\n', "question_id 0 is answered twice"),
    ('{"question_id": 0}\n', "line 1: lacks 'text'"),
    ("\n", "holds no answers"),
    ("{oops\n", "line 1: not valid JSON"),
])
def test_bad_answers_are_clear_errors(tmp_path: Path, capsys, lines: str, message: str) -> None:
    src = tmp_path / "bad.jsonl"
    src.write_text(lines)
    with pytest.raises(SystemExit) as exit_info:
        main(["--src", str(src), "--dst", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and "bad.jsonl" in error


def test_missing_src_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llava.eval.convert_mmvet_for_eval", "--src", str(tmp_path / "nope.jsonl"),
         "--dst", str(tmp_path / "out.json")], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 2
    assert "nope.jsonl" in done.stderr and "Traceback" not in done.stderr


def test_model_vqa_bad_flag_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llava.eval.model_vqa", "--question-file", str(tmp_path / "nope.jsonl"),
         "--conv-mode", "no_such_mode"], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert done.returncode == 1
    assert "no_such_mode" in done.stderr and "Traceback" not in done.stderr
