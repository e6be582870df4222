"""The evaluation CLI: LLaVA's answer format, resume after a kill, and clear errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava.eval.model_vqa_loader import main
from tests.conftest import DEMO_DIR, REPO_ROOT, cli_args, first_questions

QUESTION_FILE = DEMO_DIR / "llava_textvqa_demo.jsonl"
IMAGE_FOLDER = DEMO_DIR / "images"
ANSWER_KEYS = {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}


def read_answers(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_file_has_llava_format(tiny_original, tmp_path):
    questions = first_questions(tmp_path, 3)
    answers = tmp_path / "answers" / "out.jsonl"
    main(cli_args(tiny_original, questions, answers))
    records = read_answers(answers)
    expected = [json.loads(line) for line in questions.read_text().splitlines()]
    assert [r["question_id"] for r in records] == [q["question_id"] for q in expected]
    assert [r["prompt"] for r in records] == [q["text"] for q in expected]
    for record in records:
        assert set(record) == ANSWER_KEYS
        assert record["model_id"] == tiny_original.name
        assert record["metadata"]["vision_tokens"] == 576
        assert isinstance(record["text"], str) and record["text"]


def test_chunks_partition_the_questions(tiny_original, tmp_path):
    questions = first_questions(tmp_path, 5)
    ids = []
    for chunk in range(2):
        answers = tmp_path / f"chunk{chunk}.jsonl"
        main(cli_args(tiny_original, questions, answers, "--num-chunks", "2", "--chunk-idx", str(chunk)))
        ids.append([r["question_id"] for r in read_answers(answers)])
    all_ids = [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]
    assert ids == [all_ids[:3], all_ids[3:]]


def test_resume_after_truncated_file_keeps_finished_lines(tiny_original, tmp_path):
    questions = first_questions(tmp_path, 4)
    complete = tmp_path / "complete.jsonl"
    main(cli_args(tiny_original, questions, complete))
    reference = read_answers(complete)
    partial = tmp_path / "partial.jsonl"
    lines = complete.read_text().splitlines(keepends=True)
    partial.write_text(lines[0] + lines[1] + lines[2][:15])  # a kill in the middle of line 3
    main(cli_args(tiny_original, questions, partial))
    resumed = read_answers(partial)
    assert resumed[:2] == reference[:2]  # untouched, same answer_ids
    assert [r["text"] for r in resumed] == [r["text"] for r in reference]
    assert [r["question_id"] for r in resumed] == [r["question_id"] for r in reference]


def test_killed_run_resumes_without_losing_or_duplicating(tiny_original, tmp_path):
    questions = first_questions(tmp_path, 12)
    answers = tmp_path / "killed.jsonl"
    command = [sys.executable, "-m", "llava.eval.model_vqa_loader", *cli_args(tiny_original, questions, answers)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not answers.exists() or answers.read_text().count("\n") < 2):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written_before = answers.read_text().count("\n")
    assert 2 <= written_before < 12, "the run finished before it could be killed"
    main(cli_args(tiny_original, questions, answers))
    ids = [r["question_id"] for r in read_answers(answers)]
    assert ids == [json.loads(line)["question_id"] for line in questions.read_text().splitlines()]


def test_missing_image_stops_with_question_id_and_path(tiny_original, tmp_path, capsys):
    lines = QUESTION_FILE.read_text().splitlines()[:3]
    broken = json.loads(lines[2])
    broken["image"] = "no-such-image.png"
    questions = tmp_path / "questions.jsonl"
    questions.write_text("\n".join(lines[:2] + [json.dumps(broken)]) + "\n")
    answers = tmp_path / "answers.jsonl"
    with pytest.raises(SystemExit) as stopped:
        main(cli_args(tiny_original, questions, answers))
    message = str(stopped.value.code)
    assert broken["question_id"] in message and "no-such-image.png" in message and "not found" in message
    assert not answers.exists()  # every image is checked before the model loads (tests/test_bad_input_classes.py)


def test_unreadable_image_is_reported(tiny_original, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "bad.png").write_text("not an image")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": "q1", "image": "bad.png", "text": "What?"}) + "\n")
    args = cli_args(tiny_original, questions, tmp_path / "a.jsonl")
    args[args.index("--image-folder") + 1] = str(tmp_path / "images")
    with pytest.raises(SystemExit, match=r"question 'q1': cannot read image .*bad\.png"):
        main(args)


@pytest.mark.parametrize("extra,message", [
    (["--conv-mode", "vicuna_v9"], r"unknown conversation mode 'vicuna_v9'; valid modes: .*vicuna_v1"),
    (["--sparse", "--global_thr", "1.5"], r"global_thr must be between 0 and 1, got 1.5"),
    (["--sparse", "--individual_thr", "-0.1"], r"individual_thr must be between 0 and 1, got -0.1"),
    (["--num_beams", "3"], r"beam search is not supported"),
    (["--num-chunks", "2", "--chunk-idx", "2"], r"--chunk-idx must be in \[0, --num-chunks\)"),
])
def test_bad_options_fail_before_loading_the_model(tmp_path, extra, message):
    args = cli_args(tmp_path / "no-model-needed", QUESTION_FILE, tmp_path / "a.jsonl", *extra)
    with pytest.raises(SystemExit, match=message):
        main(args)


def test_missing_question_file_and_model(tiny_original, tmp_path):
    with pytest.raises(SystemExit, match=r"question file not found: .*nope\.jsonl"):
        main(cli_args(tiny_original, tmp_path / "nope.jsonl", tmp_path / "a.jsonl"))
    with pytest.raises(SystemExit, match=r"no config.json"):
        main(cli_args(tmp_path, QUESTION_FILE, tmp_path / "b.jsonl"))


def test_answers_file_from_other_questions_is_refused(tiny_original, tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"question_id": "someone-else", "text": "x"}) + "\n")
    with pytest.raises(SystemExit, match=r"answers question 'someone-else'"):
        main(cli_args(tiny_original, first_questions(tmp_path, 2), answers))


def test_sparse_with_nothing_to_drop_answers_like_the_unpruned_model(tiny_original, tmp_path, capsys):
    questions = first_questions(tmp_path, 3)
    plain, nothing = tmp_path / "plain.jsonl", tmp_path / "nothing.jsonl"
    main(cli_args(tiny_original, questions, plain))
    main(cli_args(tiny_original, questions, nothing, "--sparse", "--no_merge", "--global_thr", "0", "--individual_thr", "0"))
    assert [r["text"] for r in read_answers(nothing)] == [r["text"] for r in read_answers(plain)]
    assert "mean vision tokens per layer 576.0" in capsys.readouterr().out


def test_sparse_records_token_statistics(tiny_original, tmp_path, capsys):
    answers = tmp_path / "sparse.jsonl"
    main(cli_args(tiny_original, first_questions(tmp_path, 2), answers, "--sparse", "--global_thr", "0.011", "--individual_thr", "0.01"))
    for record in read_answers(answers):
        stats = record["metadata"]
        assert stats["vision_tokens"] < stats["vision_tokens_in"] == 576  # stage 1 merged windows
        assert set(stats["vision_tokens_after_layer"]) == {"2", "6", "10", "14"}
        assert stats["avg_vision_tokens"] < stats["vision_tokens"]
        assert len(stats["kv_cache_lengths"]) == 32 and 0 < stats["prefill_flops_ratio"] < 1
        assert stats["prefill_seconds"] > 0 and stats["decode_seconds"] > 0
    assert "mean prefill FLOPs ratio" in capsys.readouterr().out


def test_bad_drop_layers_flag(tmp_path):
    with pytest.raises(SystemExit, match=r"--drop_layers must be comma-separated integers, got '2,x'"):
        main(cli_args(tmp_path, QUESTION_FILE, tmp_path / "a.jsonl", "--sparse", "--drop_layers", "2,x"))


@pytest.mark.parametrize("extra,message", [
    (["--method", "nosuch"], r"unknown method 'nosuch'; valid methods: .*mustdrop.*none"),
    (["--method", "mustdrop", "--method-args", "global_thr=0.1,wrong=1"], r"unknown option\(s\) wrong for this method; valid: .*global_thr"),
    (["--method", "mustdrop", "--method-args", "global_thr"], r"--method-args expects key=value"),
    (["--method", "mustdrop", "--method-args", "global_thr=abc"], r"option global_thr='abc' is not a valid float"),
    (["--method", "none", "--method-args", "x=1"], r"method 'none' takes no options"),
    (["--sparse", "--method", "none"], r"--sparse switches on MustDrop"),
])
def test_bad_method_flags(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        main(cli_args(tmp_path, QUESTION_FILE, tmp_path / "a.jsonl", *extra))


def test_method_args_set_mustdrop_options(tiny_original, tmp_path):
    """--method mustdrop --method-args equals the same settings given with --sparse flags."""
    questions = first_questions(tmp_path, 2)
    by_flags, by_args = tmp_path / "flags.jsonl", tmp_path / "args.jsonl"
    main(cli_args(tiny_original, questions, by_flags, "--sparse", "--global_thr", "0.011", "--individual_thr", "0.01", "--no_merge"))
    main(cli_args(tiny_original, questions, by_args, "--method", "mustdrop",
                  "--method-args", "global_thr=0.011,individual_thr=0.01,vision_merge=false"))
    stats = [json.loads(line)["metadata"] for line in by_args.read_text().splitlines()]
    assert [s["avg_vision_tokens"] for s in stats] == [json.loads(l)["metadata"]["avg_vision_tokens"] for l in by_flags.read_text().splitlines()]
    assert all(s["vision_tokens"] == 576 for s in stats)


def test_budget_flag(tiny_original, tmp_path):
    answers = tmp_path / "budget.jsonl"
    main(cli_args(tiny_original, first_questions(tmp_path, 1), answers, "--sparse", "--budget", "128"))
    assert abs(read_answers(answers)[0]["metadata"]["avg_vision_tokens"] - 128) <= 1
    with pytest.raises(SystemExit, match="--budget needs a dropping method"):
        main(cli_args(tiny_original, QUESTION_FILE, tmp_path / "x.jsonl", "--budget", "64"))
