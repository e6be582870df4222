"""Decode stage: the output-aware KV-cache policy.

After prefill, layer l's cache holds the tokens that entered layer l. Every layer from the first through
the last dropping layer is cut down to the tokens that survived all prefill drops, so decoding attends to
the same final token set in those layers. Layers before the first drop keep the full prompt; layers after
the last drop already hold the final set.
"""

from __future__ import annotations

import torch

from llava.drop.cache import LayerKVCache


def compose_keeps(keeps: list[torch.Tensor]) -> torch.Tensor:
    """Map successive keep lists (each indexing the sequence left by the previous) to the first one's
    coordinates: the positions, in the sequence before `keeps[0]`, of the tokens left after the last."""
    composed = keeps[-1]
    for keep in reversed(keeps[:-1]):
        composed = keep[composed]
    return composed


def apply_output_aware_cache(cache: LayerKVCache, drops: list[tuple[int, torch.Tensor]]) -> None:
    """Shrink the caches of layers drops[0].layer .. drops[-1].layer to the final token set.

    `drops` lists (dropping layer, sequence keep positions) in layer order, as prefill made them.
    """
    if not drops:
        return
    first_layer, last_layer = drops[0][0], drops[-1][0]
    for layer_idx in range(first_layer, last_layer + 1):
        later_keeps = [keep for drop_layer, keep in drops if drop_layer >= layer_idx]
        cache.keep(layer_idx, compose_keeps(later_keeps))
