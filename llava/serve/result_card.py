"""What the web page writes under one method's answer: tokens per stage and per layer, FLOPs, KV cache, times.

Every figure is one `llava.drop.generate` recorded for the answer (what the answers files hold); the
vision-token chain and the decode speed are worded as the chat CLI's statistics line words them.
"""

from __future__ import annotations

from llava.serve.stats_line import MIB, decode_tokens_per_second, vision_stages

MS_PER_SECOND = 1000


def vision_tokens_per_layer(stats: dict, num_layers: int) -> list[tuple[int, int, int]]:
    """(first layer, last layer, vision tokens) for each run of decoder layers that saw the same count: a
    layer that drops still sees what it had, the next layer what it kept."""
    runs, first, count = [], 0, stats["vision_tokens"]
    for layer, kept in sorted((int(layer), kept) for layer, kept in stats["vision_tokens_after_layer"].items()):
        runs.append((first, layer, count))
        first, count = layer + 1, kept
    if first < num_layers:
        runs.append((first, num_layers - 1, count))
    return runs


def layers_table(stats: dict, num_layers: int) -> str:
    """A Markdown table: decoder layers, vision tokens each of them saw."""
    rows = [f"| {first}–{last} | {count} |" if first != last else f"| {first} | {count} |"
            for first, last, count in vision_tokens_per_layer(stats, num_layers)]
    return "\n".join(["| decoder layers | vision tokens |", "| --- | --- |", *rows])


def timing(stats: dict) -> str:
    speed = decode_tokens_per_second(stats)
    tokens = f"{stats['new_tokens']} tokens" + ("" if speed is None else f", {speed:.1f} tokens/s")
    vision, prefill, decode = (MS_PER_SECOND * stats[f"{stage}_seconds"] for stage in ("vision", "prefill", "decode"))
    return f"vision {vision:.1f} ms · prefill {prefill:.1f} ms · decode {decode:.1f} ms ({tokens})"


def result_card(stats: dict, num_layers: int) -> str:
    """The answer's statistics as Markdown, for the column under its answer."""
    return "\n\n".join([
        f"**Prefill FLOPs** {stats['prefill_flops_ratio']:.3f} of the unpruned model's (theoretical)",
        f"**Vision tokens** {vision_stages(stats)}",
        layers_table(stats, num_layers),
        f"**KV cache** {stats['kv_cache_bytes'] / MIB:.2f} MiB",
        f"**Time** {timing(stats)}",
    ])
