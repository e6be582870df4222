"""The per-benchmark shell scripts run end to end on the tiny checkpoint with the demo data."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEMO_DIR, run_demo_script


def average_tokens(answers_file) -> float:
    records = [json.loads(line) for line in answers_file.read_text().splitlines()]
    return sum(r["metadata"]["avg_vision_tokens"] for r in records) / len(records)


def test_textvqa_script_settings(tiny_original, tmp_path):
    averages = {}
    for setting in ("full", "64"):
        done = run_demo_script("textvqa.sh", setting, tiny_original, {
            "EVAL_DIR": str(tmp_path), "ANNOTATION_FILE": str(DEMO_DIR / "TextVQA_demo_annotations.json"),
        })
        assert done.returncode == 0, done.stderr
        assert "Samples: 12" in done.stdout and "Accuracy:" in done.stdout
        assert f"conversation mode: vicuna_v1 (from {tiny_original / 'config.json'})" in done.stdout  # auto
        merged = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-{setting}" / "merge.jsonl"
        assert all(json.loads(line)["metadata"]["run"]["conv_mode"] == "vicuna_v1"
                   for line in merged.read_text().splitlines())
        averages[setting] = average_tokens(merged)
    assert averages["full"] == 576
    assert averages["64"] < averages["full"]


def test_vizwiz_script(tiny_original, tmp_path):
    done = run_demo_script("vizwiz.sh", "64", tiny_original, {"EVAL_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert len((tmp_path / "vizwiz" / "answers" / f"{tiny_original.name}-64" / "merge.jsonl").read_text().splitlines()) == 12


@pytest.mark.parametrize("script,setting", [("textvqa.sh", "100"), ("vizwiz.sh", "32")])
def test_unknown_setting_is_refused(tmp_path, script, setting):
    done = run_demo_script(script, setting, tmp_path, {})
    assert done.returncode == 2 and f"unknown setting '{setting}'" in done.stderr


def test_the_default_setting_runs_a_method_with_its_own_count(tiny_original, tmp_path):
    """METHOD=prumerge_plus with the setting "default" runs --method prumerge_plus without a budget (a METHOD
    with a numeric setting takes it as its budget: tests/test_scripts_gqa.py runs METHOD=tome ... 64)."""
    done = run_demo_script("textvqa.sh", "default", tiny_original, {
        "EVAL_DIR": str(tmp_path), "ANNOTATION_FILE": str(DEMO_DIR / "TextVQA_demo_annotations.json"),
        "METHOD": "prumerge_plus",
    })
    assert done.returncode == 0, done.stderr
    answer_dir = tmp_path / "textvqa" / "answers" / f"{tiny_original.name}-prumerge_plus-default"
    summary = json.loads((answer_dir / "summary.json").read_text())
    assert (summary["method"], summary["family"], summary["setting"]) == ("prumerge_plus", "encoder", "default")
    assert "--budget" not in summary["drop_flags"] and 1 < summary["mean_vision_tokens"] <= 577
