"""GQA scoring: LLaVA's answer conversion, exact-match accuracy, per-type accuracy, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.gqa import (
    convert_results,
    load_questions,
    main,
    prediction_text,
    score_predictions,
)
from llava.eval.scoring.results import ScoringError

REPO_ROOT = Path(__file__).resolve().parent.parent


def _question(answer: str, structural: str, semantic: str, balanced: bool = True) -> dict:
    """A testdev_balanced_questions.json entry (fields the scorer ignores trimmed)."""
    return {
        "imageId": "n161313", "question": "?", "answer": answer, "fullAnswer": answer.capitalize() + ".",
        "isBalanced": balanced, "groups": {"global": None, "local": "10c-x"}, "entailed": [], "equivalent": [],
        "types": {"structural": structural, "semantic": semantic, "detailed": "d"}, "annotations": {},
        "semantic": [], "semanticStr": "",
    }


@pytest.fixture
def questions_file(tmp_path: Path) -> Path:
    questions = {
        "201307251": _question("yes", "verify", "attr"),
        "201640614": _question("left", "query", "rel"),
        "202225914": _question("white", "query", "attr"),
        "20515720": _question("no", "logical", "obj"),
        "99": _question("no", "verify", "obj", balanced=False),  # unbalanced: not scored, needs no prediction
    }
    path = tmp_path / "testdev_balanced_questions.json"
    path.write_text(json.dumps(questions))
    return path


@pytest.fixture
def result_file(tmp_path: Path) -> Path:
    # LLaVA's answers JSONL; question ids are strings as in llava_gqa_testdev_balanced.jsonl
    texts = [("201307251", "Yes."), ("201640614", "Left"), ("202225914", "gray"), ("20515720", "No..")]
    path = tmp_path / "merge.jsonl"
    path.write_text("".join(
        json.dumps({"question_id": qid, "prompt": "q", "text": text, "answer_id": "a", "model_id": "m",
                    "metadata": {}}) + "\n"
        for qid, text in texts
    ))
    return path


@pytest.mark.parametrize(("text", "prediction"), [("Yes.", "yes"), ("No..", "no"), ("2.5", "2.5"), ("Mr. T", "mr. t")])
def test_prediction_text_strips_trailing_periods_and_lowercases(text: str, prediction: str) -> None:
    assert prediction_text(text) == prediction


def test_convert_results(result_file: Path) -> None:
    assert convert_results(result_file)[0] == {"questionId": "201307251", "prediction": "yes"}


def test_score_overall_and_per_type(questions_file: Path, result_file: Path) -> None:
    scores = score_predictions(load_questions(questions_file), convert_results(result_file))
    # right: yes, left, no; wrong: gray vs white -> 3 / 4 balanced questions
    assert scores["questions"] == 4
    assert scores["accuracy"] == pytest.approx(75.0)
    # structural: verify 1/1, query 1/2 (left right, gray wrong), logical 1/1
    assert scores["structural"] == {"logical": 100.0, "query": 50.0, "verify": 100.0}
    # semantic: attr 1/2 (yes right, gray wrong), rel 1/1, obj 1/1
    assert scores["semantic"] == {"attr": 50.0, "obj": 100.0, "rel": 100.0}


def test_integer_question_ids_match_string_keys(questions_file: Path) -> None:
    predictions = [{"questionId": int(qid), "prediction": "no"} for qid in ("201307251", "201640614", "202225914")]
    predictions.append({"questionId": "20515720", "prediction": "no"})
    # only "20515720" (answer "no") is right -> 1 / 4
    assert score_predictions(load_questions(questions_file), predictions)["accuracy"] == pytest.approx(25.0)


def test_missing_predictions_name_the_ids(questions_file: Path) -> None:
    predictions = [{"questionId": "201307251", "prediction": "yes"}, {"questionId": "201640614", "prediction": "left"}]
    with pytest.raises(ScoringError, match="2 of 4 questions unanswered, e.g. questionId 202225914, 20515720"):
        score_predictions(load_questions(questions_file), predictions)
    # allowed, they count wrong over all 4 balanced questions: 2 right of 4
    scores = score_predictions(load_questions(questions_file), predictions, allow_partial=True)
    assert scores["accuracy"] == pytest.approx(50.0) and scores["unanswered"] == 2


def test_cli_converts_writes_predictions_and_scores(questions_file: Path, result_file: Path, tmp_path: Path,
                                                     capsys) -> None:
    predictions, scores = tmp_path / "out" / "testdev_balanced_predictions.json", tmp_path / "scores.json"
    main(["--questions", str(questions_file), "--result-file", str(result_file), "--predictions", str(predictions),
          "--scores-file", str(scores)])
    assert "Accuracy: 75.00%" in capsys.readouterr().out
    assert json.loads(predictions.read_text())[3] == {"questionId": "20515720", "prediction": "no"}
    assert json.loads(scores.read_text())["accuracy"] == pytest.approx(75.0)
    # the written predictions file scores the same on its own (GQA eval.py style)
    main(["--questions", str(questions_file), "--predictions", str(predictions)])
    assert "Accuracy: 75.00%" in capsys.readouterr().out


def test_cli_needs_predictions_or_result_file(questions_file: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--questions", str(questions_file)])
    assert exit_info.value.code == 2
    assert "--predictions and/or --result-file" in capsys.readouterr().err


def test_malformed_questions_file_is_a_clear_error(tmp_path: Path, result_file: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"question": "no answer field"}}))
    with pytest.raises(ScoringError, match="question '1' has no 'answer'"):
        score_predictions(load_questions(bad), convert_results(result_file))


def test_cli_missing_questions_exits_2_without_traceback(tmp_path: Path, result_file: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_gqa", "--questions", str(tmp_path / "nope.json"),
         "--result-file", str(result_file)], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 2
    assert "nope.json" in completed.stderr and "Traceback" not in completed.stderr
