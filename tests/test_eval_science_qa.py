"""ScienceQA: option-letter parsing, the question file's prompts, and the scorer (hand-computed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.answering.science import (
    SINGLE_PRED_PROMPT,
    build_parser,
    questions_from_file,
)
from llava.eval.option_letters import FAILED, option_letters, parse_option_letter
from llava.eval.answering.loop import RunError
from llava.eval.scoring.results import ScoringError
from llava.eval.scoring.science_qa import (
    grade_split,
    main,
    summarize,
)
from tests.conftest import REPO_ROOT

ABCD = ["A", "B", "C", "D"]

# ---------------------------------------------------------------- option letters


@pytest.mark.parametrize(
    ("answer", "letter"),
    [
        ("B", "B"),
        (" C\n", "C"),  # surrounding whitespace is not part of the answer
        ("A. a cat", "A"),  # leading "X."
        ("D.", "D"),
        ("The answer is B.", "B"),
        ("Looking at the map, the answer is clear. The answer is C.", "C"),
        ("The answer is (D).", "D"),
        ("The answer is A", "A"),
        ("(B) the dog", "B"),
        ("A. The answer is B.", "A"),  # the leading letter is looked at first, as in LLaVA
        ("E", FAILED),  # a letter, but no option of this question
        ("The answer is E.", FAILED),
        ("a", FAILED),  # letters are upper case
        ("A cat", FAILED),  # an article, not a choice
        ("The answer is Apple.", FAILED),  # a word that starts with a letter
        ("The answer is A. No wait, the answer is B.", "A"),  # only the capitalised phrase counts, once
        ("The answer is A. The answer is B.", FAILED),  # stated twice: ambiguous
        ("I think (A) or (B)", FAILED),  # "(X)" counts only at the start
        ("Options: (A) cat (B) dog", FAILED),
        ("", FAILED),
    ],
)
def test_parse_option_letter(answer: str, letter: str) -> None:
    assert parse_option_letter(answer, ABCD) == letter


def test_option_letters() -> None:
    assert option_letters(3) == ["A", "B", "C"]
    with pytest.raises(ValueError, match="got 0"):
        option_letters(0)


# ---------------------------------------------------------------- question file


def _problem(problem_id: str, question: str, image: str | None) -> dict:
    human = f"<image>\n{question}" if image else question
    problem = {"id": problem_id, "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "A"}]}
    if image:
        problem["image"] = image
    return problem


def _args(question_file: Path, *extra: str):
    return build_parser().parse_args(["--question-file", str(question_file), "--image-folder", "imgs", *extra])


def test_prompts_follow_llava(tmp_path: Path) -> None:
    question = "Context: N/A\nWhich is a mammal?\nOptions: (A) cat (B) trout"
    path = tmp_path / "llava_test_CQM-A.json"
    path.write_text(json.dumps([_problem("7", question, "7/image.png"), _problem("8", question, None)]))
    with_image, text_only = questions_from_file(_args(path))
    expected = f"{question}\n{SINGLE_PRED_PROMPT}"
    assert (with_image.question_id, with_image.text) == ("7", expected)
    assert with_image.image_path == Path("imgs") / "7/image.png"
    assert with_image.record == {"prompt": f"<image>\n{expected}"}  # LLaVA's marker of an image question
    assert text_only.image_path is None and text_only.image_loader is None
    assert text_only.record == {"prompt": expected}
    plain = questions_from_file(_args(path, "--no-single-pred-prompt"))[0]
    assert plain.text == question


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": "1"}', "expected a JSON list"),
        ("[{", "not readable JSON"),
        ('[{"id": "1", "conversations": []}]', "question 1: needs 'id' and 'conversations'"),
    ],
)
def test_bad_question_file_is_a_run_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "questions.json"
    path.write_text(content)
    with pytest.raises(RunError, match=message):
        questions_from_file(_args(path))


def test_missing_question_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="nope.json"):
        questions_from_file(_args(tmp_path / "nope.json"))


# ---------------------------------------------------------------- scorer

PROBLEMS = {
    "1": {"choices": ["cat", "trout", "eel"], "answer": 0, "image": "image.png", "split": "test"},
    "2": {"choices": ["yes", "no"], "answer": 1, "image": None, "split": "test"},
    "3": {"choices": ["p", "q", "r", "s"], "answer": 3, "image": "image.png", "split": "test"},
    "4": {"choices": ["u", "v"], "answer": 0, "image": "image.png", "split": "test"},
    "5": {"choices": ["u", "v"], "answer": 0, "image": None, "split": "val"},
}
ANSWERS = [
    ("1", "A", True),  # IMG, right
    ("2", "The answer is B.", False),  # text-only, right
    ("3", "C. r", True),  # IMG, wrong (D)
]  # problem 4 (IMG) has no answer: wrong when partial answers are allowed


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "scienceqa"
    base.mkdir()
    (base / "problems.json").write_text(json.dumps(PROBLEMS))
    (base / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3", "4"], "val": ["5"]}))
    return base


def _write_answers(path: Path, answers: list[tuple[str, str, bool]]) -> Path:
    lines = [json.dumps({"question_id": pid, "prompt": ("<image>\n" if image else "") + "Q?", "text": text,
                         "answer_id": "x", "model_id": "tiny", "metadata": {}}) for pid, text, image in answers]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def result_file(tmp_path: Path) -> Path:
    return _write_answers(tmp_path / "merge.jsonl", ANSWERS)


def test_scores_split_and_img_subset(base_dir: Path, result_file: Path) -> None:
    scores = summarize(grade_split(base_dir, result_file, "test", allow_partial=True), allow_partial=True)
    # right: 1 and 2 of 4 -> 50%; IMG problems 1, 3, 4, right: 1 -> 33.33%
    assert (scores["samples"], scores["correct"], scores["img_samples"], scores["img_correct"]) == (4, 2, 3, 1)
    assert scores["accuracy"] == pytest.approx(50.0)
    assert scores["img_accuracy"] == pytest.approx(100 / 3)
    assert scores["failed_parses"] == 1  # the missing answer
    assert scores["unanswered"] == 1


def test_unanswered_problem_fails_without_allow_partial(base_dir: Path, result_file: Path) -> None:
    with pytest.raises(ScoringError, match="merge.jsonl: 1 of 4 questions unanswered, e.g. question_id 4"):
        grade_split(base_dir, result_file, "test")


def test_val_split(base_dir: Path, tmp_path: Path) -> None:
    result_file = _write_answers(tmp_path / "val.jsonl", [("5", "A", False)])
    scores = summarize(grade_split(base_dir, result_file, "val"))
    assert (scores["samples"], scores["accuracy"], scores["img_samples"], scores["img_accuracy"]) == (1, 100.0, 0, None)


def test_cli_writes_llava_outputs_and_scores(base_dir: Path, result_file: Path, tmp_path: Path, capsys) -> None:
    out, result, scores = tmp_path / "out.json", tmp_path / "out_result.json", tmp_path / "sub" / "scores.json"
    main(["--base-dir", str(base_dir), "--result-file", str(result_file), "--output-file", str(out),
          "--output-result", str(result), "--split", "test", "--scores-file", str(scores), "--allow-partial"])
    output = capsys.readouterr().out
    assert "Total: 4, Correct: 2, Accuracy: 50.00%, IMG-Accuracy: 33.33%" in output
    assert "Unanswered: 1 of 4 questions" in output
    analyses = json.loads(out.read_text())
    assert [a["question_id"] for a in analyses["correct"]] == ["1", "2"]
    wrong = {a["question_id"]: a for a in analyses["incorrect"]}
    assert wrong["3"]["parsed_ans"] == "C" and wrong["3"]["ground_truth"] == "D" and wrong["3"]["is_multimodal"]
    assert wrong["4"]["parsed_ans"] == FAILED and wrong["4"]["question"] == "Unknown"
    llava_result = json.loads(result.read_text())
    assert (llava_result["acc"], llava_result["correct"], llava_result["count"]) == (50.0, 2, 4)
    assert llava_result["results"] == {"1": 0, "2": 1, "3": 2, "4": -1}
    assert llava_result["outputs"]["2"] == "The answer is B."
    assert json.loads(scores.read_text())["img_accuracy"] == pytest.approx(100 / 3)


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_split_lists_the_splits(base_dir: Path, result_file: Path, capsys) -> None:
    error = _cli_error(capsys, "--base-dir", str(base_dir), "--result-file", str(result_file), "--split", "minitest")
    assert "'minitest'" in error and "['test', 'val']" in error


def test_answers_of_another_split_are_an_error(base_dir: Path, tmp_path: Path) -> None:
    answers = _write_answers(tmp_path / "val.jsonl", [("5", "A", False)])
    with pytest.raises(ScoringError, match="answers no problem of split 'test'"):
        grade_split(base_dir, answers, "test")
    mixed = _write_answers(tmp_path / "mixed.jsonl", [*ANSWERS, ("4", "A", True), ("5", "A", False)])
    with pytest.raises(ScoringError, match="mixed.jsonl, line 5: question_id 5 is not in split 'test'"):
        grade_split(base_dir, mixed, "test")


def test_malformed_inputs_name_the_file(base_dir: Path, result_file: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question_id": "1"}\n')
    with pytest.raises(ScoringError, match="broken.jsonl, line 1: lacks 'text'"):
        grade_split(base_dir, broken, "test")
    (base_dir / "problems.json").write_text("[")
    with pytest.raises(ScoringError, match="problems file .*problems.json"):
        grade_split(base_dir, result_file, "test")


def test_cli_missing_base_dir_exits_2_without_traceback(result_file: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_science_qa", "--base-dir", str(tmp_path / "nowhere"),
         "--result-file", str(result_file)], capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 2
    assert "nowhere" in completed.stderr and "Traceback" not in completed.stderr
