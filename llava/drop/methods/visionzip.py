"""VisionZip (Yang et al., CVPR 2025, "Longer is Better but Not Necessary"): a vision-stage method.

The CLIP tower is run up to LLaVA's select layer (`vision_feature_layer`, -2). The select layer is
the encoder layer whose output LLaVA projects, and its attention says which patches matter:

- **Dominant tokens**: the `dominant` patches that the CLS query attends to most (head-averaged
  attention inside the select layer; only the CLS row is computed, from that layer's input). They
  keep their original grid order. Ties go to the earlier patch so that the set is reproducible.
- **Contextual tokens**: the remaining patches are cut into `contextual` groups. Targets are spaced
  uniformly over the remaining sequence (every `remaining // contextual`-th token, from the first);
  every other remaining token joins the target whose select-layer attention key is most similar
  (cosine of the head-averaged keys, as VisionZip scores redundancy with keys rather than hidden
  states), and each group (target + members) becomes the plain mean of its hidden states.

Vision tokens = projector([dominant] + [contextual, in target order]); CLS is dropped exactly as
LLaVA's `patch` select strategy does (and kept in front under the `full` strategy). The decoder is not
touched. With `dominant` = every patch and `contextual` = 0 the features equal the unpruned model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llava.drop.blocks import grouped_mean, nearest_centres, top_positions
from llava.drop.method import DropMethod
from llava.drop.methods.registry import register
from llava.drop.vision import (
    PATCHES_START,
    VisionOutput,
    check_feature_layer,
    cls_attention_to_patches,
    embed_patches,
    project_features,
    run_tower_to,
    selected_layer_count,
)
from llava.model.geometry import ModelGeometry

# The paper's LLaVA-1.5 settings (192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10) all share this split.
DEFAULT_DOMINANT = 54
DEFAULT_CONTEXTUAL = 10
DOMINANT_SHARE = DEFAULT_DOMINANT / (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL)


@dataclass(frozen=True)
class VisionZipOptions:
    """How many dominant and contextual tokens to keep; `budget` (their total) overrides both."""

    dominant: int = DEFAULT_DOMINANT
    contextual: int = DEFAULT_CONTEXTUAL
    budget: float | None = None  # vision tokens in all, split in the paper's 54 : 10 proportion

    def __post_init__(self):
        if self.dominant < 0:
            raise ValueError(f"dominant must be >= 0, got {self.dominant}")
        if self.contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {self.contextual}")
        if self.dominant + self.contextual < 1:
            raise ValueError(f"dominant + contextual must keep at least one token, got {self.dominant} + "
                             f"{self.contextual}")
        if self.budget is not None and (self.budget < 1 or self.budget != int(self.budget)):
            raise ValueError(f"budget must be a whole number of tokens >= 1, got {self.budget}")

    def counts(self) -> tuple[int, int]:
        """(dominant, contextual); a budget is split so that the two add up to it exactly."""
        if self.budget is None:
            return self.dominant, self.contextual
        total = int(self.budget)
        dominant = round(total * DOMINANT_SHARE)
        return dominant, total - dominant


def dominant_indices(cls_row: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` patches the CLS query attends to most, ascending (original order)."""
    return top_positions(cls_row, count)


def target_positions(remaining: int, count: int) -> torch.Tensor:
    """`count` >= 1 positions spaced uniformly over `remaining` tokens, starting at the first."""
    if count > remaining:
        raise ValueError(f"cannot pick {count} contextual targets among {remaining} remaining tokens")
    return torch.arange(count) * (remaining // count)


def contextual_groups(keys: torch.Tensor, count: int) -> torch.Tensor:
    """Group index (0..count-1) of each of the R tokens: its most key-similar uniform target."""
    return nearest_centres(keys, target_positions(keys.shape[0], count).to(keys.device))


def contextual_merge(tokens: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """Merge `tokens` [R, dim] into `count` tokens: uniform targets, key-similarity groups, group means.

    `keys` [R, key_dim] decides the groups (cosine similarity, ties to the earlier target); the result,
    one mean per group in target order, is computed in float32 and returned in `tokens`' dtype.
    """
    if count == 0:
        return tokens[:0]
    return grouped_mean(tokens, contextual_groups(keys, count), count)


@torch.no_grad()
def head_averaged_keys(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Attention keys of a CLIP layer for every token of `hidden` [1, N, dim], averaged over heads."""
    attention = layer.self_attn
    keys = attention.k_proj(layer.layer_norm1(hidden[0]))
    return keys.view(-1, attention.num_heads, attention.head_dim).mean(dim=1)


def _run_to_select_layer(model, pixel_values: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The select layer, its input and its output (the hidden states LLaVA projects)."""
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    if selected == 0:
        raise ValueError(f"vision_feature_layer {model.config.vision_feature_layer} selects the embeddings, "
                         "which have no attention to rank patches by")
    states = run_tower_to(layers, embed_patches(model.model.vision_tower, pixel_values), 0, {selected - 1, selected})
    return layers[selected - 1], states[selected - 1], states[selected]


@register
class VisionZip(DropMethod):
    """Dominant (CLS-attended) + contextual (merged) tokens out of CLIP; the decoder runs unchanged."""

    name = "visionzip"
    options_class = VisionZipOptions

    def __init__(self, options: VisionZipOptions | None = None):
        self.options = options or VisionZipOptions()

    def check_model(self, geometry: ModelGeometry) -> None:
        super().check_model(geometry)
        dominant, contextual = self.options.counts()
        if dominant + contextual > geometry.patch_tokens:
            raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the "
                             f"{geometry.patch_tokens} patches this model gives an image")

    @torch.no_grad()
    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        check_feature_layer(model.config)
        if pixel_values.shape[0] != 1:
            raise ValueError(f"VisionZip's vision stage supports batch size 1, got {pixel_values.shape[0]}")
        dominant, contextual = self.options.counts()
        layer, layer_input, hidden = _run_to_select_layer(model, pixel_values)
        patches = hidden[0, PATCHES_START:]
        if dominant + contextual > patches.shape[0]:
            raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the image's "
                             f"{patches.shape[0]} patches")
        kept = dominant_indices(cls_attention_to_patches(layer, layer_input), dominant)
        rest = torch.ones(patches.shape[0], dtype=torch.bool, device=patches.device)
        rest[kept] = False
        keys = head_averaged_keys(layer, layer_input)[PATCHES_START:]
        merged = contextual_merge(patches[rest], keys[rest], contextual)
        sequence = torch.cat([hidden[0, :PATCHES_START], patches[kept], merged])[None]
        features = project_features(model, sequence)
        cls_kept = features.shape[0] - dominant - contextual  # 1 under the `full` select strategy, else 0
        stats = {"vision_tokens_in": patches.shape[0] + cls_kept, "vision_tokens": features.shape[0],
                 "dominant": dominant, "contextual": contextual}
        return VisionOutput(features=features, stats=stats,
                            patch_groups=self.patch_groups(kept, rest, keys, contextual, cls_kept))

    @staticmethod
    def patch_groups(kept: torch.Tensor, rest: torch.Tensor, keys: torch.Tensor, contextual: int,
                     cls_kept: int) -> list[list[int]]:
        """Which patches each output token stands for, so `llava.viz` can draw what was kept."""
        rest_patches = rest.nonzero().flatten()
        groups = contextual_groups(keys[rest], contextual) if contextual else rest_patches[:0]
        merged = [rest_patches[groups == group].tolist() for group in range(contextual)]
        return [[]] * cls_kept + [[patch] for patch in kept.tolist()] + merged
