"""scripts/v1_5/eval/pope.sh end to end on the tiny checkpoint: answers, per-category scores, summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import run_demo_script

HINT = "\nAnswer the question using a single word or phrase."
# (category, image, object, label)
CASES = [("adversarial", "COCO_val2014_000000310196.jpg", "snowboard", "yes"),
         ("adversarial", "COCO_val2014_000000310196.jpg", "dining table", "no"),
         ("random", "COCO_val2014_000000429109.jpg", "person", "yes"),
         ("random", "COCO_val2014_000000429109.jpg", "giraffe", "no")]


def _pope_fixture(root: Path) -> Path:
    """llava_pope_test.jsonl, val2014/ images and coco/coco_pope_<category>.json in LLaVA's POPE layout."""
    data = root / "pope"
    (data / "val2014").mkdir(parents=True)
    (data / "coco").mkdir()
    questions, labels = [], {}
    for question_id, (category, image, thing, label) in enumerate(CASES, start=1):
        Image.new("RGB", (36, 28), (question_id * 50, 120, 30)).save(data / "val2014" / image)
        text = f"Is there a {thing} in the image?"
        questions.append(json.dumps({"question_id": question_id, "image": image, "text": text + HINT,
                                     "category": category}))
        per_file = labels.setdefault(category, [])
        per_file.append(json.dumps({"question_id": len(per_file) + 1, "image": image, "text": text, "label": label}))
    (data / "llava_pope_test.jsonl").write_text("\n".join(questions) + "\n")
    for category, lines in labels.items():
        (data / "coco" / f"coco_pope_{category}.json").write_text("\n".join(lines) + "\n")
    return data


def test_pope_script_scores_and_summarises(tiny_original, tmp_path):
    data = _pope_fixture(tmp_path)
    done = run_demo_script("pope.sh", "64", tiny_original, {
        "EVAL_DIR": str(tmp_path), "QUESTION_FILE": str(data / "llava_pope_test.jsonl"),
        "IMAGE_FOLDER": str(data / "val2014"),
    })
    assert done.returncode == 0, done.stderr
    assert "Category: adversarial, # samples: 2" in done.stdout and "Mean F1:" in done.stdout
    summary = json.loads((data / "answers" / f"{tiny_original.name}-64" / "summary.json").read_text())
    assert summary["questions"] == len(CASES)
    assert set(summary["scores"]["categories"]) == {"adversarial", "random"}
