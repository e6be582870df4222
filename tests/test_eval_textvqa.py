"""TextVQA scoring (normaliser, VQA accuracy, CLI) and the bundled demo data set."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from llava.eval.make_demo_data import (
    ANNOTATION_FILE,
    IMAGE_DIR,
    QUESTION_FILE,
    make_demo_data,
)
from llava.eval.scoring.results import ScoringError
from llava.eval.scoring.textvqa import (
    annotation_key,
    load_annotations,
    main,
    question_from_prompt,
    score_textvqa,
)
from llava.eval.scoring.vqa_accuracy import (
    TextVQAAccuracyEvaluator,
    normalize_answer,
    vqa_answer_score,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "playground" / "data" / "eval" / "demo"
SUFFIX = "Answer the question using a single word or phrase."
DEMO_IMAGE_BYTES_LIMIT = 20_000
DEMO_QUESTIONS = 12


def _answers(matching: int, answer: str = "yes", other: str = "no") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize(
    ("matches", "expected"),
    [
        # 4 matches: every 9-answer subset still holds >= 3 matches -> (10 * 1) / 10
        (4, 1.0),
        # 3 matches: dropping a match leaves 2 (2/3), dropping another leaves 3 (1) -> (3*2/3 + 7*1) / 10
        (3, 0.9),
        # 2 matches: (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10
        (2, 0.6),
        # 1 match: (1 * 0 + 9 * 1/3) / 10
        (1, 0.3),
        # no match
        (0, 0.0),
        # 10 matches: (10 * 1) / 10
        (10, 1.0),
    ],
)
def test_leave_one_out_accuracy(matches: int, expected: float) -> None:
    assert vqa_answer_score("yes", _answers(matches)) == pytest.approx(expected)


def test_prediction_is_normalised_before_matching() -> None:
    # "Two." -> "2" and "two" -> "2": 2 matches -> 0.6 (see above)
    assert vqa_answer_score("Two.", _answers(2, answer="two", other="three")) == pytest.approx(0.6)


def test_dataset_accuracy_is_the_mean_over_questions() -> None:
    predictions = [
        {"pred_answer": "yes", "gt_answers": _answers(4)},  # 1.0
        {"pred_answer": "yes", "gt_answers": _answers(2)},  # 0.6
        {"pred_answer": "yes", "gt_answers": _answers(1)},  # 0.3
    ]
    # (1.0 + 0.6 + 0.3) / 3
    assert TextVQAAccuracyEvaluator().eval_pred_list(predictions) == pytest.approx(1.9 / 3)


def test_evaluator_rejects_empty_list_and_wrong_answer_count() -> None:
    evaluator = TextVQAAccuracyEvaluator()
    with pytest.raises(ValueError, match="empty"):
        evaluator.eval_pred_list([])
    with pytest.raises(ValueError, match="expected 10 human answers, got 9"):
        evaluator.eval_pred_list([{"pred_answer": "yes", "gt_answers": ["yes"] * 9}])


# ---------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("TEN", "10"),
        # "-" touches no space -> becomes a space; trailing period dropped; article dropped
        ("the coca-cola.", "coca cola"),
        # "-" touches a space somewhere -> every "-" is deleted
        ("yes - no", "yes no"),
        ("dont", "don't"),
        ("youre", "you're"),
        ("whats", "what's"),
        # commas go first, so thousands separators vanish
        ("1,000", "1000"),
        ("2.5", "2.5"),
        ("2.5.", "2.5"),
        ("a cat", "cat"),
        ("An apple", "apple"),
        ("Is it?", "is it"),
        ("  hello\tworld\n", "hello world"),
        # possessive 's is split off, as in the reference tokenizer
        ("John's", "john 's"),
        ("(left)", "left"),
        ("EXIT!", "exit"),
    ],
)
def test_normalize_answer(raw: str, normalised: str) -> None:
    assert normalize_answer(raw) == normalised


# ---------------------------------------------------------------- prompt parsing


@pytest.mark.parametrize(
    ("prompt", "question"),
    [
        (f"What Brand is this?\nReference OCR token: Nikon, D300\n{SUFFIX}", "what brand is this?"),
        (f"Reference OCR token: Nikon, D300\nWhat brand is this?\n{SUFFIX}", "what brand is this?"),
        (f"What brand is this?\n{SUFFIX}", "what brand is this?"),
        ("OCR tokens: Nikon D300 Question: What brand is this? Short answer:", "what brand is this?"),
    ],
)
def test_question_from_prompt(prompt: str, question: str) -> None:
    assert question_from_prompt(prompt) == question


@pytest.mark.parametrize(
    "prompt",
    ["just one line", "a\nb\nc\nd", "OCR tokens: x y z but no question marker"],
)
def test_question_from_prompt_rejects_unknown_layouts(prompt: str) -> None:
    with pytest.raises(ScoringError):
        question_from_prompt(prompt)


# ---------------------------------------------------------------- CLI and files


def _write_annotations(path: Path, entries: list[tuple[str, str, list[str]]]) -> Path:
    data = [
        {"question": question, "image_id": image_id, "question_id": index, "answers": answers, "set_name": "val"}
        for index, (image_id, question, answers) in enumerate(entries)
    ]
    path.write_text(json.dumps({"dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data}))
    return path


def _write_results(path: Path, results: list[tuple[str, str, str]]) -> Path:
    lines = [
        json.dumps(
            {
                "question_id": image_id,
                "prompt": f"{question}\nReference OCR token: a, b\n{SUFFIX}",
                "text": text,
                "answer_id": f"answer{index}",
                "model_id": "tiny",
                "metadata": {},
            }
        )
        for index, (image_id, question, text) in enumerate(results)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def annotation_file(tmp_path: Path) -> Path:
    return _write_annotations(
        tmp_path / "annotations.json",
        [
            ("img0", "What is it?", _answers(4)),
            ("img1", "What is it?", _answers(2)),
            ("img1", "Which color?", _answers(1, answer="red", other="blue")),
        ],
    )


@pytest.fixture
def result_file(tmp_path: Path) -> Path:
    # scores 1.0, 0.6 and 0.3 (see test_leave_one_out_accuracy); the question case differs on purpose
    return _write_results(
        tmp_path / "answers.jsonl",
        [("img0", "what is it?", "Yes"), ("img1", "WHAT IS IT?", "yes."), ("img1", "Which color?", "Red")],
    )


def test_score_textvqa(annotation_file: Path, result_file: Path) -> None:
    scores = score_textvqa(load_annotations(annotation_file), result_file)
    assert scores["samples"] == 3
    # 100 * (1.0 + 0.6 + 0.3) / 3 = 63.33...
    assert scores["accuracy"] == pytest.approx(100 * 1.9 / 3)


def test_cli_prints_samples_and_accuracy(annotation_file: Path, result_file: Path, capsys) -> None:
    main(["--annotation-file", str(annotation_file), "--result-file", str(result_file)])
    output = capsys.readouterr().out
    assert "Samples: 3" in output
    assert "Accuracy: 63.33%" in output


def test_cli_result_dir_scores_every_jsonl(annotation_file: Path, tmp_path: Path, capsys) -> None:
    result_dir = tmp_path / "answers"
    result_dir.mkdir()
    _write_results(result_dir / "a.jsonl", [("img0", "what is it?", "yes")])  # 1.0
    _write_results(result_dir / "b.jsonl", [("img1", "what is it?", "no")])  # 8 matches -> 1.0
    _write_results(result_dir / "c.jsonl", [("img1", "which color?", "green")])  # 0 matches
    (result_dir / "notes.txt").write_text("not scored")
    main(["--annotation-file", str(annotation_file), "--result-dir", str(result_dir), "--allow-partial"])
    output = capsys.readouterr().out
    assert output.count("Samples: 1") == 3  # accuracy is over the answered questions, as in LLaVA
    assert output.count("Accuracy: 100.00%") == 2
    assert "Accuracy: 0.00%" in output
    assert output.count("Unanswered: 2 of 3 questions") == 3
    assert "notes" not in output


def test_unanswered_annotations_fail_without_allow_partial(annotation_file: Path, tmp_path: Path, capsys) -> None:
    results = _write_results(tmp_path / "one.jsonl", [("img0", "what is it?", "yes")])
    error = _cli_error(capsys, "--annotation-file", str(annotation_file), "--result-file", str(results))
    assert "2 of 3 questions unanswered" in error and "--allow-partial" in error


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llava.eval.eval_textvqa", *args], capture_output=True, text=True, cwd=REPO_ROOT
    )


def test_cli_missing_file_exits_2_without_traceback(result_file: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    completed = _run_cli("--annotation-file", str(missing), "--result-file", str(result_file))
    assert completed.returncode == 2
    assert "nope.json" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_a_question_the_annotations_ask_twice_takes_two_answers_and_no_more(tmp_path: Path, capsys) -> None:
    """TextVQA may ask the same question twice about one image; LLaVA's question file then asks it twice."""
    annotations = _write_annotations(tmp_path / "annotations.json", [
        ("img0", "What is it?", _answers(4)),  # asked twice: both answers are graded against the last entry
        ("img0", "What is it?", _answers(1)),
        ("img1", "Which color?", _answers(2, answer="red", other="blue")),
    ])
    two = _write_results(tmp_path / "two.jsonl", [("img0", "What is it?", "yes"), ("img1", "Which color?", "red"),
                                                  ("img0", "What is it?", "no")])
    # yes vs the last entry (1 match): 0.3; red (2 matches): 0.6; no (9 matches): 1.0 -> mean 0.6333
    assert score_textvqa(load_annotations(annotations), two) == {"samples": 3, "accuracy": pytest.approx(100 * 1.9 / 3)}
    three = _write_results(tmp_path / "three.jsonl", [("img0", "What is it?", "yes"), ("img1", "Which color?", "red"),
                                                      ("img0", "What is it?", "no"), ("img0", "What is it?", "no")])
    error = _cli_error(capsys, "--annotation-file", str(annotations), "--result-file", str(three))
    assert "('img0', 'what is it?') is answered 3 times, on lines 1, 3 and 4, but the annotation file asks it twice" in error


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_missing_result_file(annotation_file: Path, tmp_path: Path, capsys) -> None:
    error = _cli_error(capsys, "--annotation-file", str(annotation_file), "--result-file", str(tmp_path / "x.jsonl"))
    assert "result file not found" in error and "x.jsonl" in error


def test_cli_needs_a_result_file_or_dir(annotation_file: Path, capsys) -> None:
    assert "--result-file" in _cli_error(capsys, "--annotation-file", str(annotation_file))


def test_unmatched_question_names_image_question_and_line(annotation_file: Path, tmp_path: Path, capsys) -> None:
    answers = [("img0", "what is it?", "yes"), ("img9", "what is it?", "yes")]
    results = _write_results(tmp_path / "answers.jsonl", answers)
    error = _cli_error(capsys, "--annotation-file", str(annotation_file), "--result-file", str(results))
    assert "line 2" in error
    assert "('img9', 'what is it?') is not in the annotation file" in error


def test_unknown_prompt_layout_names_line_and_prompt(annotation_file: Path, tmp_path: Path) -> None:
    results = tmp_path / "answers.jsonl"
    results.write_text(json.dumps({"question_id": "img0", "prompt": "what is it?", "text": "yes"}) + "\n")
    with pytest.raises(ScoringError, match="line 1: prompt 'what is it\\?' is not in a known TextVQA layout"):
        score_textvqa(load_annotations(annotation_file), results)


def test_annotation_with_nine_answers_is_an_error(tmp_path: Path) -> None:
    annotations = _write_annotations(tmp_path / "nine.json", [("img0", "what is it?", ["yes"] * 9)])
    results = _write_results(tmp_path / "answers.jsonl", [("img0", "what is it?", "yes")])
    with pytest.raises(ScoringError, match="needs 10 answers"):
        score_textvqa(load_annotations(annotations), results)


def test_malformed_inputs_are_clear_errors(tmp_path: Path, annotation_file: Path) -> None:
    not_textvqa = tmp_path / "list.json"
    not_textvqa.write_text("[1, 2]")
    with pytest.raises(ScoringError, match="'data' list"):
        load_annotations(not_textvqa)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ScoringError, match="holds no answers"):
        score_textvqa(load_annotations(annotation_file), empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ScoringError, match="broken.jsonl, line 1: not valid JSON"):
        score_textvqa(load_annotations(annotation_file), broken)


# ---------------------------------------------------------------- bundled demo data


def _demo_questions() -> list[dict]:
    lines = (DEMO_DIR / QUESTION_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_demo_questions_match_annotations_one_to_one() -> None:
    questions = _demo_questions()
    annotations = json.loads((DEMO_DIR / ANNOTATION_FILE).read_text())["data"]
    assert len(questions) == len(annotations) == DEMO_QUESTIONS
    index = load_annotations(DEMO_DIR / ANNOTATION_FILE)
    assert len(index) == len(annotations), "annotation keys must be unique"
    keys = [annotation_key(q["question_id"], question_from_prompt(q["text"])) for q in questions]
    assert sorted(keys) == sorted(index)
    assert all(len(entry["answers"]) == 10 for entry in annotations)


def test_demo_images_exist_open_and_match_annotated_sizes() -> None:
    sizes = {entry["image_id"]: (entry["image_width"], entry["image_height"]) for entry in
             json.loads((DEMO_DIR / ANNOTATION_FILE).read_text())["data"]}
    aspect_ratios = set()
    for question in _demo_questions():
        path = DEMO_DIR / IMAGE_DIR / question["image"]
        assert path.stat().st_size < DEMO_IMAGE_BYTES_LIMIT
        with Image.open(path) as image:
            image.load()
            assert image.size == sizes[question["question_id"]]
            aspect_ratios.add(round(image.width / image.height, 2))
    assert any(ratio > 1 for ratio in aspect_ratios) and any(ratio < 1 for ratio in aspect_ratios)


@pytest.mark.parametrize(
    ("rank", "expected"),
    [
        # the majority answer: its variants fill 9 of 10 answers -> (9*1 + 1*1) / 10 = 1.0 -> 100%
        (0, 100.0),
        # the odd answer occurs once -> (1*0 + 9*1/3) / 10 = 0.3 -> 30%
        (-1, 30.0),
    ],
)
def test_demo_scores_are_non_trivial(rank: int, expected: float, tmp_path: Path) -> None:
    answers = {entry["image_id"]: entry["answers"] for entry in
               json.loads((DEMO_DIR / ANNOTATION_FILE).read_text())["data"]}
    results = tmp_path / "answers.jsonl"
    with results.open("w") as handle:
        for question in _demo_questions():
            counts = Counter(normalize_answer(answer) for answer in answers[question["question_id"]])
            assert sorted(counts.values()) == [1, 9]
            prediction = counts.most_common()[rank][0]
            handle.write(json.dumps({"question_id": question["question_id"], "prompt": question["text"],
                                     "text": prediction}) + "\n")
    assert score_textvqa(load_annotations(DEMO_DIR / ANNOTATION_FILE), results)["accuracy"] == pytest.approx(expected)


def test_demo_generator_is_deterministic(tmp_path: Path) -> None:
    make_demo_data(tmp_path)
    for name in (QUESTION_FILE, ANNOTATION_FILE):
        assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / IMAGE_DIR).iterdir()) == sorted(
        p.name for p in (DEMO_DIR / IMAGE_DIR).iterdir()
    )


def test_demo_generator_falls_back_to_bitmap_font_without_freetype(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("llava.eval.make_demo_data.features.check_module", lambda module: False)
    make_demo_data(tmp_path)
    images = sorted((tmp_path / IMAGE_DIR).iterdir())
    assert len(images) == DEMO_QUESTIONS
    with Image.open(images[0]) as image:
        assert len(image.convert("RGB").getcolors()) > 1  # text drawn on the flat background
