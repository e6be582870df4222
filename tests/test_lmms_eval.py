"""lmms-eval end to end: a local task (a YAML, a utils.py and a JSONL the test writes; no hub access) runs
through lmms-eval's own command on the tiny checkpoint, and its answers and statistics equal
`model_vqa_loader`'s on the same questions, method and settings.

Needs the `lmms` extra (`bash scripts/test.sh --lmms` sets up .venv-lmms with it and runs this file);
skipped without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed: run bash scripts/test.sh --lmms")

from llava.eval.lmms_eval_model import MustDropLMM  # noqa: E402
from llava.eval.model_vqa_loader import main as answer_main  # noqa: E402
from tests.conftest import DEMO_IMAGE_FOLDER, cli_args, first_questions  # noqa: E402

TASK = "mustdrop_demo"
QUESTIONS = 3
NEW_TOKENS = 4
SETTINGS = {"method": "fastv", "budget": "64"}
TIMING_STATS = ("vision_seconds", "prefill_seconds", "decode_seconds", "scoring_seconds", "peak_rss_bytes",
                "peak_memory_bytes", "batch_size")
TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
TASK_UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["text"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''


def write_task(folder: Path, questions: Path) -> None:
    """A local lmms-eval task asking our question file's questions, word for word, about its images."""
    folder.mkdir()
    docs = folder / "docs.jsonl"
    with docs.open("w") as out:
        for line in questions.read_text().splitlines():
            question = json.loads(line)
            out.write(json.dumps({"question_id": question["question_id"], "text": question["text"], "answer": "-",
                                  "image_path": str(DEMO_IMAGE_FOLDER / question["image"])}) + "\n")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, docs=docs, new_tokens=NEW_TOKENS))
    (folder / "utils.py").write_text(TASK_UTILS)


def run_lmms_eval(tiny_original: Path, task_folder: Path, out: Path, batch_size: int) -> subprocess.CompletedProcess:
    model_args = ",".join([f"pretrained={tiny_original}", "conv_mode=vicuna_v1", "device=cpu",
                           *(f"{key}={value}" for key, value in SETTINGS.items())])
    command = [str(Path(sys.executable).parent / "lmms-eval"), "--model", "mustdrop", "--model_args", model_args,
               "--tasks", TASK, "--include_path", str(task_folder), "--batch_size", str(batch_size),
               "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_DATASETS_CACHE": str(out / "datasets")}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=out.parent)


def logged_samples(out: Path) -> list[dict]:
    (path,) = out.rglob(f"*_samples_{TASK}.jsonl")
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda sample: sample["doc_id"])


def without_timings(stats: dict) -> dict:
    return {key: value for key, value in stats.items() if key not in TIMING_STATS}


def test_an_lmms_eval_task_answers_as_model_vqa_loader(tiny_original, tmp_path):
    questions = first_questions(tmp_path, QUESTIONS)
    answers = tmp_path / "answers.jsonl"
    answer_main(cli_args(tiny_original, questions, answers, "--method", SETTINGS["method"], "--budget",
                         SETTINGS["budget"], max_new_tokens=NEW_TOKENS))
    expected = [json.loads(line) for line in answers.read_text().splitlines()]
    write_task(tmp_path / "task", questions)

    done = run_lmms_eval(tiny_original, tmp_path / "task", tmp_path / "out", batch_size=2)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    samples = logged_samples(tmp_path / "out")
    assert [sample["filtered_resps"] for sample in samples] == [answer["text"] for answer in expected]
    for sample, answer in zip(samples, expected):
        (counts,) = sample["token_counts"]
        assert counts["output_tokens"] == answer["metadata"]["new_tokens"]
        assert counts["input_tokens"] == answer["metadata"]["prompt_tokens"]
        ours = without_timings(counts["mustdrop"])
        assert ours == {key: answer["metadata"][key] for key in ours}
        assert {"vision_tokens", "avg_vision_tokens", "kv_cache_lengths", "prefill_flops_ratio"} <= set(ours)
        assert counts["mustdrop"]["avg_vision_tokens"] == pytest.approx(64, abs=1)


def test_log_likelihood_requests_are_refused_clearly():
    with pytest.raises(NotImplementedError, match="mustdrop answers generation tasks only"):
        MustDropLMM.loglikelihood(None, [])
