"""sqa.sh and mmbench.sh run end to end on the tiny checkpoint with tiny generated data sets.

Tiny-model answers are gibberish, so these tests check counts and file formats, not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

from openpyxl import load_workbook
from PIL import Image

from tests.conftest import run_benchmark_script as run_script
from tests.conftest import sample_rows, write_tsv

MMBENCH_ROUNDS = 3 + 4 + 2  # sample_rows' option counts


def write_scienceqa(folder: Path) -> None:
    """Three test problems (two with images, one text-only) and one val problem, in LLaVA's layout."""
    problems, conversations = {}, []
    for pid, image, answer in (("11", True, 0), ("12", False, 1), ("13", True, 2), ("14", False, 0)):
        problems[pid] = {"question": f"Question {pid}?", "choices": ["cat", "dog", "eel"], "answer": answer,
                         "image": "image.png" if image else None, "split": "val" if pid == "14" else "test"}
        human = f"Context: N/A\nQuestion {pid}?\nOptions: (A) cat (B) dog (C) eel"
        record = {"id": pid, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + human},
                                               {"from": "gpt", "value": "ABC"[answer]}]}
        if image:
            record["image"] = f"{pid}/image.png"
            (folder / "images" / pid).mkdir(parents=True)
            Image.new("RGB", (40, 30), (int(pid) * 10, 120, 60)).save(folder / "images" / pid / "image.png")
        if pid != "14":
            conversations.append(record)
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"test": ["11", "12", "13"], "val": ["14"]}))
    (folder / "llava_test_CQM-A.json").write_text(json.dumps(conversations))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sqa_script(tiny_original: Path, tmp_path: Path) -> None:
    fixtures = tmp_path / "fixtures"
    fixtures.mkdir()
    write_scienceqa(fixtures)
    done = run_script("sqa.sh", "64", tiny_original, {
        "EVAL_DIR": str(tmp_path / "eval"), "QUESTION_FILE": str(fixtures / "llava_test_CQM-A.json"),
        "IMAGE_FOLDER": str(fixtures / "images"), "BASE_DIR": str(fixtures),
    })
    assert done.returncode == 0, done.stderr
    assert "Total: 3, Correct:" in done.stdout and "IMG-Accuracy:" in done.stdout
    answer_dir = tmp_path / "eval" / "scienceqa" / "answers" / f"{tiny_original.name}-64"
    answers = read_jsonl(answer_dir / "merge.jsonl")
    assert [a["question_id"] for a in answers] == ["11", "12", "13"]
    assert [a["prompt"].startswith("<image>\n") for a in answers] == [True, False, True]
    assert answers[1]["metadata"]["vision_tokens"] == 0  # asked text-only
    for name in ("output.json", "result.json"):
        assert (answer_dir / name).is_file()
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert summary["questions"] == 3 and summary["scores"]["img_samples"] == 2


def test_mmbench_script_all_rounds(tiny_original: Path, tmp_path: Path) -> None:
    data = tmp_path / "mmbench"
    data.mkdir()
    write_tsv(data / "mmbench_dev_20230712.tsv", sample_rows())  # the default SPLIT and location
    done = run_script("mmbench.sh", "full", tiny_original, {"EVAL_DIR": str(tmp_path), "ALL_ROUNDS": "1"})
    assert done.returncode == 0, done.stderr
    assert "Questions: 3 (9 rounds answered, 0 unanswered)" in done.stdout
    assert "Circular accuracy:" in done.stdout
    answer_dir = data / "answers" / f"{tiny_original.name}-full"
    answers = read_jsonl(answer_dir / "merge.jsonl")
    assert len(answers) == MMBENCH_ROUNDS
    assert {"round_id", "options", "option_char", "answer"} <= set(answers[0])
    upload = data / "answers_upload" / "mmbench_dev_20230712" / f"{tiny_original.name}-full.xlsx"
    header, *rows = load_workbook(upload).active.iter_rows(values_only=True)
    assert "prediction" in header and "image" not in header and [row[0] for row in rows] == [0, 1, 2]
    assert json.loads((answer_dir / "summary.json").read_text())["scores"]["samples"] == 3
