"""The prefill/decode benchmark runs end to end in CI (`--quick`) and reports sane, ordered numbers."""

from __future__ import annotations

import json

from llava.bench.prefill_decode import SETTINGS, main
from llava.bench.workload import BASELINE, RATIO_OF

QUICK_ARGS = ["--quick", "--new-tokens", "3"]
OUTPUT_FILES = ("results.json", "results.md", "results.png")


def test_quick_benchmark_writes_ordered_results(tmp_path):
    rows = main([*QUICK_ARGS, "--out", str(tmp_path)])

    for name in OUTPUT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    table = (tmp_path / "results.md").read_text()
    for setting in SETTINGS:
        assert f"| {setting} |" in table
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [row["setting"] for row in saved] == list(SETTINGS)

    by_setting = {row["setting"]: row for row in rows}
    for ratio in RATIO_OF:
        assert by_setting[BASELINE][ratio] == 1.0, ratio
    tokens = {name: row["avg_vision_tokens"] for name, row in by_setting.items()}
    assert tokens["64"] <= tokens["192"] <= tokens[BASELINE]
