"""The SEED-Bench, VQAv2 and MM-Vet scripts run end to end on the tiny checkpoint (3 questions each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import REPO_ROOT

QUESTIONS_PER_BENCHMARK = 3
IMAGE_SIZES = [(64, 48), (40, 72), (56, 56)]  # landscape, portrait, square
COLOURS = ["red", "green", "blue"]
SEED_SUFFIX = "Answer with the option's letter from the given choices directly."
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def write_images(folder: Path, names: list[str]) -> None:
    for name, size, colour in zip(names, IMAGE_SIZES, COLOURS):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, colour).save(folder / name)


def run_script(script: str, setting: str, model: Path, eval_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL_PATH": str(model), "PYTHON": sys.executable, "EVAL_DIR": str(eval_dir),
           "EXTRA_ARGS": "--max_new_tokens 2 --device cpu", "CUDA_VISIBLE_DEVICES": ""}
    for name in ("QUESTION_FILE", "IMAGE_FOLDER", "ANNOTATION_FILE", "SPLIT"):
        env.pop(name, None)  # the scripts' default layout under EVAL_DIR is what is tested
    return subprocess.run(["bash", f"scripts/v1_5/eval/{script}", setting], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def answer_dir(eval_dir: Path, benchmark: str, model: Path, setting: str) -> Path:
    return eval_dir / benchmark / "answers" / f"{model.name}-{setting}"


def make_seed(data: Path) -> None:
    """LLaVA's seed_bench layout: question file, SEED-Bench.json (with a video question) and images."""
    names = [f"SEED-Bench-image/{index}.png" for index in range(QUESTIONS_PER_BENCHMARK)]
    write_images(data, names)
    write_jsonl(data / "llava-seed-bench.jsonl", [
        {"question_id": str(100 + index), "image": name, "category": "Scene Understanding",
         "text": f"What colour is it?\nA. red\nB. green\nC. blue\nD. black\n{SEED_SUFFIX}"}
        for index, name in enumerate(names)
    ])
    questions = [{"question_id": str(100 + index), "question_type_id": 1, "answer": "ABC"[index],
                  "data_type": "image"} for index in range(QUESTIONS_PER_BENCHMARK)]
    questions.append({"question_id": "900", "question_type_id": 2, "answer": "A", "data_type": "video"})
    (data / "SEED-Bench.json").write_text(json.dumps(
        {"questions": questions, "question_type": {"Scene Understanding": 1, "Action Recognition": 2}}))


def test_seed_script(tiny_original: Path, tmp_path: Path) -> None:
    make_seed(tmp_path / "seed_bench")
    done = run_script("seed.sh", "64", tiny_original, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Scene Understanding:" in done.stdout and "image accuracy:" in done.stdout
    upload = tmp_path / "seed_bench" / "answers_upload" / f"{tiny_original.name}-64.jsonl"
    assert [json.loads(line)["question_id"] for line in upload.read_text().splitlines()] == ["100", "101", "102"]
    summary = json.loads((answer_dir(tmp_path, "seed_bench", tiny_original, "64") / "summary.json").read_text())
    assert summary["scores"]["samples"] == QUESTIONS_PER_BENCHMARK and summary["method"] == "mustdrop"


def make_vqav2(data: Path) -> list[int]:
    """The test-dev question file, and the test split it belongs to with one more question."""
    names = [f"COCO_test2015_{index:012d}.png" for index in range(QUESTIONS_PER_BENCHMARK)]
    write_images(data / "test2015", names)
    test_dev = [{"question_id": 262144000 + index, "image": name, "category": "default",
                 "text": f"What colour is the picture?\n{SHORT_ANSWER_SUFFIX}"} for index, name in enumerate(names)]
    write_jsonl(data / "llava_vqav2_mscoco_test-dev2015.jsonl", test_dev)
    test = [*test_dev, {**test_dev[0], "question_id": 393225000}]
    write_jsonl(data / "llava_vqav2_mscoco_test2015.jsonl", test)
    return [record["question_id"] for record in test]


def test_vqav2_script(tiny_original: Path, tmp_path: Path) -> None:
    test_ids = make_vqav2(tmp_path / "vqav2")
    done = run_script("vqav2.sh", "full", tiny_original, tmp_path)
    assert done.returncode == 0, done.stderr
    upload_dir = tmp_path / "vqav2" / "answers_upload" / "llava_vqav2_mscoco_test-dev2015"
    upload = json.loads((upload_dir / f"{tiny_original.name}-full.json").read_text())
    assert [entry["question_id"] for entry in upload] == test_ids
    assert upload[-1]["answer"] == ""  # outside test-dev
    summary = json.loads((answer_dir(tmp_path, "vqav2", tiny_original, "full") / "summary.json").read_text())
    assert summary["scores"] == {"answered": QUESTIONS_PER_BENCHMARK, "total": QUESTIONS_PER_BENCHMARK + 1}


def make_mmvet(data: Path) -> None:
    names = [f"v1_{index}.png" for index in range(QUESTIONS_PER_BENCHMARK)]
    write_images(data / "images", names)
    write_jsonl(data / "llava-mm-vet.jsonl", [
        {"question_id": index, "image": name, "text": "Describe the colour of this image."}
        for index, name in enumerate(names)
    ])


def test_mmvet_script(tiny_original: Path, tmp_path: Path) -> None:
    make_mmvet(tmp_path / "mm-vet")
    done = run_script("mmvet.sh", "full", tiny_original, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "not scored locally" in done.stdout
    results = json.loads((tmp_path / "mm-vet" / "results" / f"{tiny_original.name}-full.json").read_text())
    assert list(results) == ["v1_0", "v1_1", "v1_2"]
    assert all(isinstance(text, str) for text in results.values())
    summary = json.loads((answer_dir(tmp_path, "mm-vet", tiny_original, "full") / "summary.json").read_text())
    assert summary["questions"] == QUESTIONS_PER_BENCHMARK and summary["scores"] == {}
