"""scripts/v1_5/eval/mme.sh end to end on the tiny checkpoint: answers, MME scores, summary."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from tests.conftest import run_demo_script

HINT = "\nAnswer the question using a single word or phrase."
# two images of one perception category, two questions each (MME's flat layout: image and .txt side by side)
CASES = [("existence/000000006040.jpg", "Is there a train in this image?", "Yes"),
         ("existence/000000006040.jpg", "Is there a bed in this image?", "No"),
         ("existence/000000018150.jpg", "Is there a bed in this image?", "Yes"),
         ("existence/000000018150.jpg", "Is there a train in this image?", "No")]


def _mme_fixture(root: Path) -> Path:
    """llava_mme.jsonl and MME_Benchmark_release_version/existence/{*.jpg,*.txt} under root/MME."""
    data = root / "MME"
    release = data / "MME_Benchmark_release_version"
    (release / "existence").mkdir(parents=True)
    lines = []
    for shade, (question_id, question, truth) in enumerate(CASES):
        image = release / question_id
        Image.new("RGB", (40, 30 + shade), (30, 60 * shade, 160)).save(image)
        with image.with_suffix(".txt").open("a") as handle:
            handle.write(f"{question} Please answer yes or no.\t{truth}\n")
        lines.append(json.dumps({"question_id": question_id, "image": question_id, "text": question + HINT,
                                 "category": "existence"}))
    (data / "llava_mme.jsonl").write_text("\n".join(lines) + "\n")
    return data


def test_mme_script_scores_and_summarises(tiny_original, tmp_path):
    data = _mme_fixture(tmp_path)
    done = run_demo_script("mme.sh", "full", tiny_original, {
        "EVAL_DIR": str(tmp_path), "QUESTION_FILE": str(data / "llava_mme.jsonl"),
        "IMAGE_FOLDER": str(data / "MME_Benchmark_release_version"),
    })
    assert done.returncode == 0, done.stderr
    assert "Perception" in done.stdout and "existence:" in done.stdout
    summary = json.loads((data / "answers" / f"{tiny_original.name}-full" / "summary.json").read_text())
    assert summary["questions"] == len(CASES)
    existence = summary["scores"]["categories"]["existence"]
    assert existence["questions"] == 4 and existence["images"] == 2
    assert summary["scores"]["cognition"] == 0
