"""Threshold calibration on the tiny checkpoint: monotone counts, reached targets, honest bounds, CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from llava.eval.calibrate import (
    HIGHEST_GLOBAL_THR,
    LOWEST_GLOBAL_THR,
    Probe,
    bisect_path,
    calibrate,
    main,
    mean_tokens,
    path_point,
    prepare_prompts,
    sample_questions,
)
from llava.drop.methods import DropConfig
from llava.eval.answering.vqa import questions_from_file
from tests.conftest import DEMO_DIR

QUESTION_FILE = DEMO_DIR / "llava_textvqa_demo.jsonl"
IMAGE_FOLDER = DEMO_DIR / "images"
NUM_QUESTIONS = 3
TEST_STEPS = 10
UNREACHABLE_TARGET = 1000  # more than the 576 patches CLIP-336 gives


@pytest.fixture(scope="module")
def questions():
    args = argparse.Namespace(question_file=str(QUESTION_FILE), image_folder=str(IMAGE_FOLDER))
    return questions_from_file(args)[:NUM_QUESTIONS]


@pytest.fixture(scope="module")
def prompts(loaded_original, questions):
    tokenizer, model, image_processor, _ = loaded_original
    return prepare_prompts(model, tokenizer, image_processor, questions, "vicuna_v1", DropConfig())


@pytest.fixture(scope="module")
def bounds(loaded_original, prompts) -> tuple[float, float]:
    """(fewest, most) mean tokens at the two ends of the ratio-1 path."""
    model = loaded_original[1]
    return (mean_tokens(model, prompts, HIGHEST_GLOBAL_THR, HIGHEST_GLOBAL_THR),
            mean_tokens(model, prompts, LOWEST_GLOBAL_THR, LOWEST_GLOBAL_THR))


def run_calibrate(loaded, questions, targets, **kwargs):
    tokenizer, model, image_processor, _ = loaded
    return calibrate(model, tokenizer, image_processor, questions, targets, steps=TEST_STEPS, **kwargs)


def test_mean_tokens_does_not_rise_with_the_thresholds(loaded_original, prompts):
    grid = [1e-6, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 1.0]
    counts = [mean_tokens(loaded_original[1], prompts, thr, thr) for thr in grid]
    assert all(later <= earlier for earlier, later in zip(counts, counts[1:]))
    assert counts[-1] < counts[0] <= sum(p.vision_count for p in prompts) / len(prompts)


def test_target_between_the_bounds_is_reached(loaded_original, questions, prompts, bounds):
    fewest, most = bounds
    target = (fewest + most) / 2
    [result] = run_calibrate(loaded_original, questions, [target])
    assert result.reachable and result.within_tolerance
    assert abs(result.mean_tokens - target) <= 1.0
    assert result.individual_thr == result.global_thr  # ratio 1
    assert (result.fewest_tokens, result.most_tokens) == pytest.approx(bounds)
    # The reported pair is the one measured: rerunning it gives the same count.
    assert mean_tokens(loaded_original[1], prompts, result.global_thr, result.individual_thr) == result.mean_tokens


@pytest.mark.parametrize("target,end", [(UNREACHABLE_TARGET, "most"), (1, "fewest")])
def test_unreachable_target_reports_the_bound(loaded_original, questions, bounds, target, end):
    [result] = run_calibrate(loaded_original, questions, [target])
    assert not result.reachable and not result.within_tolerance
    expected = bounds[1] if end == "most" else bounds[0]
    assert result.mean_tokens == pytest.approx(expected)
    if end == "most":
        assert result.questions_below_target == NUM_QUESTIONS  # stage 1 alone is below 1000 everywhere


def test_bisection_ends_and_keeps_the_closest_on_a_non_monotone_path():
    probes = []

    def measure(log_global_thr: float) -> Probe:
        probes.append(Probe(math.exp(log_global_thr), 0.0, 50.0 + 100.0 * math.sin(5 * log_global_thr) ** 2))
        return probes[-1]

    ends = (Probe(LOWEST_GLOBAL_THR, 0.0, 300.0), Probe(HIGHEST_GLOBAL_THR, 0.0, 40.0))
    best = bisect_path(measure, target=120.0, tolerance=0.0, steps=7, ends=ends)
    assert len(probes) == 7
    assert best == min([*ends, *probes], key=lambda p: abs(p.tokens - 120.0))


def test_path_keeps_thresholds_within_range():
    assert path_point(math.log(HIGHEST_GLOBAL_THR), ratio=2.0) == (1.0, 1.0)
    assert path_point(math.log(0.0123456), ratio=0.5) == (0.0123, 0.00615)


def test_seeded_sample_is_reproducible(questions):
    """The seed alone decides the sample: Python's global random state does not, and other seeds differ."""
    assert sample_questions(questions, 2, seed=None) == questions[:2]
    import random

    random.seed(1)
    first = sample_questions(questions, 2, seed=7)
    random.seed(2)
    assert sample_questions(questions, 2, seed=7) == first
    assert len(first) == 2 and all(question in questions for question in first)
    assert any(sample_questions(questions, 2, seed=seed) != first for seed in range(8, 12))


def cli_args(model_path, *extra: str) -> list[str]:
    return ["--model-path", str(model_path), "--question-file", str(QUESTION_FILE), "--image-folder", str(IMAGE_FOLDER),
            "--num-questions", str(NUM_QUESTIONS), "--device", "cpu", "--dtype", "fp32", *extra]


def test_cli_writes_thresholds(tiny_original, tmp_path, capsys):
    out = tmp_path / "thresholds.json"
    main(cli_args(tiny_original, "--targets", f"192,{UNREACHABLE_TARGET}", "--steps", str(TEST_STEPS),
                  "--out", str(out)))
    printed = capsys.readouterr().out
    assert "| target | global_thr |" in printed
    payload = json.loads(out.read_text())
    assert [r["target"] for r in payload["results"]] == [192, UNREACHABLE_TARGET]
    reached, unreachable = payload["results"]
    assert reached["reachable"] and not unreachable["reachable"]
    line = f'THR_192="{reached["global_thr"]:g} {reached["individual_thr"]:g}"'
    assert line in printed.splitlines() and payload["common_sh"][0] == line
    assert payload["common_sh"][1].startswith("# ")


@pytest.mark.parametrize("flag,value,message", [
    ("--targets", "192,abc", "--targets must be comma-separated positive whole token counts, got '192,abc'"),
    ("--targets", "0", "--targets must be comma-separated positive whole token counts"),
    ("--ratio", "0", r"ratio must be > 0"),
    ("--num-questions", "0", "--num-questions must be >= 1"),
])
def test_bad_flags_fail_before_loading_the_model(tmp_path, flag, value, message):
    with pytest.raises(SystemExit, match=message):
        main(cli_args(tmp_path / "not-a-model", flag, value))
