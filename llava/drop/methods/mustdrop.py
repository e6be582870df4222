"""MustDrop (Liu et al., 2024): the three stages of docs/algorithm.md as a method of the engine."""

from __future__ import annotations

import torch

from llava.drop.budget import geometric_keep_counts, mustdrop_budget_floor, ranked_keep
from llava.drop.cache import LayerKVCache
from llava.drop.config import DropConfig
from llava.drop.decode import apply_output_aware_cache
from llava.drop.methods.base import TEXT_QUERIES, DropMethod, LayerContext
from llava.drop.methods.registry import register
from llava.drop.prefill import dual_attention_keep
from llava.drop.vision import VisionOutput, encode_image
from llava.model.geometry import ModelGeometry


@register
class MustDrop(DropMethod):
    """Local spatial merge + key set in CLIP, dual attention filtering in prefill, output-aware cache.

    With `budget` set (our documented variant, not in the reference code), each dropping layer keeps a
    fixed count from a geometric schedule that reaches the target layer average, ranked by the global
    score (summed text attention), the key set always kept first. Stage 1 then merges at least the
    windows that make the budget reachable under the key-set rule (the layers before the first drop
    see every vision token, and the key set is never dropped) and at most those that keep `budget`
    tokens; between those bounds its threshold decides as usual (`budget.merge_count_bounds`).
    """

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
        attention = context.attention(TEXT_QUERIES)
        if self.options.budget is None:
            return dual_attention_keep(attention, self.options.global_thr, self.options.individual_thr,
                                       context.key_indices)
        return ranked_keep(attention.sum(dim=0), context.key_indices, self.budget_count(context))

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget below what merging every window and keeping only the key set reaches."""
        super().check_model(geometry)
        options = self.options
        if options.budget is None or not options.drop_layers:
            return
        floor = mustdrop_budget_floor(geometry.patch_tokens, options.merge_window, options.vision_merge,
                                      options.drop_layers, geometry.decoder_layers, options.key_token_rate)
        if options.budget < floor:
            how = "" if options.vision_merge else "; without --no_merge stage 1 could merge further"
            raise ValueError(f"budget {options.budget:g} is below {floor:.1f}, the lowest layer average "
                             f"it can reach with drop_layers {options.drop_layers} and key_rate "
                             f"{options.key_token_rate} on {geometry.patch_tokens} patches{how}")

    def budget_count(self, context: LayerContext) -> int:
        """Budget variant: this layer's share of a geometric schedule over the dropping layers."""
        num_layers = len(context.model.model.language_model.layers)
        key_count = 0 if context.key_indices is None else context.key_indices.numel()
        counts = geometric_keep_counts(context.prompt_vision_count, self.options.budget, self.options.drop_layers,
                                       num_layers, minimum=key_count)
        return counts[self.options.drop_layers.index(context.layer_idx)]

    def after_prefill(self, cache: LayerKVCache, drops: list[tuple[int, torch.Tensor]]) -> None:
        if self.options.decode_cache_policy:
            apply_output_aware_cache(cache, drops)
