"""The method comparison runs end to end on the quick model: every registered method, with its family.

One budget keeps this test short; that every method reaches every budget is tests/test_budgets_all_methods.py's."""

from __future__ import annotations

import json

from llava.bench.compare import (
    BASELINE,
    NO_BUDGET,
    OWN_COUNT,
    budget_label,
    build_settings,
    main,
)
from llava.bench.workload import RATIO_OF
from llava.drop.methods.registry import METHODS, discover_methods

BUDGET = 64
QUICK_ARGS = ["--quick", "--new-tokens", "2", "--repeats", "1", "--budgets", str(BUDGET)]
OUTPUT_FILES = ("compare.json", "compare.md", "compare.png")
UNPRUNED_VISION_TOKENS = 576  # LLaVA-1.5: (336 / 14) ** 2 patches
KNOWN_METHODS = {"mustdrop", "fastv", "pdrop", "visionzip", "sparsevlm"}  # the registry holds at least these


def table_rows(markdown: str) -> list[list[str]]:
    """The cells of the Markdown table's body rows (after the header line and the --- line)."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_quick_comparison_covers_every_method(tmp_path):
    """Expected rows come from the registry, not from the run: a method that fails anywhere fails this."""
    discover_methods()
    methods = [name for name in METHODS if name != BASELINE]
    assert KNOWN_METHODS <= set(methods)

    rows = main([*QUICK_ARGS, "--out", str(tmp_path)])

    for name in OUTPUT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert saved["skipped"] == {}
    expected = {(m, OWN_COUNT if METHODS[m].own_count else str(BUDGET), METHODS[m].family) for m in methods}
    body = table_rows((tmp_path / "compare.md").read_text())
    assert body[0][:3] == [BASELINE, NO_BUDGET, "unpruned"]
    assert sorted(tuple(cells[:3]) for cells in body[1:]) == sorted(expected)
    assert {"encoder", "prefill", "multi-stage", "baseline"} <= {family for *_, family in expected}
    assert len(saved["rows"]) == len(rows) == len(expected) + 1

    baseline = next(row for row in rows if row["budget"] is None)
    for row in rows:  # every ratio is the row's own median over the baseline's
        for ratio, field in RATIO_OF.items():
            if baseline[field]:
                assert row[ratio] == row[field] / baseline[field], (row["setting"], ratio)
    assert baseline["avg_vision_tokens"] == UNPRUNED_VISION_TOKENS
    for row in rows:
        assert row["avg_vision_tokens"] <= UNPRUNED_VISION_TOKENS, row["setting"]


def test_method_without_budget_option_is_skipped_with_a_note(capsys):
    settings, skipped = build_settings([BASELINE], [64])  # "none" takes no options

    assert [s.label for s in settings] == [BASELINE]
    assert list(skipped) == [budget_label(BASELINE, 64)]
    assert "skipping" in capsys.readouterr().out
