"""MustDrop (Liu et al., 2024): SPEC.md stages 1-3 as a method of the engine."""

from __future__ import annotations

import torch

from llava.drop.cache import LayerKVCache
from llava.drop.config import DropConfig
from llava.drop.decode import apply_output_aware_cache
from llava.drop.methods.base import TEXT_QUERIES, DropMethod, LayerContext
from llava.drop.methods.registry import register
from llava.drop.prefill import dual_attention_keep
from llava.drop.vision import VisionOutput, encode_image


@register
class MustDrop(DropMethod):
    """Local spatial merge + key set in CLIP, dual attention filtering in prefill, output-aware cache."""

    name = "mustdrop"
    options_class = DropConfig

    def __init__(self, options: DropConfig | None = None):
        self.options = options or DropConfig()
        self.compact_positions = self.options.compact_positions

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        return encode_image(model, pixel_values, self.options)

    def prefill_layers(self) -> tuple[int, ...]:
        return self.options.drop_layers

    def select(self, context: LayerContext) -> torch.Tensor:
        return dual_attention_keep(context.attention(TEXT_QUERIES), self.options.global_thr,
                                   self.options.individual_thr, context.key_indices)

    def after_prefill(self, cache: LayerKVCache, drops: list[tuple[int, torch.Tensor]]) -> None:
        if self.options.decode_cache_policy:
            apply_output_aware_cache(cache, drops)
