"""What a benchmark writes under `--out`: `<stem>.md` (header and table), `<stem>.json` and the chart."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: the benchmarks run headless (CI, remote GPU boxes)
import matplotlib.pyplot as plt  # noqa: E402

from llava.bench.workload import BASELINE  # noqa: E402

PLOT_METRICS = (  # (row key, label) of the ratio bars in the chart
    ("prefill_total_ratio", "prefill time (vision + LLM)"),
    ("llm_prefill_ratio", "LLM prefill time"),
    ("decode_tok_s_ratio", "decode tokens/s"),
    ("kv_cache_ratio", "KV-cache bytes"),
    ("peak_memory_ratio", "peak extra memory"),
    ("avg_vision_tokens_ratio", "avg vision tokens"),
)


def save_results(args: argparse.Namespace, stem: str, header: str, table: str, record: dict,
                 draw: Callable[[Path], None], started: float) -> None:
    """Write the table, the JSON (header, flags and `record`) and the chart `draw` makes; print the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text(f"{header}\n\n{table}\n")
    saved = {"header": header, "args": {k: str(v) for k, v in vars(args).items()}, **record}
    (args.out / f"{stem}.json").write_text(json.dumps(saved, indent=2) + "\n")
    draw(args.out / f"{stem}.png")
    print(header + "\n\n" + table)
    print(f"\nwrote {args.out}/{stem}.{{md,json,png}} in {time.perf_counter() - started:.1f} s")


def ratio_bars(rows: list[dict], title: str, path: Path) -> None:
    """Grouped bars: one group per metric, one bar per setting, each labelled with its ratio."""
    fig, ax = plt.subplots(figsize=(12, 5.5))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        xs = [m + (i - (len(rows) - 1) / 2) * width for m in range(len(PLOT_METRICS))]
        values = [row[key] for key, _ in PLOT_METRICS]
        label = "none (no dropping)" if row["setting"] == BASELINE else f"MustDrop {row['setting']}"
        bars = ax.bar(xs, values, width, label=f"{label}: {row['avg_vision_tokens']:.0f} avg vision tokens")
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(PLOT_METRICS)), [label for _, label in PLOT_METRICS])
    ax.set_xlabel("metric (lower is better, except decode tokens/s)")
    ax.set_ylabel('ratio to "none" (median over repeats)')
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, 1.2 * max(max(row[key] for key, _ in PLOT_METRICS) for row in rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tokens_lines(rows: list[dict], budgets: list[int], title: str, path: Path) -> None:
    """Prefill time ratio and FLOPs ratio against layer-averaged tokens: one line per method."""
    baseline = next(row for row in rows if row["budget"] is None)
    methods = list(dict.fromkeys(row["method"] for row in rows if row["budget"] is not None))
    panels = (("prefill_total_ratio", 'prefill time, vision + LLM (ratio to "none")'),
              ("flops_ratio", 'theoretical LLM prefill FLOPs (ratio to "none")'))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    for ax, (key, ylabel) in zip(axes, panels):
        for budget in budgets:
            ax.axvline(budget, color="lightgrey", linewidth=0.8, linestyle=":")
        for method in methods:
            points = [row for row in rows if row["method"] == method]
            ax.plot([r["avg_vision_tokens"] for r in points], [r[key] for r in points], marker="o", label=method)
        ax.plot(baseline["avg_vision_tokens"], baseline[key], marker="*", markersize=14, color="black",
                linestyle="none", label='none (no dropping)')
        ax.set_xlabel("layer-averaged vision tokens reached (dotted: target budgets)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
