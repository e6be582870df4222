"""Sharded runs (LLaVA's chunks, torchrun / accelerate launch) merge to the single-process answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llava.eval.model_vqa_loader import main
from tests.conftest import DEMO_DIR, REPO_ROOT, cli_args, first_questions

WALL_CLOCK_KEYS = ("_seconds", "peak_")  # measurements that differ between any two runs


def comparable(path) -> list[dict]:
    """Answer lines with wall-clock measurements removed; everything else must match byte for byte."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        record["metadata"] = {k: v for k, v in record["metadata"].items()
                              if not (k.endswith(WALL_CLOCK_KEYS[0]) or k.startswith(WALL_CLOCK_KEYS[1]))}
    return records


def single_process_answers(model, tmp_path, count: int):
    questions = first_questions(tmp_path, count)
    single = tmp_path / "single.jsonl"
    main(cli_args(model, questions, single, "--sparse", "--global_thr", "0.011", "--individual_thr", "0.01"))
    return questions, single


def run_rank(model, questions, answers, rank: int, world: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    command = [sys.executable, "-m", "llava.eval.model_vqa_loader",
               *cli_args(model, questions, answers, "--sparse", "--global_thr", "0.011", "--individual_thr", "0.01")]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_shards_merge_to_the_single_process_answers(tiny_original, tmp_path):
    questions, single = single_process_answers(tiny_original, tmp_path, 5)
    merged = tmp_path / "torchrun.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "llava.eval.model_vqa_loader",
               *cli_args(tiny_original, questions, merged, "--sparse", "--global_thr", "0.011", "--individual_thr", "0.01")]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert comparable(merged) == comparable(single)
    assert len(list(tmp_path.glob("torchrun.shard-*-of-00002.jsonl"))) == 2


def test_dead_shard_is_rerun_alone_and_then_merges(tiny_original, tmp_path):
    questions, single = single_process_answers(tiny_original, tmp_path, 5)
    merged = tmp_path / "merged.jsonl"
    assert run_rank(tiny_original, questions, merged, 1, 2).returncode == 0
    assert not merged.exists()  # shard 0 has not run: nothing to merge
    shard_1 = tmp_path / "merged.shard-00001-of-00002.jsonl"
    finished_line = shard_1.read_text().splitlines(keepends=True)[0]
    shard_1.write_text(finished_line + '{"question_id": "half a li')  # shard 1 was killed mid-line
    assert run_rank(tiny_original, questions, merged, 0, 2).returncode == 0
    assert not merged.exists()  # shard 1 is incomplete: nothing merged yet
    assert run_rank(tiny_original, questions, merged, 1, 2).returncode == 0  # re-run shard 1 alone
    assert shard_1.read_text().startswith(finished_line)  # its finished line was kept
    assert comparable(merged) == comparable(single)


def test_llava_chunks_over_listed_gpus_merge_in_order(tiny_original, tmp_path):
    """scripts/v1_5/eval/common.sh starts one chunk per entry of CUDA_VISIBLE_DEVICES."""
    questions, single = single_process_answers(tiny_original, tmp_path, 5)
    asked = {json.loads(line)["question_id"] for line in questions.read_text().splitlines()}
    annotations = json.loads((DEMO_DIR / "TextVQA_demo_annotations.json").read_text())
    annotations["data"] = [entry for entry in annotations["data"] if entry["image_id"] in asked]
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))  # the scorer wants every question answered
    env = {**os.environ, "MODEL_PATH": str(tiny_original), "PYTHON": sys.executable, "EVAL_DIR": str(tmp_path),
           "QUESTION_FILE": str(questions), "IMAGE_FOLDER": str(DEMO_DIR / "images"),
           "ANNOTATION_FILE": str(tmp_path / "annotations.json"),
           "CUDA_VISIBLE_DEVICES": "0,1", "EXTRA_ARGS": "--max_new_tokens 4 --device cpu"}
    done = subprocess.run(["bash", "scripts/v1_5/eval/textvqa.sh", "64"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    answer_dir = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-64"
    assert sorted(p.name for p in answer_dir.glob("2_*.jsonl")) == ["2_0.jsonl", "2_1.jsonl"]
    assert comparable(answer_dir / "merge.jsonl") == comparable(single)
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert summary["questions"] == 5 and summary["method"] == "mustdrop" and summary["setting"] == "64"
    assert summary["scores"]["samples"] == 5 and "accuracy" in summary["scores"]


def test_a_rank_writes_its_error_line_whole(monkeypatch, capsys):
    """Ranks share one stderr; the interpreter would print an exit message and its newline in two writes,
    which two ranks failing together interleave, so a rank writes the whole line itself and exits 1."""
    from llava.eval.cli_errors import RunError, main_guard

    def fail():
        raise RunError("no config.json")

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:
        main_guard(fail)
    assert stop.value.code == 1 and capsys.readouterr().err == "error: no config.json\n"
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(SystemExit) as stop:
        main_guard(fail)
    assert stop.value.code == "error: no config.json"
