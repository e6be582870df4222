"""POPE scoring: LLaVA's yes/no reading of answers, per-category metrics, means, errors, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llava.eval.scoring.pope import answer_is_yes, main, score_pope
from llava.eval.scoring.results import ScoringError

REPO_ROOT = Path(__file__).resolve().parent.parent
HINT = "\nAnswer the question using a single word or phrase."


@pytest.mark.parametrize(
    ("text", "is_yes"),
    [
        ("Yes", True),
        ("Yes.", True),
        ("No", False),
        ("No, there is not.", False),
        ("no", False),
        ("There is no dog in the image.", False),
        ("not sure", False),
        ("Yes. There is no cat though.", True),  # only the first sentence counts
        ("Yes\nno", True),  # nor does a second line
        ("Nothing", True),  # "no" must be a whole word
        ("Not sure", True),  # LLaVA's words are "No", "no", "not": capitalised "Not" is not one
        ("NO", True),  # ... nor is "NO"
        ("", True),
    ],
)
def test_answer_is_yes(text: str, is_yes: bool) -> None:
    assert answer_is_yes(text) is is_yes


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


# (category, image, object, label, model answer); question ids in llava_pope_test.jsonl run over all
# categories, those in coco_pope_<category>.json restart at 1 per file.
CASES = [
    ("adversarial", "COCO_val2014_000000310196.jpg", "snowboard", "yes", "Yes"),  # TP
    ("adversarial", "COCO_val2014_000000310196.jpg", "dining table", "no", "Yes."),  # FP
    ("adversarial", "COCO_val2014_000000210789.jpg", "car", "yes", "No, there is not."),  # FN
    ("adversarial", "COCO_val2014_000000210789.jpg", "dog", "no", "There is no dog"),  # TN
    ("random", "COCO_val2014_000000429109.jpg", "person", "yes", "Yes"),  # TP
    ("random", "COCO_val2014_000000429109.jpg", "giraffe", "no", "not sure"),  # TN
]


@pytest.fixture
def pope_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    annotation_dir = tmp_path / "coco"
    annotation_dir.mkdir()
    questions, answers, labels = [], [], {}
    for question_id, (category, image, thing, label, answer) in enumerate(CASES, start=1):
        text = f"Is there a {thing} in the image?"
        per_file = labels.setdefault(category, [])
        per_file.append({"question_id": len(per_file) + 1, "image": image, "text": text, "label": label})
        questions.append({"question_id": question_id, "image": image, "text": text + HINT, "category": category})
        answers.append({"question_id": question_id, "prompt": text + HINT, "text": answer, "answer_id": "a",
                        "model_id": "tiny", "metadata": {}})
    for category, lines in labels.items():
        _write_jsonl(annotation_dir / f"coco_pope_{category}.json", lines)
    question_file = _write_jsonl(tmp_path / "llava_pope_test.jsonl", questions)
    result_file = _write_jsonl(tmp_path / "merge.jsonl", answers[::-1])  # order of answers does not matter
    return annotation_dir, question_file, result_file


def test_score_pope(pope_files) -> None:
    scores = score_pope(*pope_files)
    # adversarial: TP 1, FP 1, FN 1, TN 1 -> acc 2/4, precision 1/2, recall 1/2, F1 1/2, yes-ratio 2/4
    assert scores["categories"]["adversarial"] == pytest.approx(
        {"samples": 4, "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0}
    )
    # random: TP 1, TN 1 -> acc 1, precision 1, recall 1, F1 1, yes-ratio 1/2
    assert scores["categories"]["random"] == pytest.approx(
        {"samples": 2, "accuracy": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0, "yes_ratio": 50.0}
    )
    assert list(scores["categories"]) == ["adversarial", "random"]  # question-file order
    assert scores["mean_f1"] == pytest.approx(75.0)  # (50 + 100) / 2
    assert scores["mean_accuracy"] == pytest.approx(75.0)


def test_all_no_answers_give_zero_precision_not_a_crash(pope_files, tmp_path: Path) -> None:
    annotation_dir, question_file, _ = pope_files
    all_no = _write_jsonl(tmp_path / "no.jsonl", [{"question_id": i, "text": "No"} for i in range(1, 7)])
    adversarial = score_pope(annotation_dir, question_file, all_no)["categories"]["adversarial"]
    # TN 2, FN 2: accuracy 2/4, no "yes" predicted -> precision, recall, F1, yes-ratio all 0
    assert adversarial == pytest.approx(
        {"samples": 4, "accuracy": 50.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    )


def test_missing_answers_name_question_ids(pope_files, tmp_path: Path) -> None:
    annotation_dir, question_file, _ = pope_files
    partial = _write_jsonl(tmp_path / "partial.jsonl", [{"question_id": 1, "text": "Yes"}])
    expected = "partial.jsonl: 5 of 6 questions unanswered, e.g. question_id 2, 3, 4, 5, 6"
    with pytest.raises(ScoringError, match=expected):
        score_pope(annotation_dir, question_file, partial)
    # allowed: metrics over the one answered question (adversarial, label yes, answered yes: TP)
    scores = score_pope(annotation_dir, question_file, partial, allow_partial=True)
    assert list(scores["categories"]) == ["adversarial"] and scores["unanswered"] == 5
    assert scores["categories"]["adversarial"]["samples"] == 1 and scores["mean_accuracy"] == pytest.approx(100.0)


def test_misaligned_annotations_are_an_error(pope_files) -> None:
    annotation_dir, question_file, result_file = pope_files
    label_file = annotation_dir / "coco_pope_random.json"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(lines[:1]) + "\n")
    with pytest.raises(ScoringError, match="coco_pope_random.json has 1 labels but the question file 2"):
        score_pope(annotation_dir, question_file, result_file)
    label_file.write_text("\n".join(lines[:1] + [lines[0].replace("429109", "000001")]) + "\n")
    with pytest.raises(ScoringError, match="question_id 6 shows 'COCO_val2014_000000429109.jpg'"):
        score_pope(annotation_dir, question_file, result_file)


def test_cli_writes_scores_file(pope_files, tmp_path: Path, capsys) -> None:
    annotation_dir, question_file, result_file = pope_files
    scores = tmp_path / "scores.json"
    main(["--annotation-dir", str(annotation_dir), "--question-file", str(question_file),
          "--result-file", str(result_file), "--scores-file", str(scores)])
    output = capsys.readouterr().out
    assert "Category: adversarial, # samples: 4" in output and "Mean F1: 75.00" in output
    assert json.loads(scores.read_text())["mean_accuracy"] == pytest.approx(75.0)


def test_cli_missing_annotation_file_exits_2_without_traceback(pope_files, tmp_path: Path) -> None:
    _, question_file, result_file = pope_files
    completed = subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_pope", "--annotation-dir", str(tmp_path / "elsewhere"),
         "--question-file", str(question_file), "--result-file", str(result_file)],
        capture_output=True, text=True, cwd=REPO_ROOT,
    )
    assert completed.returncode == 2
    assert "coco_pope_adversarial.json" in completed.stderr and "Traceback" not in completed.stderr
