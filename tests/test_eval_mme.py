"""MME scoring: GT layouts, MME's yes/no parsing, acc / acc+ / score per category, totals, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.mme import (
    load_ground_truth,
    main,
    parse_prediction,
    score_mme,
)
from llava.eval.scoring.results import ScoringError

REPO_ROOT = Path(__file__).resolve().parent.parent
MME_HINT = " Please answer yes or no."
LLAVA_HINT = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("yes", "yes"),
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, it is", "yes"),
        ("Nope", "no"),  # "nope"[:4] contains "no"
        ("not sure", "no"),  # "not "[:4] contains "no"
        ("none", "no"),
        ("Yes, no", "yes"),  # "yes" is looked for first
        ("The answer is yes", "other"),  # "the " holds neither
        ("I don't know", "other"),
        ("", "other"),
    ],
)
def test_parse_prediction(text: str, label: str) -> None:
    assert parse_prediction(text) == label


# (question_id, question, ground truth, model answer). artwork uses the images/ + questions_answers_YN/
# layout, code_reasoning keeps images and .txt files side by side; each image has two questions.
CASES = [
    ("artwork/images/10002.jpg", "Does this artwork exist in the form of painting?", "Yes", "Yes"),  # right
    ("artwork/images/10002.jpg", "Does this artwork exist in the form of glassware?", "No", "No"),  # right
    ("artwork/images/10049.jpg", "Is this artwork created by botticelli?", "Yes", "yes, it is"),  # right
    ("artwork/images/10049.jpg", "Is this artwork created by monet?", "No", "Yes"),  # wrong: image split
    ("code_reasoning/0020.png", "Is the output of the code 'Hello'?", "Yes", "The answer is yes"),  # other: wrong
    ("code_reasoning/0020.png", "Is the output of the code 'World'?", "No", "Nope"),  # right: image split
    ("code_reasoning/0021.png", "Will the code print 3?", "No", "no"),  # right
    ("code_reasoning/0021.png", "Will the code print 4?", "Yes", "No"),  # wrong: image split
]


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _gt_file(gt_dir: Path, question_id: str) -> Path:
    category, *_, image = question_id.split("/")
    stem = Path(image).stem
    if "/images/" in question_id:
        return gt_dir / category / "questions_answers_YN" / f"{stem}.txt"
    return gt_dir / category / f"{stem}.txt"


@pytest.fixture
def mme_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    gt_dir = tmp_path / "MME_Benchmark_release_version"
    (gt_dir / "artwork" / "images").mkdir(parents=True)
    (gt_dir / "artwork" / "questions_answers_YN").mkdir()
    (gt_dir / "code_reasoning").mkdir()
    questions, answers = [], []
    for question_id, question, truth, answer in CASES:
        with _gt_file(gt_dir, question_id).open("a") as handle:
            handle.write(f"{question}{MME_HINT}\t{truth}\n")
        category = question_id.split("/")[0]
        questions.append({"question_id": question_id, "image": question_id, "text": question + LLAVA_HINT,
                          "category": category})
        answers.append({"question_id": question_id, "prompt": question + LLAVA_HINT, "text": answer,
                        "answer_id": "a", "model_id": "tiny", "metadata": {}})
    question_file = _write_jsonl(tmp_path / "llava_mme.jsonl", questions)
    result_file = _write_jsonl(tmp_path / "merge.jsonl", answers[::-1])  # answers are matched, not zipped
    return question_file, result_file, gt_dir


def test_ground_truth_reads_both_layouts(mme_files) -> None:
    truth = load_ground_truth(mme_files[2])
    assert len(truth) == 8
    assert truth["artwork", "10049", "Is this artwork created by monet?"] == "no"
    assert truth["code_reasoning", "0020", "Is the output of the code 'Hello'?"] == "yes"


def test_score_mme(mme_files) -> None:
    scores = score_mme(*mme_files)
    # artwork: 3 of 4 right -> acc 75; image 10002 all right, 10049 split -> acc+ 1/2 = 50; score 125
    assert scores["categories"]["artwork"] == pytest.approx(
        {"questions": 4, "images": 2, "other": 0, "acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    )
    # code_reasoning: 2 of 4 right ("Nope", "no") -> acc 50; both images split -> acc+ 0; score 50;
    # "The answer is yes" parses as other
    assert scores["categories"]["code_reasoning"] == pytest.approx(
        {"questions": 4, "images": 2, "other": 1, "acc": 50.0, "acc_plus": 0.0, "score": 50.0}
    )
    # artwork is a perception category, code_reasoning a cognition one
    assert scores["perception"] == pytest.approx(125.0)
    assert scores["cognition"] == pytest.approx(50.0)
    assert scores["total"] == pytest.approx(175.0)


def test_double_space_before_mme_hint_still_matches(mme_files) -> None:
    question_file, result_file, gt_dir = mme_files
    gt = gt_dir / "code_reasoning" / "0021.txt"
    gt.write_text(gt.read_text().replace(MME_HINT, "  Please answer yes or no."))
    assert score_mme(question_file, result_file, gt_dir)["cognition"] == pytest.approx(50.0)


def test_missing_answers_name_question_ids(mme_files, tmp_path: Path) -> None:
    question_file, result_file, gt_dir = mme_files
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(result_file.read_text().splitlines()[:6]) + "\n")
    with pytest.raises(ScoringError, match="2 of 8 questions unanswered, e.g. question_id and question "
                                           "\\('artwork/images/10002.jpg'"):
        score_mme(question_file, partial, gt_dir)
    # allowed: the two unanswered (both of image 10002, which was all right) count wrong -> artwork acc 1/4
    # (monet wrong, botticelli right), acc+ 0 of 2 images
    artwork = score_mme(question_file, partial, gt_dir, allow_partial=True)["categories"]["artwork"]
    assert (artwork["questions"], artwork["acc"], artwork["acc_plus"]) == (4, 25.0, 0.0)


def test_question_without_ground_truth_is_an_error(mme_files) -> None:
    question_file, result_file, gt_dir = mme_files
    (gt_dir / "code_reasoning" / "0021.txt").unlink()
    with pytest.raises(ScoringError, match="no ground truth .* 'code_reasoning', image '0021'"):
        score_mme(question_file, result_file, gt_dir)


def test_malformed_ground_truth_line_names_file(mme_files) -> None:
    question_file, result_file, gt_dir = mme_files
    (gt_dir / "code_reasoning" / "0021.txt").write_text("Will the code print 3? Maybe\n")
    with pytest.raises(ScoringError, match="0021.txt line 1: expected 'question<TAB>Yes\\|No'"):
        score_mme(question_file, result_file, gt_dir)


def test_unknown_category_is_an_error(tmp_path: Path, mme_files) -> None:
    _, _, gt_dir = mme_files
    record = {"question_id": "weather/1.png", "text": "Is it sunny?", "prompt": "Is it sunny?"}
    questions = _write_jsonl(tmp_path / "q.jsonl", [record])
    results = _write_jsonl(tmp_path / "r.jsonl", [{**record, "text": "yes"}])
    with pytest.raises(ScoringError, match="unknown MME category 'weather'"):
        score_mme(questions, results, gt_dir)


def test_cli_writes_scores_file(mme_files, tmp_path: Path, capsys) -> None:
    question_file, result_file, gt_dir = mme_files
    scores = tmp_path / "scores.json"
    main(["--question-file", str(question_file), "--result-file", str(result_file), "--gt-dir", str(gt_dir),
          "--scores-file", str(scores)])
    output = capsys.readouterr().out
    assert "artwork: 125.00" in output and "total score: 50.00" in output
    assert json.loads(scores.read_text())["total"] == pytest.approx(175.0)


def test_cli_missing_gt_dir_exits_2_without_traceback(mme_files, tmp_path: Path) -> None:
    question_file, result_file, _ = mme_files
    completed = subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_mme", "--question-file", str(question_file),
         "--result-file", str(result_file), "--gt-dir", str(tmp_path / "nope")],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 2
    assert "nope" in completed.stderr and "Traceback" not in completed.stderr
