"""LLaVA-NeXT through the benchmark scripts: calibrate thresholds for a NeXT setting (320 total vision
tokens), run the script with them (conversation mode auto, the scripts' default), and find the calibrated
figure again in the run's summary; and the demo's LLaVA-NeXT part (scripts/demo_next.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llava.eval.calibrate import main as calibrate_main
from llava.eval.make_demo_data import NEXT_QUESTION_FILE, make_demo_data
from tests.conftest import (
    DEMO_DIR,
    DEMO_IMAGE_FOLDER,
    REPO_ROOT,
    SCRIPT_TIMEOUT_S,
    annotations_for,
    first_questions,
    run_benchmark_script,
)

QUESTIONS = 3
TARGET = 320


def test_a_calibrated_next_setting_runs_through_a_script(tiny_next_original, tmp_path):
    questions = first_questions(tmp_path, QUESTIONS)
    calibration = tmp_path / "thresholds.json"
    calibrate_main(["--model-path", str(tiny_next_original), "--question-file", str(questions),
                    "--image-folder", str(DEMO_IMAGE_FOLDER), "--targets", str(TARGET),
                    "--num-questions", str(QUESTIONS), "--device", "cpu", "--out", str(calibration)])
    found = json.loads(calibration.read_text())["results"][0]
    assert found["reachable"] and found["num_questions"] == QUESTIONS  # 3 questions: coarse, maybe off by a few
    env = {"EVAL_DIR": str(tmp_path / "eval"), "QUESTION_FILE": str(questions),
           "IMAGE_FOLDER": str(DEMO_IMAGE_FOLDER), "ANNOTATION_FILE": str(annotations_for(questions, tmp_path)),
           f"THR_{TARGET}": f"{found['global_thr']!r} {found['individual_thr']!r}"}
    done = run_benchmark_script("textvqa.sh", str(TARGET), tiny_next_original, env)
    assert done.returncode == 0, done.stderr
    assert f"conversation mode: vicuna_v1 (from {tiny_next_original / 'config.json'})" in done.stdout
    answer_dir = tmp_path / "eval" / "textvqa" / "answers" / f"{tiny_next_original.name}-{TARGET}"
    first_answer = json.loads((answer_dir / "merge.jsonl").read_text().splitlines()[0])
    assert first_answer["metadata"]["run"]["conv_mode"] == "vicuna_v1"  # the resolved mode, not auto
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert (summary["setting"], summary["method"], summary["questions"]) == (str(TARGET), "mustdrop", QUESTIONS)
    # the answers' layer-averaged total is what calibration measured with the same pair
    assert summary["mean_vision_tokens"] == pytest.approx(found["mean_tokens"])
    assert summary["mean_vision_tokens_per_image"] < summary["mean_vision_tokens"] / 2  # 3 or 5 images each


def test_a_next_setting_without_thresholds_names_the_calibration_command(tiny_next_original, tmp_path):
    done = run_benchmark_script("textvqa.sh", "160", tiny_next_original, {"EVAL_DIR": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.startswith("error: no published MustDrop thresholds for LLaVA-NeXT's 160 setting")
    assert f"--model-path {tiny_next_original}" in done.stderr and "THR_160=" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_demos_next_part_answers_an_anyres_question_and_prints_its_figures(tiny_next_original, tmp_path):
    env = {**os.environ, "NEXT_MODEL_PATH": str(tiny_next_original), "PYTHON": sys.executable,
           "ANSWERS_DIR": str(tmp_path), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", "scripts/demo_next.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("conversation mode: vicuna_v1 (from") == 1
    stats = json.loads((tmp_path / f"{tiny_next_original.name}-mustdrop.jsonl").read_text())["metadata"]
    assert (stats["images"], stats["crops"], stats["run"]["method"]) == (3, 2, "mustdrop")  # 500x160: 2 crops
    assert stats["avg_vision_tokens"] < stats["vision_tokens_in"] == 3 * stats["vision_tokens_per_image_in"]
    assert (f"images: 3 (the base image and 2 crops), avg_vision_tokens: {stats['avg_vision_tokens']:.1f} "
            f"(of {stats['vision_tokens_in']}), avg_vision_tokens_per_image: "
            f"{stats['avg_vision_tokens_per_image']:.1f}") in done.stdout


def test_the_demos_next_question_file_is_the_generated_one(tmp_path):
    make_demo_data(tmp_path)
    assert (tmp_path / NEXT_QUESTION_FILE).read_bytes() == (DEMO_DIR / NEXT_QUESTION_FILE).read_bytes()
