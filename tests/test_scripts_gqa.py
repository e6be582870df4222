"""scripts/v1_5/eval/gqa.sh end to end on the tiny checkpoint: answers, predictions, scores, summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import run_demo_script

HINT = "\nAnswer the question using a single word or phrase."
QUESTIONS = {"201307251": ("n161313", "Is it a dog?", "yes", "verify"),
             "201640614": ("n235859", "Which side is the cup on?", "left", "query"),
             "202225914": ("n235859", "What color is the wall?", "white", "query")}


def _gqa_fixture(root: Path) -> Path:
    """llava_gqa_testdev_balanced.jsonl, data/images and data/testdev_balanced_questions.json."""
    data = root / "gqa"
    (data / "data" / "images").mkdir(parents=True)
    lines, balanced = [], {}
    for shade, (question_id, (image_id, question, answer, structural)) in enumerate(QUESTIONS.items()):
        Image.new("RGB", (48, 32 + 8 * shade), (200, 40 * shade, 90)).save(data / "data" / "images" / f"{image_id}.jpg")
        lines.append(json.dumps({"question_id": question_id, "image": f"{image_id}.jpg", "text": question + HINT}))
        balanced[question_id] = {"imageId": image_id, "question": question, "answer": answer, "isBalanced": True,
                                 "types": {"structural": structural, "semantic": "attr", "detailed": "d"}}
    (data / "llava_gqa_testdev_balanced.jsonl").write_text("\n".join(lines) + "\n")
    (data / "data" / "testdev_balanced_questions.json").write_text(json.dumps(balanced))
    return data


def test_gqa_script_scores_and_summarises(tiny_original, tmp_path):
    data = _gqa_fixture(tmp_path)
    # the default paths are the ones LLaVA's layout uses under EVAL_DIR/gqa
    done = run_demo_script("gqa.sh", "full", tiny_original, {
        "EVAL_DIR": str(tmp_path), "QUESTION_FILE": str(data / "llava_gqa_testdev_balanced.jsonl"),
        "IMAGE_FOLDER": str(data / "data" / "images"),
    })
    assert done.returncode == 0, done.stderr
    assert "Questions: 3" in done.stdout and "Accuracy:" in done.stdout
    answer_dir = data / "answers" / f"{tiny_original.name}-full"
    predictions = json.loads((answer_dir / "testdev_balanced_predictions.json").read_text())
    assert [entry["questionId"] for entry in predictions] == list(QUESTIONS)
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert summary["questions"] == 3
    assert summary["scores"]["questions"] == 3 and 0 <= summary["scores"]["accuracy"] <= 100


def test_gqa_script_runs_tome_at_a_budget(tiny_original, tmp_path):
    """METHOD=tome bash gqa.sh 64: the setting becomes tome's budget, reached exactly."""
    data = _gqa_fixture(tmp_path)
    done = run_demo_script("gqa.sh", "64", tiny_original, {
        "EVAL_DIR": str(tmp_path), "QUESTION_FILE": str(data / "llava_gqa_testdev_balanced.jsonl"),
        "IMAGE_FOLDER": str(data / "data" / "images"), "METHOD": "tome",
    })
    assert done.returncode == 0, done.stderr
    summary = json.loads((data / "answers" / f"{tiny_original.name}-tome-64" / "summary.json").read_text())
    assert (summary["method"], summary["family"], summary["setting"], summary["questions"]) == ("tome", "encoder", "64", 3)
    assert "--budget 64" in summary["drop_flags"] and summary["mean_vision_tokens"] == 64


def test_the_default_setting_needs_a_method(tmp_path):
    done = run_demo_script("gqa.sh", "default", tmp_path, {})
    assert done.returncode == 2 and "the setting 'default' runs METHOD with its own defaults" in done.stderr
