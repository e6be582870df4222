"""An answer's statistics (what `llava.drop.generate` records, as in the answers files) as one line."""

from __future__ import annotations

MIB = 2**20


def decode_tokens_per_second(stats: dict) -> float | None:
    """Tokens per second of the decode loop; the first token comes out of prefill, as the run summary counts."""
    decoded = stats["new_tokens"] - 1
    return decoded / stats["decode_seconds"] if decoded > 0 and stats["decode_seconds"] > 0 else None


def vision_stages(stats: dict) -> str:
    """Vision tokens as they leave each stage: the tower's, the vision stage's, then each dropping layer's."""
    stages = [f"{stats['vision_tokens_in']}", f"{stats['vision_tokens']} (vision stage)"]
    after_layer = sorted((int(layer), count) for layer, count in stats["vision_tokens_after_layer"].items())
    stages += [f"{count} (layer {layer})" for layer, count in after_layer]
    return " -> ".join(stages) + f", {stats['avg_vision_tokens']:.1f} per layer on average"


def stats_line(stats: dict) -> str:
    """e.g. `[vision tokens 576 -> 288 (vision stage) -> 144 (layer 2), 151.2 per layer on average | KV cache
    12.50 MiB | prefill 41.3 ms | 22.9 tokens/s]`."""
    speed = decode_tokens_per_second(stats)
    return (f"[vision tokens {vision_stages(stats)} | KV cache {stats['kv_cache_bytes'] / MIB:.2f} MiB"
            f" | prefill {1000 * stats['prefill_seconds']:.1f} ms"
            f" | {'-' if speed is None else f'{speed:.1f}'} tokens/s]")
