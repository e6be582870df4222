"""Aggregate the per-answer statistics of an answers file into the figures a paper table reports."""

from __future__ import annotations

import math
from statistics import mean, median

SUMMARY_FIELDS = {  # answers-file metadata key -> summary key
    "avg_vision_tokens": "mean_vision_tokens",
    "prefill_flops_ratio": "mean_prefill_flops_ratio",
    "prefill_seconds": "mean_prefill_seconds",
    "vision_seconds": "mean_vision_seconds",
    "decode_seconds": "mean_decode_seconds",
}


STATS_MARKER = "avg_vision_tokens"  # an answer whose metadata has it carries statistics
NEEDED_STATS = (*SUMMARY_FIELDS, "new_tokens")
OPTIONAL_STATS = ("avg_vision_tokens_per_image", "vision_kept_fraction", "keep_fraction", "peak_memory_bytes",
                  "peak_rss_bytes")


def summarize_answers(records: list, source: str = "answers file") -> dict:
    """Means over the answers that carry statistics (older files without them are skipped); a line of the
    wrong shape is a ValueError naming `source` and the line."""
    with_stats = answers_with_stats(records, source)
    summary: dict = {"answers": len(records), "answers_with_stats": len(with_stats)}
    if not with_stats:
        return summary
    for source, target in SUMMARY_FIELDS.items():
        summary[target] = mean(m[source] for m in with_stats)
    # the typical answer's prefill: the first answers of a run pay its warm-up, which can outweigh the mean
    summary["median_prefill_seconds"] = median(m["prefill_seconds"] for m in with_stats)
    new_tokens = sum(m["new_tokens"] - 1 for m in with_stats)  # the first token comes from prefill
    decode_time = sum(m["decode_seconds"] for m in with_stats)
    summary["decode_tokens_per_second"] = new_tokens / decode_time if decode_time > 0 else None
    summary["answers_stopped_at_context"] = sum(bool(m.get("stopped_at_context")) for m in with_stats)
    if all("avg_vision_tokens_per_image" in m for m in with_stats):  # LLaVA-NeXT: the reference's figure too
        summary["mean_vision_tokens_per_image"] = mean(m["avg_vision_tokens_per_image"] for m in with_stats)
    if all("vision_kept_fraction" in m for m in with_stats):  # older files and text-only answers lack it
        summary["mean_vision_kept_fraction"] = mean(m["vision_kept_fraction"] for m in with_stats)
    for key in ("peak_memory_bytes", "peak_rss_bytes"):
        values = [m[key] for m in with_stats if key in m]
        if values:
            summary[key] = max(values)
    return summary


def answers_with_stats(records: list, source: str) -> list[dict]:
    """The metadata of the answers that carry statistics, each checked: a statistic that is not a number
    would end in a traceback, or in a mean that is not one."""
    with_stats = []
    for line, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{source}, line {line}: expected a JSON object, got {type(record).__name__}")
        metadata = record.get("metadata")
        if not isinstance(metadata, dict) or STATS_MARKER not in metadata:
            continue
        for name in (*NEEDED_STATS, *(name for name in OPTIONAL_STATS if name in metadata)):
            value = metadata.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{source}, line {line}: metadata {name!r} must be a finite number, got {value!r}")
        with_stats.append(metadata)
    return with_stats


def summary_line(summary: dict) -> str:
    if not summary.get("answers_with_stats"):
        return f"{summary['answers']} answers (no token statistics recorded)"
    line = (
        f"{summary['answers']} answers: mean vision tokens per layer {summary['mean_vision_tokens']:.1f}, "
        f"mean prefill FLOPs ratio {summary['mean_prefill_flops_ratio']:.3f}, "
        f"mean prefill time {1000 * summary['mean_prefill_seconds']:.1f} ms"
    )
    if summary.get("answers_stopped_at_context"):
        line += f"; {summary['answers_stopped_at_context']} answers stopped at the model's context length"
    return line
