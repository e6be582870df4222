"""LLaVA-NeXT through the benchmark scripts: calibrate thresholds for a NeXT setting (320 total vision
tokens), run the script with them, and find the calibrated figure again in the run's summary."""

from __future__ import annotations

import json

import pytest

from llava.eval.calibrate import main as calibrate_main
from tests.conftest import DEMO_IMAGE_FOLDER, annotations_for, first_questions, run_benchmark_script

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
    summary = json.loads((tmp_path / "eval" / "textvqa" / "answers" / f"{tiny_next_original.name}-{TARGET}"
                          / "summary.json").read_text())
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
