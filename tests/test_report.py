"""Run summaries and the report table."""

from __future__ import annotations

import json

import pytest

from llava.eval import report
from llava.eval.scoring import run_summary
from llava.eval.scoring.summary import summarize_answers


def answer(avg_tokens, flops, prefill, new_tokens, decode, rss):
    return {"question_id": "q", "text": "a", "metadata": {
        "avg_vision_tokens": avg_tokens, "prefill_flops_ratio": flops, "prefill_seconds": prefill,
        "vision_seconds": 0.01, "decode_seconds": decode, "new_tokens": new_tokens, "peak_rss_bytes": rss}}


def test_the_median_prefill_leaves_the_first_answers_warm_up_out():
    records = [answer(64, 0.1, prefill, 2, 0.1, 1) for prefill in (1.30, 0.10, 0.20)]  # the first paid a warm-up
    summary = summarize_answers(records)
    assert summary["median_prefill_seconds"] == pytest.approx(0.20)
    assert summary["mean_prefill_seconds"] == pytest.approx(1.60 / 3)


def test_summary_means_and_decode_rate():
    records = [answer(100, 0.2, 0.10, 5, 0.4, 10), answer(200, 0.4, 0.30, 3, 0.1, 30), {"question_id": "x", "metadata": {}}]
    summary = summarize_answers(records)
    assert summary["answers"] == 3 and summary["answers_with_stats"] == 2
    assert summary["mean_vision_tokens"] == 150
    assert summary["mean_prefill_flops_ratio"] == pytest.approx(0.3)
    assert summary["mean_prefill_seconds"] == pytest.approx(0.2)
    # decoded tokens exclude the first (it comes from prefill): (4 + 2) / (0.4 + 0.1) = 12 tokens/s
    assert summary["decode_tokens_per_second"] == pytest.approx(12.0)
    assert summary["peak_rss_bytes"] == 30


def test_run_summary_and_report(tmp_path, capsys):
    answers = tmp_path / "merge.jsonl"
    answers.write_text("\n".join(json.dumps(answer(64.0, 0.25, 0.05, 3, 0.2, 2 * 1024 * 1024)) for _ in range(4)) + "\n")
    (tmp_path / "scores.json").write_text(json.dumps({"accuracy": 58.25, "samples": 4}))
    run_summary.main(["--answers-file", str(answers), "--benchmark", "textvqa", "--setting", "64",
                      "--model-path", "/ckpt/llava-v1.5-7b/", "--scores-file", str(tmp_path / "scores.json"),
                      "--drop-flags", "--sparse --global_thr 0.011 --individual_thr 0.01", "--out", str(tmp_path / "summary.json")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["model"] == "llava-v1.5-7b" and summary["method"] == "mustdrop" and summary["questions"] == 4
    assert summary["family"] == "multi-stage"
    assert summary["versions"]["torch"] and summary["scores"]["accuracy"] == 58.25
    capsys.readouterr()
    report.main([str(tmp_path)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| benchmark | model | method | family | setting")
    assert table[2] == ("| textvqa | llava-v1.5-7b | mustdrop | multi-stage | 64 | 4 | accuracy=58.25, samples=4 | 64.0 | "
                        "- | 0.250 | 50.0 | 10.0 | 2 |")  # no kept fraction: these answers do not record one


def test_report_reads_the_family_of_summaries_written_before_it_was_recorded(tmp_path, capsys):
    for method in ("pool", "nosuch"):
        folder = tmp_path / method
        folder.mkdir()
        (folder / "summary.json").write_text(json.dumps({"benchmark": "gqa", "method": method, "setting": "64"}))
    report.main([str(tmp_path)])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert sorted(row.split(" | ")[2:4] for row in rows) == [["nosuch", "?"], ["pool", "baseline"]]


def test_report_errors(tmp_path):
    with pytest.raises(SystemExit, match="no summary.json found"):
        report.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file or directory"):
        report.main([str(tmp_path / "missing")])
