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

LLaVA-NeXT, as the authors' released code runs it (github.com/dvlab-research/VisionZip,
`visionzip/clip_encoder.py` and `visionzip/llava_arch.py`): the base image and every crop is one CLIP
image and each is zipped on its own, with the same rule as above, into its dominant + contextual tokens.
- Counts: the released code gives every image the same counts, so an image of 1 + K crops brings
  (1 + K) x (dominant + contextual) tokens; the paper's NeXT settings 640 / 320 / 160 are its 128 / 64 /
  32 per image times the 5 images of a 2 x 2 grid. With `budget` the total is split over the image's
  actual 1 + K images (equal shares, the base image and then the first crops taking one more token when
  it does not divide), each share split 54 : 10 as above, so every image totals the budget exactly.
- Layout, "spatial_unpad" (the model's own): the base image's tokens, then the crops' dominant tokens
  placed back on the whole crop grid and read row by row across crops (no unpadding, no newline tokens:
  the released `restore_image_features_sorted` builds the grid but never appends the newlines), then
  each crop's CLS token where the select strategy keeps it, then each crop's contextual tokens, crop by
  crop. "flat": each image's tokens, base image first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llava.drop.blocks import grouped_mean, nearest_centres, top_positions
from llava.drop.image_reduction import (
    budget_shares,
    check_whole_budget,
    prompt_tower_images,
    run_to_select_layer,
    unpruned_next_count,
)
from llava.drop.method import ENCODER, DropMethod
from llava.drop.methods.registry import register
from llava.drop.timing import timed
from llava.drop.vision import (
    FLAT_MERGE,
    PATCHES_START,
    VisionOutput,
    check_feature_layer,
    cls_attention_to_patches,
    is_next,
    project_features,
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
        check_whole_budget(self.budget)

    def counts(self) -> tuple[int, int]:
        """(dominant, contextual); a budget is split so that the two add up to it exactly."""
        if self.budget is None:
            return self.dominant, self.contextual
        return split_total(int(self.budget))

    def image_counts(self, images: int) -> list[tuple[int, int]]:
        """(dominant, contextual) of each of LLaVA-NeXT's 1 + K images: the same counts for each, or the
        budget shared out over them (`budget_shares`) and each share split like `counts`."""
        if self.budget is None:
            return [self.counts()] * images
        return [split_total(share) for share in budget_shares(int(self.budget), images)]


def split_total(total: int) -> tuple[int, int]:
    """(dominant, contextual) adding up to `total`, in the paper's 54 : 10 proportion."""
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


def zip_image(layer: torch.nn.Module, layer_input: torch.Tensor, hidden: torch.Tensor, dominant: int,
              contextual: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's zipped select-layer states [1, 1 + dominant + contextual, dim] (CLS, the dominant
    patches in grid order, the contextual merges), from the select layer's input and output [1, 1 + P, dim];
    also the dominant patches, the mask of the other patches and every patch's key (for `patch_groups`)."""
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
    return sequence, kept, rest, keys


def grid_reading_order(kept: list[torch.Tensor], grid: tuple[int, int], side: int) -> torch.Tensor:
    """Order that reads the crops' dominant patches (listed crop after crop, each ascending) row by row
    across the whole crop grid, as the released code's `restore_image_features_sorted` lays them out.

    Crop c sits at grid cell divmod(c, columns); patch p at divmod(p, side) inside its crop.
    """
    columns = grid[1]
    places = []
    for crop, patches in enumerate(kept):
        crop_row, crop_column = divmod(crop, columns)
        row, column = patches // side, patches % side
        places.append((crop_row * side + row) * columns * side + crop_column * side + column)
    return torch.cat(places).argsort()


def spatial_features(projected: list[torch.Tensor], counts: list[tuple[int, int]], cls_kept: int,
                     order: torch.Tensor) -> torch.Tensor:
    """The released code's "spatial_unpad" sequence from each image's projected tokens [(CLS) + dominant +
    contextual, hidden]: the base image's, then every crop's dominant tokens in `order` (grid reading
    order), then the crops' CLS tokens (if kept), then their contextual tokens, crop by crop."""
    crops = list(zip(projected[1:], counts[1:]))
    dominant = torch.cat([tokens[cls_kept : cls_kept + d] for tokens, (d, _) in crops])[order]
    cls = torch.cat([tokens[:cls_kept] for tokens, _ in crops])
    contextual = torch.cat([tokens[cls_kept + d :] for tokens, (d, _) in crops])
    return torch.cat([projected[0], dominant, cls, contextual])


@register
class VisionZip(DropMethod):
    """Dominant (CLS-attended) + contextual (merged) tokens out of CLIP; the decoder runs unchanged."""

    name = "visionzip"
    family = ENCODER
    options_class = VisionZipOptions
    supports_next = True

    def __init__(self, options: VisionZipOptions | None = None):
        self.options = options or VisionZipOptions()

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse more tokens than an image has patches; on LLaVA-NeXT for the budget's share of an image
        tiled into the most crops (an image with fewer crops is checked when it arrives)."""
        super().check_model(geometry)
        dominant, contextual = self.options.image_counts(1 + geometry.max_crops)[0]
        if dominant + contextual > geometry.patch_tokens:
            raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the "
                             f"{geometry.patch_tokens} patches this model gives an image")

    def encode_images(self, model, pixel_values: list[torch.Tensor],
                      image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
        return self.zip_prompts(model, pixel_values, image_sizes, is_next(model))

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        return self.zip_prompts(model, [pixel_values], [None], tiled=False)[0]

    def encode_next(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        return self.zip_prompts(model, [pixel_values], [image_sizes], tiled=True)[0]

    @torch.no_grad()
    def zip_prompts(self, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
                    tiled: bool) -> list[VisionOutput]:
        """All prompts' tower images (their images, or `tiled`: base images and crops) through CLIP as one
        batch; then every tower image is zipped on its own."""
        check_feature_layer(model.config)
        tower_images, grids = prompt_tower_images("VisionZip", model, pixel_values, image_sizes, tiled)
        layer, layer_input, hidden = run_to_select_layer(model, torch.cat(tower_images))
        outputs, first = [], 0
        for images, sizes, grid in zip(tower_images, image_sizes, grids):
            mine = slice(first, first + images.shape[0])
            first += images.shape[0]
            outputs.append(self.zip_one(model, layer, layer_input[mine], hidden[mine]) if grid is None
                           else self.zip_next(model, layer, layer_input[mine], hidden[mine], sizes, grid))
        return outputs

    def zip_one(self, model, layer, layer_input: torch.Tensor, hidden: torch.Tensor) -> VisionOutput:
        """A LLaVA-1.5 image zipped from its select layer's input and output [1, 1 + P, dim]."""
        dominant, contextual = self.options.counts()
        (sequence, kept, rest, keys), seconds = timed(
            lambda: zip_image(layer, layer_input, hidden, dominant, contextual), hidden.device)
        features = project_features(model, sequence)
        cls_kept = features.shape[0] - dominant - contextual  # 1 under the `full` select strategy, else 0
        stats = {"vision_tokens_in": hidden.shape[1] - PATCHES_START + cls_kept, "vision_tokens": features.shape[0],
                 "dominant": dominant, "contextual": contextual}
        return VisionOutput(features=features, stats=stats, selection_seconds=seconds,
                            patch_groups=self.patch_groups(kept, rest, keys, contextual, cls_kept))

    def zip_next(self, model, layer, layer_input: torch.Tensor, hidden: torch.Tensor, image_sizes: torch.Tensor,
                 grid: tuple[int, int]) -> VisionOutput:
        """A LLaVA-NeXT image, every tower image (base, then crops) zipped on its own, laid out as the released
        code does (module docstring): crops' dominant tokens in grid reading order under "spatial_unpad",
        image after image under "flat"."""
        counts = self.options.image_counts(hidden.shape[0])
        zipped, seconds = timed(lambda: [
            zip_image(layer, layer_input[image : image + 1], hidden[image : image + 1], dominant, contextual)
            for image, (dominant, contextual) in enumerate(counts)], hidden.device)
        projected = [project_features(model, sequence) for sequence, *_ in zipped]
        cls_kept = projected[0].shape[0] - sum(counts[0])  # 1 under the `full` select strategy, else 0
        side = math.isqrt(hidden.shape[1] - PATCHES_START)
        if getattr(model.config, "mm_patch_merge_type", None) == FLAT_MERGE:
            features = torch.cat(projected)
        else:
            kept = [dominant_kept for _, dominant_kept, *_ in zipped[1:]]
            features = spatial_features(projected, counts, cls_kept, grid_reading_order(kept, grid, side))
        per_image = side * side + cls_kept
        stats = {"vision_tokens_in": unpruned_next_count(model, image_sizes, grid, per_image, side),
                 "vision_tokens": features.shape[0], "images": len(counts), "crops": len(counts) - 1,
                 "vision_tokens_per_image_in": per_image, "dominant": sum(d for d, _ in counts),
                 "contextual": sum(c for _, c in counts)}
        return VisionOutput(features=features, stats=stats, selection_seconds=seconds)

    @staticmethod
    def patch_groups(kept: torch.Tensor, rest: torch.Tensor, keys: torch.Tensor, contextual: int,
                     cls_kept: int) -> list[list[int]]:
        """Which patches each output token stands for, so `llava.viz` can draw what was kept."""
        rest_patches = rest.nonzero().flatten()
        groups = contextual_groups(keys[rest], contextual) if contextual else rest_patches[:0]
        merged = [rest_patches[groups == group].tolist() for group in range(contextual)]
        return [[]] * cls_kept + [[patch] for patch in kept.tolist()] + merged
