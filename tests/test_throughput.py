"""The throughput benchmark runs end to end on the quick model and its rows say what they measured."""

from __future__ import annotations

import json

from llava.bench.throughput import main


def test_quick_throughput_rows_cover_every_setting_batch_and_length(tmp_path):
    rows = main(["--quick", "--methods", "fastv", "--batch-sizes", "1,2", "--answer-tokens", "3", "--device", "cpu",
                 "--out", str(tmp_path)])
    assert [(r["setting"], r["batch_size"], r["answer_tokens"]) for r in rows] == [
        ("none", 1, 3), ("fastv@64", 1, 3), ("none", 2, 3), ("fastv@64", 2, 3)]
    for row in rows:
        assert row["questions_per_s"] > 0 and row["decode_tok_s"] > 0
    by_key = {(r["setting"], r["batch_size"]): r for r in rows}
    assert by_key[("none", 1)]["avg_vision_tokens"] == 576
    assert abs(by_key[("fastv@64", 2)]["avg_vision_tokens"] - 64) < 0.65  # the closed form rounds keep
    # two answers hold twice the cache of one; the ragged second prompt is 3 text tokens shorter
    assert by_key[("none", 2)]["kv_cache_bytes"] < 2 * by_key[("none", 1)]["kv_cache_bytes"]
    assert by_key[("none", 1)]["questions_vs_batch1"] == 1.0
    saved = json.loads((tmp_path / "throughput.json").read_text())
    assert len(saved["rows"]) == 4 and (tmp_path / "throughput.png").stat().st_size > 0
