"""Every scorer and converter refuses answer files that would inflate or silently shrink a score.

Each of the ten CLIs gets the same six-question fixture treatment: a complete answers file passes; a
duplicated answer, a null or non-string answer text, a broken JSON line and an answer to a question
the benchmark does not ask are each refused with one `error:` line naming the file and line, and
nothing is written; an unanswered question fails unless --allow-partial, which reports it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from llava.eval import (
    convert_mmvet_for_eval,
    convert_seed_for_submission,
    convert_vizwiz_for_submission,
    convert_vqav2_for_submission,
    eval_gqa,
    eval_mmbench,
    eval_mme,
    eval_pope,
    eval_science_qa,
    eval_textvqa,
)
from llava.eval.make_demo_data import ANNOTATION_FILE, QUESTION_FILE
from tests.conftest import DEMO_DIR, REPO_ROOT
from tests.conftest import write_tsv

QUESTIONS = 6
BROKEN_LINE = 6
SENTINEL = "scores of an earlier run\n"
SHORT_ANSWER = "Answer the question using a single word or phrase."
MME_HINT = " Please answer yes or no."
VQAV2_SPLIT = "llava_vqav2_mscoco_test-dev2015"


@dataclass
class Case:
    """One CLI with a six-question benchmark on disk and a complete answers file for it."""

    main: Callable[[list[str]], None]
    answers: list[dict[str, Any]]
    argv: Callable[[Path, Path], list[str]]  # (result file, scores file) -> command line
    outputs: list[Path] = field(default_factory=list)  # files besides the scores that a run writes
    writes_scores: bool = True
    unknown_id: Any = 999999
    partial_line: str = f"Unanswered: 1 of {QUESTIONS} questions"


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def textvqa(tmp: Path) -> Case:
    """Three images with two questions each: LLaVA's question_id is the image id, so ids repeat."""
    questions = [(f"img{index // 2}", ("What is it?", "Which color?")[index % 2]) for index in range(QUESTIONS)]
    annotations = tmp / "TextVQA_0.5.1_val.json"
    annotations.write_text(json.dumps({"data": [
        {"image_id": image, "question": question, "question_id": index, "answers": ["yes"] * 10}
        for index, (image, question) in enumerate(questions)]}))
    answers = [{"question_id": image, "prompt": f"{question}\nReference OCR token: a, b\n{SHORT_ANSWER}", "text": "yes"}
               for image, question in questions]
    return Case(eval_textvqa.main, answers,
                lambda result, scores: ["--annotation-file", str(annotations), "--result-file", str(result),
                                        "--scores-file", str(scores)], unknown_id="img9")


def vizwiz(tmp: Path) -> Case:
    questions = write_jsonl(tmp / "llava_test.jsonl", [
        {"question_id": index, "image": f"VizWiz_test_{index:08d}.jpg", "text": "q"} for index in range(QUESTIONS)])
    upload = tmp / "answers_upload" / "tiny.json"
    return Case(convert_vizwiz_for_submission.main,
                [{"question_id": index, "prompt": "q", "text": "yes"} for index in range(QUESTIONS)],
                lambda result, scores: ["--annotation-file", str(questions), "--result-file", str(result),
                                        "--result-upload-file", str(upload), "--scores-file", str(scores)], [upload])


def gqa(tmp: Path) -> Case:
    ids = [str(201307251 + index) for index in range(QUESTIONS)]
    questions = tmp / "testdev_balanced_questions.json"
    questions.write_text(json.dumps({qid: {"answer": "yes", "isBalanced": True,
                                           "types": {"structural": "verify", "semantic": "attr"}} for qid in ids}))
    predictions = tmp / "testdev_balanced_predictions.json"
    return Case(eval_gqa.main, [{"question_id": qid, "prompt": "q", "text": "Yes."} for qid in ids],
                lambda result, scores: ["--questions", str(questions), "--result-file", str(result),
                                        "--predictions", str(predictions), "--scores-file", str(scores)],
                [predictions])


def pope(tmp: Path) -> Case:
    """Two categories of three questions; label files pair with the questions in order."""
    annotation_dir = tmp / "coco"
    questions, labels = [], {}
    for index in range(1, QUESTIONS + 1):
        category, image = ("adversarial", "random")[index % 2], f"COCO_val2014_{index:012d}.jpg"
        questions.append({"question_id": index, "image": image, "text": "Is there a dog?", "category": category})
        labels.setdefault(category, []).append({"image": image, "label": "yes"})
    for category, lines in labels.items():
        write_jsonl(annotation_dir / f"coco_pope_{category}.json", lines)
    question_file = write_jsonl(tmp / "llava_pope_test.jsonl", questions)
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes"} for q in questions]
    return Case(eval_pope.main, answers,
                lambda result, scores: ["--annotation-dir", str(annotation_dir), "--question-file", str(question_file),
                                        "--result-file", str(result), "--scores-file", str(scores)])


def mme(tmp: Path) -> Case:
    """Three images with two questions each: MME's question_id (the image) repeats, the question does not."""
    gt_dir = tmp / "MME_Benchmark_release_version"
    (gt_dir / "existence").mkdir(parents=True)
    questions = []
    for index in range(QUESTIONS):
        image = f"existence/{index // 2:012d}.jpg"
        question = ("Is there a dog in this image?", "Is there a cat in this image?")[index % 2]
        with (gt_dir / image).with_suffix(".txt").open("a") as handle:
            handle.write(f"{question}{MME_HINT}\tYes\n")
        questions.append({"question_id": image, "text": f"{question}\n{SHORT_ANSWER}"})
    question_file = write_jsonl(tmp / "llava_mme.jsonl", questions)
    answers = [{"question_id": q["question_id"], "prompt": q["text"], "text": "Yes"} for q in questions]
    return Case(eval_mme.main, answers,
                lambda result, scores: ["--question-file", str(question_file), "--result-file", str(result),
                                        "--gt-dir", str(gt_dir), "--scores-file", str(scores)],
                unknown_id="existence/999.jpg")


def science_qa(tmp: Path) -> Case:
    pids = [str(index) for index in range(1, QUESTIONS + 1)]
    (tmp / "problems.json").write_text(json.dumps({pid: {"choices": ["cat", "dog"], "answer": 0, "image": None}
                                                   for pid in pids}))
    (tmp / "pid_splits.json").write_text(json.dumps({"test": pids}))
    outputs = [tmp / "out" / "output.json", tmp / "out" / "result.json"]
    return Case(eval_science_qa.main, [{"question_id": pid, "prompt": "Q", "text": "A"} for pid in pids],
                lambda result, scores: ["--base-dir", str(tmp), "--result-file", str(result), "--output-file",
                                        str(outputs[0]), "--output-result", str(outputs[1]), "--scores-file",
                                        str(scores)], outputs, unknown_id="99")


def mmbench(tmp: Path) -> Case:
    rows = [{"index": str(index), "question": f"Is {index} even?", "hint": "", "A": "yes", "B": "no", "C": "",
             "D": "", "answer": "AB"[index % 2], "category": "math", "l2-category": "reasoning"}
            for index in range(QUESTIONS)]
    tsv = write_tsv(tmp / "mmbench_dev_20230712.tsv", rows)
    upload = tmp / "answers_upload" / "tiny.xlsx"
    return Case(eval_mmbench.main,
                [{"question_id": index, "round_id": 0, "prompt": "p", "text": "A"} for index in range(QUESTIONS)],
                lambda result, scores: ["--question-file", str(tsv), "--result-file", str(result), "--upload-file",
                                        str(upload), "--scores-file", str(scores)], [upload],
                partial_line="(5 rounds answered, 1 unanswered)")


def seed(tmp: Path) -> Case:
    ids = [str(101669 + index) for index in range(QUESTIONS)]
    annotations = tmp / "SEED-Bench.json"
    annotations.write_text(json.dumps({"question_type": {"Scene Understanding": 1}, "questions": [
        {"question_id": qid, "question_type_id": 1, "answer": "A", "data_type": "image"} for qid in ids]}))
    upload = tmp / "answers_upload" / "tiny.jsonl"
    return Case(convert_seed_for_submission.main, [{"question_id": qid, "prompt": "q", "text": "A"} for qid in ids],
                lambda result, scores: ["--annotation-file", str(annotations), "--result-file", str(result),
                                        "--result-upload-file", str(upload), "--scores-file", str(scores)], [upload])


def vqav2(tmp: Path) -> Case:
    """The test-dev split file with six questions, inside a test split with one more."""
    ids = [262144000 + index for index in range(QUESTIONS)]
    write_jsonl(tmp / f"{VQAV2_SPLIT}.jsonl", [{"question_id": qid, "text": "q"} for qid in ids])
    write_jsonl(tmp / "llava_vqav2_mscoco_test2015.jsonl", [{"question_id": qid, "text": "q"} for qid in [*ids, 1]])
    upload = tmp / "answers_upload" / VQAV2_SPLIT / "tiny.json"
    return Case(convert_vqav2_for_submission.main, [{"question_id": qid, "prompt": "q", "text": "two"} for qid in ids],
                lambda result, scores: ["--dir", str(tmp), "--split", VQAV2_SPLIT, "--ckpt", "tiny", "--result-file",
                                        str(result), "--scores-file", str(scores)], [upload])


def mmvet(tmp: Path) -> Case:
    questions = write_jsonl(tmp / "llava-mm-vet.jsonl", [{"question_id": i, "text": "q"} for i in range(QUESTIONS)])
    results = tmp / "results" / "tiny.json"
    return Case(convert_mmvet_for_eval.main,
                [{"question_id": index, "prompt": "q", "text": "a cat"} for index in range(QUESTIONS)],
                lambda result, scores: ["--src", str(result), "--dst", str(results), "--question-file", str(questions)],
                [results], writes_scores=False)


CASES = [textvqa, vizwiz, gqa, pope, mme, science_qa, mmbench, seed, vqav2, mmvet]


@pytest.fixture(params=CASES, ids=lambda make: make.__name__)
def case(request, tmp_path: Path) -> Case:
    return request.param(tmp_path)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return tmp_path / "answers" / "merge.jsonl", tmp_path / "answers" / "scores.json"


def refusal(case: Case, capsys, result: Path, scores: Path) -> str:
    """Run a CLI that must refuse its input: its one `error:` line; nothing may have been written."""
    scores.write_text(SENTINEL)
    with pytest.raises(SystemExit) as exit_info:
        case.main(case.argv(result, scores))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    errors = err.splitlines()
    assert len(errors) == 1 and "error:" in errors[0], err  # one line: no usage text, no traceback
    assert scores.read_text() == SENTINEL
    assert not [path for path in case.outputs if path.exists()]
    return errors[0]


def test_complete_answers_are_scored(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    case.main(case.argv(write_jsonl(result, case.answers), scores))
    assert all(path.exists() for path in case.outputs)
    assert "Unanswered" not in capsys.readouterr().out
    if case.writes_scores:
        assert "unanswered" not in json.loads(scores.read_text()) or case.main is eval_mmbench.main


def test_duplicate_answer_is_refused(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    error = refusal(case, capsys, write_jsonl(result, [*case.answers, case.answers[0]]), scores)
    assert f"answered twice, on lines 1 and {QUESTIONS + 1}" in error and str(result) in error


@pytest.mark.parametrize(("text", "spelled"), [(None, "null"), (3, "a number"), (["yes"], "a list"),
                                                ({"text": "yes"}, "an object")])
def test_non_string_text_is_refused_naming_the_line(case: Case, files: tuple[Path, Path], capsys, text: Any,
                                                     spelled: str) -> None:
    result, scores = files
    answers = [dict(answer) for answer in case.answers]
    answers[2]["text"] = text
    error = refusal(case, capsys, write_jsonl(result, answers), scores)
    assert f"{result}, line 3: 'text' must be a string, got {spelled}" in error


@pytest.mark.parametrize("question_id", [None, True, 1.5, ["1"]])
def test_bad_question_id_is_refused(case: Case, files: tuple[Path, Path], capsys, question_id: Any) -> None:
    result, scores = files
    answers = [dict(answer) for answer in case.answers]
    answers[1]["question_id"] = question_id
    error = refusal(case, capsys, write_jsonl(result, answers), scores)
    assert f"{result}, line 2: question_id must be a string or an integer" in error


def test_broken_json_line_is_named(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    lines = [json.dumps(answer) for answer in case.answers]
    lines[BROKEN_LINE - 1] = lines[BROKEN_LINE - 1][:-1]  # cut the closing brace
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text("\n".join(lines) + "\n")
    error = refusal(case, capsys, result, scores)
    assert f"{result}, line {BROKEN_LINE}" in error and "not valid JSON" in error


@pytest.mark.parametrize(("line", "message"), [("[1, 2]", "expected a JSON object, got a list"),
                                               ('{"question_id": 1, "prompt": "p"}', "lacks 'text'")])
def test_malformed_line_is_named(case: Case, files: tuple[Path, Path], capsys, line: str, message: str) -> None:
    result, scores = files
    write_jsonl(result, case.answers[:3])
    result.write_text(result.read_text() + line + "\n")
    assert f"{result}, line 4: {message}" in refusal(case, capsys, result, scores)


def test_answer_to_an_unknown_question_is_refused(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    answers = [*case.answers, {**case.answers[0], "question_id": case.unknown_id}]
    error = refusal(case, capsys, write_jsonl(result, answers), scores)
    assert f"{result}, line {QUESTIONS + 1}:" in error and "is not in" in error


def test_unanswered_question_fails_unless_allowed(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    write_jsonl(result, case.answers[:-1])
    error = refusal(case, capsys, result, scores)
    assert f"1 of {QUESTIONS} questions unanswered" in error and "--allow-partial" in error
    case.main([*case.argv(result, scores), "--allow-partial"])
    assert case.partial_line in capsys.readouterr().out
    if case.writes_scores:
        assert json.loads(scores.read_text())["unanswered"] == 1


def test_empty_answers_file_is_refused(case: Case, files: tuple[Path, Path], capsys) -> None:
    result, scores = files
    write_jsonl(result, [])
    assert f"{result} holds no answers" in refusal(case, capsys, result, scores)


# ---------------------------------------------------------------- what a question is, per benchmark


def test_demo_answer_repeated_twelve_times_is_refused(tmp_path: Path, capsys) -> None:
    """The issue's case: one right answer repeated 12 times used to score 100 % on the demo set."""
    first = json.loads((DEMO_DIR / QUESTION_FILE).read_text().splitlines()[0])
    annotation = json.loads((DEMO_DIR / ANNOTATION_FILE).read_text())["data"][0]
    answer = {"question_id": first["question_id"], "prompt": first["text"], "text": annotation["answers"][0]}
    result = write_jsonl(tmp_path / "answers.jsonl", [answer] * 12)
    with pytest.raises(SystemExit):
        eval_textvqa.main(["--annotation-file", str(DEMO_DIR / ANNOTATION_FILE), "--result-file", str(result)])
    assert "is answered twice, on lines 1 and 2" in capsys.readouterr().err


def test_textvqa_question_case_does_not_make_a_new_question(tmp_path: Path, capsys) -> None:
    made = textvqa(tmp_path)
    again = {**made.answers[0], "prompt": made.answers[0]["prompt"].upper().replace("REFERENCE OCR TOKEN",
                                                                                     "Reference OCR token")}
    result, scores = tmp_path / "merge.jsonl", tmp_path / "scores.json"
    error = refusal(made, capsys, write_jsonl(result, [*made.answers, again]), scores)
    assert "image id and question ('img0', 'what is it?') is answered twice" in error


def test_mme_hint_spacing_does_not_make_a_new_question(tmp_path: Path, capsys) -> None:
    made = mme(tmp_path)
    again = {**made.answers[0], "prompt": made.answers[0]["prompt"].replace("\n", "  ")}
    result, scores = tmp_path / "merge.jsonl", tmp_path / "scores.json"
    error = refusal(made, capsys, write_jsonl(result, [*made.answers, again]), scores)
    assert "question_id and question ('existence/000000000000.jpg', 'Is there a dog in this image?')" in error


def test_mmbench_rounds_are_questions_of_their_own(tmp_path: Path, capsys) -> None:
    made = mmbench(tmp_path)
    rounds = [{**answer, "round_id": round_id} for answer in made.answers for round_id in (0, 1)]
    result, scores = tmp_path / "merge.jsonl", tmp_path / "scores.json"
    made.main(made.argv(write_jsonl(result, rounds), scores))
    assert json.loads(scores.read_text())["rounds"] == 2 * QUESTIONS
    made.outputs[0].unlink()
    error = refusal(made, capsys, write_jsonl(result, [*rounds, rounds[1]]), scores)
    assert "question_id and round_id ('0', 1) is answered twice, on lines 2 and 13" in error


def test_gqa_predictions_file_is_checked_too(tmp_path: Path, capsys) -> None:
    made = gqa(tmp_path)
    questions = made.argv(tmp_path / "unused", tmp_path / "unused")[1]
    predictions = tmp_path / "predictions.json"

    def error_for(entries: list) -> str:
        predictions.write_text(json.dumps(entries))
        with pytest.raises(SystemExit):
            eval_gqa.main(["--questions", questions, "--predictions", str(predictions)])
        return capsys.readouterr().err

    entries = [{"questionId": answer["question_id"], "prediction": "yes"} for answer in made.answers]
    assert "questionId 201307251 is predicted twice, in entries 1 and 7" in error_for([*entries, entries[0]])
    assert "entry 2: 'prediction' must be a string, got null" in error_for(
        [entries[0], {**entries[1], "prediction": None}, *entries[2:]])
    assert "5 of 6 questions unanswered" in error_for(entries[:1])


@pytest.mark.parametrize(("module", "argv"), [
    ("llava.eval.eval_textvqa", textvqa),
    ("llava.eval.convert_vqav2_for_submission", vqav2),
])
def test_cli_prints_one_line_and_no_traceback(tmp_path: Path, module: str, argv: Callable[[Path], Case]) -> None:
    made = argv(tmp_path)
    result = write_jsonl(tmp_path / "merge.jsonl", [*made.answers[:2], {**made.answers[2], "text": None}])
    done = subprocess.run([sys.executable, "-m", module, *made.argv(result, tmp_path / "scores.json")],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 2
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and "error:" in errors[0], done.stderr
    assert "merge.jsonl, line 3: 'text' must be a string, got null" in errors[0]
    assert not (tmp_path / "scores.json").exists()
