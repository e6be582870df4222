"""scripts/v1_5/eval/vizwiz.sh end to end on the tiny checkpoint: answers, upload file, summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import run_demo_script

PROMPT = ("What is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
          "Answer the question using a single word or phrase.")
QUESTIONS = 3


def _vizwiz_fixture(root: Path) -> Path:
    """llava_test.jsonl and test/ images in LLaVA's VizWiz layout; returns the data folder."""
    data = root / "vizwiz"
    (data / "test").mkdir(parents=True)
    lines = []
    for index in range(QUESTIONS):
        image = f"VizWiz_test_{index:08d}.jpg"
        Image.new("RGB", (40 + 8 * index, 30), (60 * index, 90, 200)).save(data / "test" / image)
        lines.append(json.dumps({"question_id": index, "image": image, "text": PROMPT, "category": "default"}))
    (data / "llava_test.jsonl").write_text("\n".join(lines) + "\n")
    return data


def test_vizwiz_script_writes_upload_and_summary(tiny_original, tmp_path):
    data = _vizwiz_fixture(tmp_path)
    done = run_demo_script("vizwiz.sh", "64", tiny_original, {
        "EVAL_DIR": str(tmp_path), "QUESTION_FILE": str(data / "llava_test.jsonl"), "IMAGE_FOLDER": str(data / "test"),
    })
    assert done.returncode == 0, done.stderr
    upload = json.loads((data / "answers_upload" / f"{tiny_original.name}-64.json").read_text())
    assert [entry["image"] for entry in upload] == [f"VizWiz_test_{i:08d}.jpg" for i in range(QUESTIONS)]
    assert all(isinstance(entry["answer"], str) and entry["answer"] for entry in upload)
    summary = json.loads((data / "answers" / f"{tiny_original.name}-64" / "summary.json").read_text())
    assert summary["questions"] == QUESTIONS
    assert summary["scores"]["answers"] == QUESTIONS
