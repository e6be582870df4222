"""Bad input and faults against the answering CLI: one clear line, a non-zero exit, no traceback, and no
file changed or lost. Every case that can be refused before the model loads is checked to be."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava.eval.answering.loop as question_loop
from llava.eval.answering.answers_file import locked_answers_file
from llava.eval.model_vqa_loader import main
from tests.conftest import DEMO_QUESTION_FILE as QUESTION_FILE
from tests.conftest import REPO_ROOT, cli_refusal
from tests.conftest import cli_args as demo_cli_args


def cli_args(model: Path, questions: Path, answers: Path, *extra: str) -> list[str]:
    return demo_cli_args(model, questions, answers, *extra, max_new_tokens=2)


def write_questions(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def demo_lines(count: int) -> list[str]:
    return QUESTION_FILE.read_text().splitlines()[:count]


def run_subprocess(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llava.eval.model_vqa_loader", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def refusal(args: list[str]) -> str:
    """model_vqa_loader run in-process: its one-line error."""
    return cli_refusal(main, args)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading weights."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the input could be refused before")

    monkeypatch.setattr(question_loop, "load_pretrained_model", forbidden)


@pytest.fixture(scope="module")
def answered(tiny_original, tmp_path_factory) -> tuple[Path, Path]:
    """Two questions answered with MustDrop at published thresholds: (question file, answers file)."""
    folder = tmp_path_factory.mktemp("answered")
    questions = write_questions(folder / "q.jsonl", demo_lines(3))
    answers = folder / "a.jsonl"
    partial = write_questions(folder / "q2.jsonl", demo_lines(2))
    main(cli_args(tiny_original, partial, answers, "--sparse", "--global_thr", "0.001", "--individual_thr", "0.001"))
    return questions, answers


# --- 2. an answers file cannot be corrupted by two runs ------------------------------------------------

def test_second_run_on_a_locked_answers_file_stops_at_once(tiny_original, tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text("")
    questions = write_questions(tmp_path / "q.jsonl", demo_lines(2))
    with locked_answers_file(answers):
        completed = run_subprocess(cli_args(tiny_original, questions, answers))
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert f"is being written by another run (pid {os.getpid()}" in completed.stderr
    assert answers.read_text() == ""
    assert not answers.with_name("a.jsonl.lock").exists()  # released and removed with the holder


def test_a_lock_left_by_a_dead_process_is_taken_over(tiny_original, tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.with_name("a.jsonl.lock").write_text("999999999\n")  # no such process holds it
    main(cli_args(tiny_original, write_questions(tmp_path / "q.jsonl", demo_lines(1)), answers))
    assert len(answers.read_text().splitlines()) == 1
    assert not answers.with_name("a.jsonl.lock").exists()


# --- 3. a resumed run cannot mix settings ----------------------------------------------------------------

@pytest.mark.parametrize("extra,field", [
    (["--method", "fastv", "--budget", "64"], "method='mustdrop'"),
    (["--sparse", "--global_thr", "0.011", "--individual_thr", "0.001"], "method_options.global_thr=0.001"),
    (["--sparse", "--global_thr", "0.001", "--individual_thr", "0.001", "--conv-mode", "plain"], "conv_mode='vicuna_v1'"),
    (["--sparse", "--global_thr", "0.001", "--individual_thr", "0.001", "--max_new_tokens", "7"], "max_new_tokens=2"),
    (["--sparse", "--global_thr", "0.001", "--individual_thr", "0.001", "--temperature", "0.5"], "temperature=0.0"),
])
def test_resume_with_other_settings_is_refused(answered, tiny_original, no_model_load, extra, field):
    questions, answers = answered
    before = answers.read_bytes()
    message = refusal(cli_args(tiny_original, questions, answers, *extra))
    assert f"line 1 was answered with {field}" in message
    assert answers.read_bytes() == before


def test_resume_of_a_file_without_recorded_settings_is_refused(tiny_original, tmp_path, no_model_load):
    first = json.loads(demo_lines(1)[0])
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": first["question_id"], "text": "x", "metadata": {}}) + "\n")
    before = answers.read_bytes()
    message = refusal(cli_args(tiny_original, write_questions(tmp_path / "q.jsonl", demo_lines(2)), answers))
    assert "line 1 does not record the settings" in message
    assert answers.read_bytes() == before


def test_resume_with_the_same_settings_continues(answered, tiny_original):
    questions, answers = answered
    main(cli_args(tiny_original, questions, answers, "--sparse", "--global_thr", "0.001", "--individual_thr", "0.001"))
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [json.loads(line)["question_id"] for line in demo_lines(3)]
    assert len({json.dumps(r["metadata"]["run"], sort_keys=True) for r in records}) == 1


# --- 4. bad input: one clear line, before the model loads -------------------------------------------------

@pytest.mark.parametrize("lines,expected", [
    ([demo_lines(1)[0], "[1, 2]"], r"q.jsonl, line 2: expected a JSON object, got list"),
    ([demo_lines(1)[0], '{"question_id": "x", "image": "a.png"}'], r"q.jsonl, line 2: lacks 'text'"),
    (['{"question_id": "x", "text": 5}'], r"q.jsonl, line 1: 'text' must be str, got int 5"),
    (['{"question_id": ["x"], "text": "hi"}'], r"q.jsonl, line 1: 'question_id' must be str or int, got list"),
    (['{"question_id": true, "text": "hi"}'], r"q.jsonl, line 1: 'question_id' must be str or int, got bool"),
    (['{"question_id": "x", "text": "hi", "image": 3}'], r"q.jsonl, line 1: 'image' must be str, got int"),
    (["", demo_lines(1)[0], '{"question_id": "x", "text": "hi"'], r"q.jsonl, line 3: not valid JSON \(Expecting ',' delimiter: column 34\)"),
    ([], r"q.jsonl holds no questions"),
    (["", "  "], r"q.jsonl holds no questions"),
])
def test_bad_question_files(tiny_original, tmp_path, no_model_load, lines, expected):
    questions = write_questions(tmp_path / "q.jsonl", lines)
    answers = tmp_path / "out" / "a.jsonl"
    assert pytest.raises(SystemExit, main, cli_args(tiny_original, questions, answers)).match(expected)
    assert not (tmp_path / "out").exists()  # no empty answers folder left behind


def test_answers_path_that_is_a_directory(tiny_original, tmp_path, no_model_load):
    (tmp_path / "answers").mkdir()
    message = refusal(cli_args(tiny_original, QUESTION_FILE, tmp_path / "answers"))
    assert "is a directory" in message
    assert list((tmp_path / "answers").iterdir()) == []


def test_broken_answers_line_is_reported_by_its_own_line_number(tiny_original, tmp_path, no_model_load):
    lines = [json.dumps({"question_id": json.loads(q)["question_id"], "text": "x"}) for q in demo_lines(8)]
    lines[5] = lines[5][:-3]  # line 6 broken in the middle of the file (not a half-written last line)
    answers = write_questions(tmp_path / "a.jsonl", lines)
    before = answers.read_bytes()
    message = refusal(cli_args(tiny_original, QUESTION_FILE, answers))
    assert "a.jsonl, line 6: not valid JSON (Unterminated string starting at: column 45)" in message
    assert answers.read_bytes() == before


@pytest.mark.parametrize("extra,expected", [
    (["--sparse", "--drop_layers", "2,40"], r"dropping after layer 40 \(0-based\) is impossible in a model with 32"),
    (["--method", "fastv", "--method-args", "drop_after=39"], r"dropping after layer 39"),
    (["--method", "fastv", "--method-args", "k=40"], r"dropping after layer 39"),  # the paper's K, an alias
    (["--method", "fastv", "--budget", "20"], r"budget 20.0 is below 36"),
    (["--method", "pdrop", "--budget", "30"], r"budget 30.0 is below 36"),
    (["--method", "sparsevlm", "--budget", "10"], r"budget 10 is below 57.0"),
    (["--method", "sparsevlm", "--budget", "1"], r"budget 1 is below 57.0"),
    (["--sparse", "--no_merge", "--budget", "64"], r"budget 64 is below 96.6.*without --no_merge"),
    (["--method", "visionzip", "--budget", "600"], r"budget 600 exceeds the 576 vision tokens"),
])
def test_settings_the_model_cannot_honour(tiny_original, tmp_path, no_model_load, extra, expected):
    answers = tmp_path / "a.jsonl"
    message = refusal(cli_args(tiny_original, QUESTION_FILE, answers, *extra))
    assert re.search(expected, message), message
    assert not answers.exists()


@pytest.mark.parametrize("layout,weights_format", [("original", "safetensors"), ("original", "bin"), ("hf", "safetensors")])
def test_truncated_weight_shard(tmp_path, layout, weights_format):
    from llava.model.tiny import write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "model", layout=layout, weights_format=weights_format)
    shard = max((p for p in model.iterdir() if p.suffix in (".safetensors", ".bin")), key=lambda p: p.name)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    answers = tmp_path / "a.jsonl"
    completed = run_subprocess(cli_args(model, write_questions(tmp_path / "q.jsonl", demo_lines(1)), answers))
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert f"cannot read weight file {shard}" in completed.stderr and "truncated or corrupt" in completed.stderr
    assert not answers.exists()


@pytest.mark.parametrize("batch_size", ["1", "2"])
def test_prompt_longer_than_the_context_stops_and_keeps_earlier_answers(tiny_original, tmp_path, batch_size):
    """In a batch too: the batch fails, its questions are answered one by one up to the one at fault."""
    long_question = {"question_id": "long", "image": json.loads(demo_lines(1)[0])["image"],
                     "text": " ".join(["word"] * 3000)}
    questions = write_questions(tmp_path / "q.jsonl", demo_lines(1) + [json.dumps(long_question)])
    answers = tmp_path / "a.jsonl"
    message = refusal(cli_args(tiny_original, questions, answers, "--batch-size", batch_size))
    assert "question 'long' (question 2 of the question file)" in message
    assert "but the model's context holds 2048" in message and "the 1 answers before it are kept" in message
    assert len(answers.read_text().splitlines()) == 1


def test_answers_stop_at_the_context_length_and_say_so(loaded_original):
    from llava.drop.generate import SamplingConfig, generate
    from llava.eval.answering.answerer import Answerer
    from llava.model.geometry import geometry_of_model

    tokenizer, model, image_processor, _ = loaded_original
    context = geometry_of_model(model).context_length
    answerer = Answerer(tokenizer, model, image_processor, "vicuna_v1", SamplingConfig(max_new_tokens=64))
    prompt, _ = answerer.build_prompt("word " * 10, with_image=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    filler = ids[:, -1:].repeat(1, context - ids.shape[1] - 5)  # leaves room for exactly 6 new tokens
    output = generate(model, torch.cat([ids, filler], dim=1), None, SamplingConfig(max_new_tokens=64),
                      eos_token_ids=set())
    assert output.stats["new_tokens"] == 6 and output.stats["stopped_at_context"] is True


@pytest.mark.parametrize("extra", [["--sparse", "--drop_layers", "2,40"], []])
def test_no_traceback_reaches_the_terminal(tiny_original, tmp_path, extra):
    """The same refusals through a real process: exit code 1, one line on stderr."""
    questions = write_questions(tmp_path / "q.jsonl", ['{"question_id": "x", "text": null}'] if not extra else demo_lines(1))
    completed = run_subprocess(cli_args(tiny_original, questions, tmp_path / "a.jsonl", *extra))
    assert completed.returncode == 1
    assert "Traceback" not in completed.stderr
    assert [line for line in completed.stderr.splitlines() if line.strip()][-1].startswith("error: ")


def test_science_qa_question_that_is_not_an_object(tiny_original, tmp_path, no_model_load):
    from llava.eval.answering.science import main as science_main

    questions = tmp_path / "q.json"
    questions.write_text(json.dumps([{"id": "1", "conversations": [{"value": "Q?"}]}, "oops"]))
    with pytest.raises(SystemExit, match=r"q.json, question 2: expected a JSON object, got str"):
        science_main(cli_args(tiny_original, questions, tmp_path / "a.jsonl"))
    questions.write_text("[]")
    with pytest.raises(SystemExit, match=r"q.json holds no questions"):
        science_main(cli_args(tiny_original, questions, tmp_path / "a.jsonl"))


def test_copying_a_checkpoint_keeps_it_loadable(tiny_original, tmp_path):
    """Guard for the truncation test: an intact copy of the same files loads and answers."""
    copy = Path(shutil.copytree(tiny_original, tmp_path / "copy"))
    answers = tmp_path / "a.jsonl"
    main(cli_args(copy, write_questions(tmp_path / "q.jsonl", demo_lines(1)), answers))
    assert len(answers.read_text().splitlines()) == 1


def test_a_missing_model_path_is_refused_not_defaulted(tmp_path):
    """LLaVA's CLIs default to facebook/opt-350m, which is no LLaVA checkpoint: here the flag is required."""
    questions = write_questions(tmp_path / "q.jsonl", demo_lines(1))
    argv = ["--question-file", str(questions), "--answers-file", str(tmp_path / "a.jsonl")]
    assert refusal(argv) == "error: --model-path is required: a LLaVA checkpoint (a folder or a Hugging Face hub id)"
