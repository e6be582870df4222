"""MustDrop (Liu et al., 2024), all three stages of docs/algorithm.md in one method of the engine.

- Options: `DropConfig`, every knob with the reference code's defaults and validation. Constants the
  reference hard-codes are fields so that they can be studied, but a user who only passes
  `--sparse --global_thr G --individual_thr I` gets the paper.
- Vision stage: the local spatial merge after the first CLIP layer and the CLS-attention key set; on
  LLaVA-NeXT the base image and its crops as one batch, in the reference's flat layout or (ours) in the
  model's own spatial_unpad layout with its newline tokens.
- Prefill stage: dual attention filtering at the dropping layers (the key set is never dropped).
- Decode stage: the output-aware KV-cache policy.
- Budget variant (ours, not the reference's): fixed keep counts per dropping layer from a geometric
  schedule that reaches a target layer-averaged count, and the merge bounds that make it reachable.
  `keep_fraction` F is that variant at a budget of round(F * V), V the image's vision tokens before stage 1
  (`MustDrop.count_in`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange

from llava.drop.blocks import (
    bisect,
    check_budget,
    check_drop_after,
    check_keep_fraction,
    check_share,
    last_count_nudges,
    layer_average,
    planned,
    ranked_keep_mask,
    stable_top_k,
    stage_lengths,
    top_positions,
)
from llava.drop.cache import KVCache
from llava.drop.method import MULTI_STAGE, TEXT_QUERIES, DropMethod, LayerContext
from llava.drop.methods.registry import OptionAlias, register, same
from llava.drop.next_layout import NEWLINE, CropGrid, crop_grid, spatial_order, token_anchors
from llava.drop.timing import timed
from llava.drop.vision import (
    PATCHES_START,
    VisionOutput,
    check_feature_layer,
    check_next_inputs,
    cls_attention_to_patches,
    embed_patches,
    encode_images_together,
    is_next,
    is_qwen,
    project_batch,
    run_tower_to,
    selected_layer_count,
    vision_token_offset,
)
from llava.model.geometry import QWEN_FAMILY, ModelGeometry, decoder_layer_count, geometry_of_model

# Stage 1 (vision encoding), fixed in the reference code.
MERGE_AFTER_LAYER = 0
MERGE_WINDOW = 3
MERGE_THRESHOLD = 0.8
KEY_SHARE = 0.08
# Stage 2 (prefill), fixed in the reference code.
DROP_AFTER = (2, 6, 10, 14)
# Defaults when --sparse comes without thresholds: stage 2 then drops nothing.
DEFAULT_GLOBAL_THR = 1.0
DEFAULT_INDIVIDUAL_THR = 0.0
# LLaVA-NeXT feature layouts under MustDrop: the reference's flat one, or the model's own spatial_unpad (ours).
FLAT_LAYOUT, SPATIAL_LAYOUT = "flat", "spatial"
NEXT_LAYOUTS = (FLAT_LAYOUT, SPATIAL_LAYOUT)
# Window layout on the patch grid: grid rows/cols split into (window index, offset inside the window).
WINDOW_PATTERN = "... (gh wh gw ww) d -> ... (gh gw) (wh ww) d"
WINDOW_MASK_PATTERN = "(gh gw) (wh ww) -> (gh wh gw ww)"


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value}")


@dataclass(frozen=True)
class DropConfig:
    """MustDrop's settings. `enabled=False` (no `--sparse`) leaves the model untouched. In the one vocabulary
    of docs/method_options.md: `drop_after` lists the 0-based decoder layers stage 2 drops after, `key_share`
    is the share of patches in the key set; the names they had before, `drop_layers` and `key_token_rate`,
    are aliases (values unchanged). The CLIs' flags stay the reference's: --drop_layers, --key_rate."""

    option_aliases: ClassVar[dict[str, OptionAlias]] = {
        "drop_layers": OptionAlias("drop_after", tuple[int, ...], same, "drop_after = drop_layers"),
        "key_token_rate": OptionAlias("key_share", float, same, "key_share = key_token_rate"),
    }
    enabled: bool = True
    # Stage 1: local spatial merge after the first CLIP layer, and the CLS-attention key set.
    vision_merge: bool = True
    merge_window: int = MERGE_WINDOW
    merge_threshold: float = MERGE_THRESHOLD
    key_share: float = KEY_SHARE
    # Stage 2: dual attention filtering after these decoder layers (0-based).
    drop_after: tuple[int, ...] = DROP_AFTER
    global_thr: float = DEFAULT_GLOBAL_THR
    individual_thr: float = DEFAULT_INDIVIDUAL_THR
    budget: float | None = None  # target layer-averaged vision tokens: rank by global score instead of thresholds
    keep_fraction: float | None = None  # instead of budget: this share of the image's vision tokens as its budget
    compact_positions: bool = True  # the reference gives the shorter sequence positions 0..len-1
    # Stage 3: shrink the KV caches of layers drop_after[0]..drop_after[-1] to the final token set.
    decode_cache_policy: bool = True
    # LLaVA-NeXT: "flat" (base image, then each crop, all the same length) as the reference ran it, or
    # "spatial" (ours): the model's own layout, crops unpadded as one grid with a newline after each row.
    next_layout: str = FLAT_LAYOUT

    def __post_init__(self):
        _check_unit_interval("global_thr", self.global_thr)
        _check_unit_interval("individual_thr", self.individual_thr)
        check_share("key_share", self.key_share)
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold is a cosine similarity and must be in [-1, 1], got {self.merge_threshold}")
        if self.merge_window < 1:
            raise ValueError(f"merge_window must be >= 1, got {self.merge_window}")
        check_budget(self.budget)
        check_keep_fraction(self.keep_fraction, self.budget)
        if self.next_layout not in NEXT_LAYOUTS:
            raise ValueError(f"next_layout must be one of {', '.join(NEXT_LAYOUTS)}, got {self.next_layout!r}")
        check_drop_after(self.drop_after, may_be_empty=True)

    @classmethod
    def disabled(cls) -> "DropConfig":
        return cls(enabled=False)


# Stage 1: local spatial merge and key set.

def patch_grid_side(num_patches: int, window: int) -> int:
    """Side of the square patch grid; the merge needs it to be cut exactly into windows."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"{num_patches} patch tokens do not form a square grid")
    if side % window != 0:
        raise ValueError(f"a {side} x {side} patch grid cannot be cut into {window} x {window} windows")
    return side


def window_similarity(patches: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """Mean cosine similarity over ordered pairs of distinct tokens, per window (row-major windows).

    `patches` is [..., grid * grid, dim] in row-major grid order; the result is [..., num_windows],
    computed in float32 so that half-precision models score the same as fp32 ones.
    """
    tokens_per_window = window * window
    if tokens_per_window < 2:
        raise ValueError(f"a {window} x {window} window has no pair of distinct tokens to compare")
    windows = rearrange(patches.float(), WINDOW_PATTERN, wh=window, ww=window, gh=grid // window)
    unit = F.normalize(windows, dim=-1)
    cosine = unit @ unit.transpose(-1, -2)
    off_diagonal = ~torch.eye(tokens_per_window, dtype=torch.bool, device=cosine.device)
    pair_count = tokens_per_window * (tokens_per_window - 1)
    return cosine.masked_fill(~off_diagonal, 0.0).sum(dim=(-1, -2)) / pair_count


def merge_windows_per_image(
    hidden: torch.Tensor, threshold: float, window: int, count_bounds: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MustDrop's local spatial merge on a batch of images [B, 1 + num_patches, dim] (CLS first) with one r
    for all of them: each image becomes `[CLS] + [merged tokens, best window first] + [tokens of unmerged
    windows, grid order]`. `count_bounds` (least, most) clamps r, for the budget variant.

    r is the fewest windows any image has at or above `threshold` (the reference's batch rule, which
    keeps the batch rectangular); each image then merges its own top-r windows. Returns the merged
    batch and each image's merged windows [B, r], best first.
    """
    scores = window_scores(hidden, window)
    r = min(windows_over_threshold(scores, threshold, count_bounds))
    return merge_top_windows(hidden, scores, r, window)


def windows_over_threshold(scores: list[torch.Tensor], threshold: float,
                           count_bounds: tuple[int, int] | None = None) -> list[int]:
    """Each image's count of windows scoring at or above `threshold`, clamped to `count_bounds` (least, most)
    when given: one host synchronisation for the batch."""
    counts = (torch.stack(scores) >= threshold).sum(dim=1).tolist()
    if count_bounds is None:
        return counts
    return [min(max(count, count_bounds[0]), count_bounds[1]) for count in counts]


def merge_top_windows(hidden: torch.Tensor, scores: list[torch.Tensor], r: int,
                      window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of [B, 1 + num_patches, dim] merges its r best windows (ties: window order): the merged batch
    and each image's merged windows [B, r], best first."""
    grid = patch_grid_side(hidden.shape[1] - PATCHES_START, window)
    tops = torch.stack([stable_top_k(image_scores, r) for image_scores in scores])
    if r == 0:
        return hidden, tops
    return torch.stack([merge_image_windows(image, top, grid, window) for image, top in zip(hidden, tops)]), tops


def window_scores(hidden: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Each image's window scores [num_windows] of a batch [B, 1 + num_patches, dim], scored one image at
    a time as with batch size 1; stable descending order of these is the order windows merge in."""
    patches = hidden[:, PATCHES_START:]
    grid = patch_grid_side(patches.shape[1], window)
    return [window_similarity(image, grid, window) for image in patches]


def merge_image_windows(sequence: torch.Tensor, top: torch.Tensor, grid: int, window: int) -> torch.Tensor:
    """One image's [1 + num_patches, dim] as `[CLS] + [mean of each window in top] + [the other windows'
    tokens, grid order]`: the merged sequence's order, which the key set and patch groups index."""
    cls, patches = sequence[:PATCHES_START], sequence[PATCHES_START:]
    windows = rearrange(patches, WINDOW_PATTERN, wh=window, ww=window, gh=grid // window)
    merged = windows[top].float().mean(dim=1).to(sequence.dtype)
    merged_window = torch.zeros(windows.shape[0], dtype=torch.bool, device=sequence.device)
    merged_window[top] = True
    in_merged_window = rearrange(merged_window[:, None].expand(-1, window * window), WINDOW_MASK_PATTERN,
                                 wh=window, ww=window, gh=grid // window)
    return torch.cat([cls, merged, patches[~in_merged_window]], dim=0)


def window_patches(window_index: int, grid: int, window: int) -> list[int]:
    """Row-major grid patches of one row-major window, in row-major order inside the window."""
    row, col = divmod(window_index, grid // window)
    return [(row * window + i) * grid + col * window + j for i in range(window) for j in range(window)]


def merged_patch_groups(merged_windows: list[int], num_patches: int, window: int) -> list[list[int]]:
    """Patches behind each token after the merge: each merged window (in merge order), then the
    patches of the unmerged windows one by one in grid order, matching `merge_windows`' sequence."""
    grid = math.isqrt(num_patches)
    groups = [window_patches(index, grid, window) for index in merged_windows]
    covered = {patch for group in groups for patch in group}
    return groups + [[patch] for patch in range(num_patches) if patch not in covered]


def top_key_indices(attn_row: torch.Tensor, rate: float) -> torch.Tensor:
    """Positions of the `ceil(rate * len(attn_row))` most attended patches, ascending (ties to the earlier)."""
    return top_positions(attn_row, math.ceil(rate * attn_row.numel()))


# The budget variant's bounds (least, most) on r, from the model, the options and the layer-0 output.
MergeBounds = Callable[[object, DropConfig, torch.Tensor], tuple[int, int]]


def run_to_merge(model, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tower's layers up to the merge point: the hidden states there and their `hidden_states` index."""
    layers = model.model.vision_tower.encoder.layers
    merge_index = MERGE_AFTER_LAYER + 1
    if selected_layer_count(len(layers), model.config.vision_feature_layer) < merge_index:
        raise ValueError(f"vision_feature_layer {model.config.vision_feature_layer} selects features from "
                         "before the merge")
    return run_tower_to(layers, hidden, 0, {merge_index})[merge_index], merge_index


@dataclass
class TowerPass:
    """Stage 1's pass through the tower for a batch of images: what features and key set come from."""

    feature_states: torch.Tensor  # hidden states of the feature layer, [B, 1 + tokens per image, dim]
    key_states: torch.Tensor  # hidden states entering the tower's last layer, same shape
    merged_windows: torch.Tensor  # [B, r], each image's merged windows, best first
    num_patches: int  # patches per image before the merge
    merge_seconds: float = 0.0


def finish_tower(model, hidden: torch.Tensor, start: int, merged_windows: torch.Tensor, num_patches: int) -> TowerPass:
    """Run on from `hidden_states[start]` to the feature layer and the last layer's input (the key set is
    scored there)."""
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    key_input = len(layers) - 1  # hidden_states index of the input to the tower's last layer
    states = run_tower_to(layers, hidden, start, {selected, key_input})
    return TowerPass(states[selected], states[key_input], merged_windows, num_patches)


def run_mustdrop_tower(model, pixel_values: torch.Tensor, drop: DropConfig, merge_bounds: MergeBounds) -> TowerPass:
    """Embed a batch of images, merge after layer 0 when asked with one r for all of them (bounded by
    `merge_bounds` under a budget), and run on (LLaVA-NeXT's base image and crops)."""
    hidden = embed_patches(model.model.vision_tower, pixel_values)
    num_patches = hidden.shape[1] - PATCHES_START
    start, merged_windows, merge_seconds = 0, torch.empty(hidden.shape[0], 0, dtype=torch.long), 0.0
    if drop.vision_merge:
        hidden, start = run_to_merge(model, hidden)
        bounds = merge_bounds(model, drop, hidden) if drop.budget is not None else None
        (hidden, merged_windows), merge_seconds = timed(
            lambda: merge_windows_per_image(hidden, drop.merge_threshold, drop.merge_window, bounds), hidden.device)
    tower = finish_tower(model, hidden, start, merged_windows, num_patches)
    tower.merge_seconds = merge_seconds
    return tower


def image_key_indices(model, key_states: torch.Tensor, rate: float) -> torch.Tensor:
    """One image's key set: its most CLS-attended patches at the tower's last layer (`key_states` [1, N, dim])."""
    return top_key_indices(cls_attention_to_patches(model.model.vision_tower.encoder.layers[-1], key_states), rate)


@torch.no_grad()
def encode_mustdrop(model, pixel_values: torch.Tensor, drop: DropConfig) -> VisionOutput:
    """Stage 1 (docs/algorithm.md) on one LLaVA-1.5 image: optional merge after layer 0, features as usual,
    CLS-attention key set."""
    if pixel_values.shape[0] != 1:
        raise ValueError(f"MustDrop's vision stage supports batch size 1, got {pixel_values.shape[0]}")
    return encode_mustdrop_images(model, [pixel_values], drop)[0]


@torch.no_grad()
def encode_mustdrop_images(model, pixel_values: list[torch.Tensor], drop: DropConfig) -> list[VisionOutput]:
    """Stage 1 on several prompts' LLaVA-1.5 images ([1, 3, H, W] each), each as it is alone: every image
    runs layer 0 and scores its windows in one batch, picks its own r, and the images that merge the same
    number of windows run the rest of the tower together (their sequences have one length, so nothing is
    padded and no number changes). The selection time is shared equally among the prompts."""
    check_feature_layer(model.config)
    hidden = embed_patches(model.model.vision_tower, torch.cat(pixel_values))
    num_patches = hidden.shape[1] - PATCHES_START
    counts, start, scores, selection_seconds = [0] * hidden.shape[0], 0, None, 0.0
    if drop.vision_merge:
        hidden, start = run_to_merge(model, hidden)
        bounds = uniform_merge_bounds(model, drop, hidden[:1]) if drop.budget is not None else None
        scores, seconds = timed(lambda: window_scores(hidden, drop.merge_window), hidden.device)
        counts, count_seconds = timed(lambda: windows_over_threshold(scores, drop.merge_threshold, bounds),
                                      hidden.device)
        selection_seconds += seconds + count_seconds
    outputs: list[VisionOutput | None] = [None] * len(counts)
    for r in sorted(set(counts)):
        members = [n for n, count in enumerate(counts) if count == r]
        group, tops = hidden[members], torch.empty(len(members), 0, dtype=torch.long)
        if scores is not None:
            (group, tops), seconds = timed(
                lambda: merge_top_windows(group, [scores[n] for n in members], r, drop.merge_window), hidden.device)
            selection_seconds += seconds
        tower = finish_tower(model, group, start, tops, num_patches)
        encoded, seconds = timed(lambda: mustdrop_outputs(model, tower, drop), hidden.device)
        selection_seconds += seconds
        for n, output in zip(members, encoded):
            outputs[n] = output
    for output in outputs:
        output.selection_seconds = selection_seconds / len(outputs)
    return outputs


def mustdrop_outputs(model, tower: TowerPass, drop: DropConfig) -> list[VisionOutput]:
    """Each image's features, key set (its most CLS-attended patches), statistics and patch groups."""
    offset = vision_token_offset(model.config)
    outputs = []
    merged_per_image = tower.merged_windows.tolist()  # one read for the group's pictures and statistics
    for image, features in enumerate(project_batch(model, tower.feature_states)):
        key_indices = image_key_indices(model, tower.key_states[image : image + 1], drop.key_share) + offset
        merged_windows = merged_per_image[image]
        stats = {"vision_tokens_in": tower.num_patches + offset, "vision_tokens": features.shape[0],
                 "merged_windows": len(merged_windows), "key_tokens": key_indices.numel()}
        patch_groups = [[]] * offset + merged_patch_groups(merged_windows, tower.num_patches, drop.merge_window)
        outputs.append(VisionOutput(features=features, key_indices=key_indices, stats=stats, patch_groups=patch_groups))
    return outputs


def flat_key_indices(model, key_states: torch.Tensor, rate: float, tokens_per_image: int, offset: int) -> torch.Tensor:
    """Every image's key set, image i's shifted by i * tokens_per_image so that it indexes the flat span."""
    return torch.cat([image_key_indices(model, key_states[i : i + 1], rate) + offset + i * tokens_per_image
                      for i in range(key_states.shape[0])])


@dataclass
class NextPass:
    """Stage 1 on LLaVA-NeXT's base image and crops, in the flat layout both NeXT layouts start from."""

    tower: TowerPass
    per_image: torch.Tensor  # [1 + K, tokens per image, llm_hidden], the same count for every image
    key_indices: torch.Tensor  # every image's key set, positions in the flat span
    key_seconds: float

    @property
    def images(self) -> int:
        return self.per_image.shape[0]

    @property
    def selection_seconds(self) -> float:
        return self.tower.merge_seconds + self.key_seconds


def run_next_pass(model, pixel_values: torch.Tensor, drop: DropConfig, merge_bounds: MergeBounds | None = None,
                  offset: int = 0) -> NextPass:
    """The base image and its crops ([1, 1 + K, 3, H, W]) through the tower as one batch, all merging the
    same r windows; projected features and key sets per image (`offset`: where patch 0 sits)."""
    tower = run_mustdrop_tower(model, pixel_values[0], drop, merge_bounds or uniform_merge_bounds)
    per_image = project_batch(model, tower.feature_states)
    key_indices, key_seconds = timed(
        lambda: flat_key_indices(model, tower.key_states, drop.key_share, per_image.shape[1], offset),
        tower.key_states.device)
    return NextPass(tower, per_image, key_indices, key_seconds)


def next_stats(stage: NextPass, tokens_in: int, tokens: int, key_tokens: int, per_image_in: float,
               per_image: float) -> dict:
    """Stage 1's figures on LLaVA-NeXT: totals over the 1 + K images, and per image."""
    images = stage.images
    return {"vision_tokens_in": tokens_in, "vision_tokens": tokens, "images": images, "crops": images - 1,
            "vision_tokens_per_image_in": per_image_in, "vision_tokens_per_image": per_image,
            "merged_windows": stage.tower.merged_windows.shape[1], "key_tokens": key_tokens}


@torch.no_grad()
def encode_mustdrop_next(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor, drop: DropConfig) -> VisionOutput:
    """Stage 1 on LLaVA-NeXT in the reference's flat layout: the base image and its crops
    ([1, 1 + K, 3, H, W]) go through the tower as one batch, all merging the same r windows, and their
    features are concatenated in order (no unpad, no newline tokens)."""
    check_feature_layer(model.config)
    check_next_inputs(pixel_values, image_sizes)
    offset = vision_token_offset(model.config)
    stage = run_next_pass(model, pixel_values, drop, offset=offset)
    per_image_in, per_image = stage.tower.num_patches + offset, stage.per_image.shape[1]
    stats = next_stats(stage, stage.images * per_image_in, stage.images * per_image, stage.key_indices.numel(),
                       per_image_in, per_image)
    return VisionOutput(features=stage.per_image.flatten(0, 1), key_indices=stage.key_indices, stats=stats,
                        selection_seconds=stage.selection_seconds)


def spatial_selection(grid: CropGrid, merged_windows: torch.Tensor, num_patches: int, window: int) -> torch.Tensor:
    """The spatial sequence as indices into `[flat span] + [newline]`: the base image's tokens as they
    are (LLaVA-1.5's order), then the crops' tokens each at its window's place in the unpadded crop grid,
    a newline (index images * tokens per image) after every row.

    `merged_windows` [1 + K, r] are each image's merged windows; a crop's token sequence follows
    `merged_patch_groups`, which says which patches each token stands for and hence where it goes.
    """
    images, tokens_per_image = merged_windows.shape[0], num_patches - (window * window - 1) * merged_windows.shape[1]
    groups = [merged_patch_groups(top.tolist(), num_patches, window) for top in merged_windows[1:]]
    order = spatial_order(grid, token_anchors(grid, groups))
    crops_part = torch.where(order == NEWLINE, images * tokens_per_image, order + tokens_per_image)
    return torch.cat([torch.arange(tokens_per_image), crops_part])


def spatial_key_indices(selection: torch.Tensor, flat_keys: torch.Tensor, newline: int) -> torch.Tensor:
    """The key set in the spatial sequence (ascending): every flat key token that the unpad kept, at its
    new place, and every newline token, so that stages 2 and 3 never drop a row's end."""
    position = torch.full((newline + 1,), -1, dtype=torch.long)
    position[selection] = torch.arange(selection.numel())
    keys = position[flat_keys.cpu()]
    newlines = (selection == newline).nonzero().flatten()
    return torch.cat([keys[keys >= 0], newlines]).sort().values


@torch.no_grad()
def encode_mustdrop_spatial(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor,
                            drop: DropConfig) -> VisionOutput:
    """Stage 1 on LLaVA-NeXT in the model's own spatial_unpad layout (our extension): the flat pass
    (one r for the base image and its crops), then the base image's tokens, and the crops' tokens placed
    where their windows were in the crop grid, unpadded as the model does, with a newline after each row.
    Newline tokens join the key set, so stages 2 and 3 keep them. The images no longer keep equal counts:
    the per-image figures are the totals divided by 1 + K."""
    check_feature_layer(model.config)
    check_next_inputs(pixel_values, image_sizes)
    if vision_token_offset(model.config):
        raise ValueError("--next_layout spatial needs the CLS token dropped (vision_feature_select_strategy "
                         f"'default'), got {model.config.vision_feature_select_strategy!r}")
    grid = crop_grid(model.config, image_sizes[0].tolist())
    if pixel_values.shape[1] != 1 + grid.crops:
        raise ValueError(f"an image of size {image_sizes[0].tolist()} is tiled into {grid.crops} crops, got pixel "
                         f"values for {pixel_values.shape[1] - 1}")
    stage = run_next_pass(model, pixel_values, drop, partial(spatial_merge_bounds, grid))
    selection = spatial_selection(grid, stage.tower.merged_windows.cpu(), stage.tower.num_patches, drop.merge_window)
    newline = stage.per_image.shape[0] * stage.per_image.shape[1]
    flat = stage.per_image.flatten(0, 1)
    features = torch.cat([flat, model.model.image_newline[None].to(flat)])[selection.to(flat.device)]
    key_indices = spatial_key_indices(selection, stage.key_indices, newline).to(stage.key_indices.device)
    tokens_in, tokens = stage.tower.num_patches + grid.kept.numel() + grid.rows, features.shape[0]
    stats = next_stats(stage, tokens_in, tokens, key_indices.numel(), tokens_in / stage.images, tokens / stage.images)
    stats["key_newlines"] = grid.rows
    return VisionOutput(features=features, key_indices=key_indices, stats=stats, selection_seconds=stage.selection_seconds)


# Stage 2: dual attention filter.

def dual_attention_keep(
    attention: torch.Tensor, global_thr: float, individual_thr: float, key_mask: torch.Tensor | None,
    valid: torch.Tensor,
) -> torch.Tensor:
    """Which vision tokens each prompt keeps, [N, V] from its attention [N, text queries, V] (zero outside
    its own rows and tokens): drop j only if BOTH its summed attention over text queries is below
    `global_thr` times the total AND its largest single attention is below `individual_thr`; the key set
    is never dropped."""
    global_score = attention.sum(dim=1)
    individual_score = attention.max(dim=1).values
    total = global_score.sum(dim=1, keepdim=True)
    dropped = (global_score < global_thr * total) & (individual_score < individual_thr)
    keep = valid & ~dropped
    return keep if key_mask is None else keep | key_mask


# Stage 3: output-aware KV cache. After prefill, layer l's cache holds the tokens that entered layer l.
# Every layer from the first through the last dropping layer is cut down to the tokens that survived
# all prefill drops, so decoding attends to the same final token set in those layers. Layers before
# the first drop keep the full prompt; layers after the last drop already hold the final set.

def compose_keeps(keeps: list[torch.Tensor]) -> torch.Tensor:
    """Map successive keep lists (each indexing the sequence left by the previous) to the first one's
    coordinates: the positions, in the sequence before `keeps[0]`, of the tokens left after the last."""
    composed = keeps[-1]
    for keep in reversed(keeps[:-1]):
        composed = keep[composed]
    return composed


def apply_output_aware_cache(cache: KVCache, drops: list[tuple[int, list[torch.Tensor]]]) -> None:
    """Shrink every prompt's caches of layers drops[0].layer .. drops[-1].layer to its final token set.

    `drops` lists (dropping layer, each prompt's sequence keep positions) in layer order, as prefill made them.
    """
    if not drops:
        return
    first_layer, last_layer = drops[0][0], drops[-1][0]
    prompts = len(drops[0][1])
    for layer_idx in range(first_layer, last_layer + 1):
        later = [keeps for drop_layer, keeps in drops if drop_layer >= layer_idx]
        cache.keep(layer_idx, [compose_keeps([keeps[n] for keeps in later]) for n in range(prompts)])


# Budget variant: layer l sees the vision count of its stage; a geometric schedule k_i = V * rho^i
# (each drop keeps the same share of what is left), rho solved by bisection, then rounded so that
# the integer layer average is closest to the target.

@planned
def geometric_keep_counts(
    vision_count: int, budget: float, drop_after: tuple[int, ...], num_layers: int, minimum: int = 0
) -> list[int]:
    """Tokens to keep after each drop so that the layer average is as close to `budget` as integers allow.

    No count goes below `minimum` (e.g. the key set, which is never dropped); when even that floor
    averages above the budget, the floor is returned and the budget cannot be met for this image.
    """
    lengths = stage_lengths(drop_after, num_layers)
    if budget >= vision_count:
        return [vision_count] * len(drop_after)

    def counts_for(rho: float) -> list[float]:
        return [vision_count] + [max(minimum, vision_count * rho**i) for i in range(1, len(lengths))]

    low, _ = bisect(lambda rho: layer_average(counts_for(rho), lengths) < budget, 0.0, 1.0)
    counts = [round(count) for count in counts_for(low)[1:]]

    def error(candidate: list[int]) -> float:
        return abs(layer_average([vision_count, *candidate], lengths) - budget)

    ceiling = counts[-2] if len(counts) > 1 else vision_count
    return min([counts, *last_count_nudges(counts, minimum, ceiling)], key=error)


def merge_count_bounds(
    num_patches: int, window: int, budget: float, drop_after: tuple[int, ...], num_layers: int, key_rate: float,
    images: int = 1,
) -> tuple[int, int]:
    """How many windows MustDrop's stage 1 must merge (at least) and may merge (at most) for a budget.

    Each merged window turns window^2 tokens into one. Merging too few leaves so many tokens that the
    layers up to the first drop plus the key set (never dropped) already average above the budget;
    merging too many leaves fewer tokens than the budget. Within the bounds the threshold decides.
    With `images` merging the same r windows each (LLaVA-NeXT's flat layout), the budget is their total.
    """
    per_image = merged_counts(num_patches, window)
    return bounds_from_counts([images * count for count in per_image],
                              [images * math.ceil(key_rate * count) for count in per_image],
                              budget, stage_lengths(drop_after, num_layers))


def merged_counts(num_patches: int, window: int) -> list[int]:
    """The tokens one image keeps after merging r windows, for r = 0 up to every window."""
    return [num_patches - (window * window - 1) * r for r in range(num_patches // (window * window) + 1)]


def bounds_from_counts(counts: list[int], key_counts: list[int], budget: float, lengths: list[int]) -> tuple[int, int]:
    """`merge_count_bounds` from what merging r windows leaves, r = 0, 1, ...: `counts[r]` vision tokens
    (never rising with r), of which `key_counts[r]` form the key set. At most the most merges that keep
    `budget` tokens; at least the fewest whose key-set floor is within the budget (every merge when none is)."""
    most = max((r for r, count in enumerate(counts) if count >= budget), default=0)
    least = next((r for r, (count, keys) in enumerate(zip(counts, key_counts))
                  if key_set_floor(count, keys, lengths) <= budget), len(counts) - 1)
    return min(least, most), most


def key_set_floor(vision_count: int, key_count: int, lengths: list[int]) -> float:
    """The lowest layer average MustDrop can reach from `vision_count` tokens: every layer up to the first
    drop sees them all, every later one at least the `key_count` key tokens, which are never dropped."""
    return layer_average([vision_count] + [key_count] * (len(lengths) - 1), lengths)


def mustdrop_budget_floor(num_patches: int, window: int, merge: bool, drop_after: tuple[int, ...], num_layers: int,
                          key_rate: float, images: int = 1, newlines: int = 0) -> float:
    """The smallest budget MustDrop's budget variant can reach: stage 1 merging every window (when
    merging is on) in each of `images` images, then only the key set left after the first drop; `newlines`
    (LLaVA-NeXT's spatial layout) count as vision tokens that are always kept."""
    per_image = num_patches - (num_patches // (window * window) * (window * window - 1) if merge else 0)
    return key_set_floor(images * per_image + newlines, images * math.ceil(key_rate * per_image) + newlines,
                         stage_lengths(drop_after, num_layers))


def uniform_merge_bounds(model, drop: DropConfig, hidden: torch.Tensor) -> tuple[int, int]:
    """Bounds on r when every image of the batch keeps the same count (LLaVA-1.5, LLaVA-NeXT's flat layout)."""
    return merge_count_bounds(hidden.shape[1] - PATCHES_START, drop.merge_window, drop.budget, drop.drop_after,
                              decoder_layer_count(model), drop.key_share, images=hidden.shape[0])


def crop_window_savings(grid: CropGrid, window: int) -> torch.Tensor:
    """[crops, windows]: tokens that merging each window of each crop saves in the spatial layout, i.e. its
    patches that survive the unpad less the one merged token (0 for a window wholly in the padding)."""
    surviving = rearrange(grid.surviving().long()[..., None], WINDOW_PATTERN, wh=window, ww=window,
                          gh=grid.side // window)[..., 0].sum(dim=-1)
    return (surviving - 1).clamp(min=0)


def spatial_merge_bounds(grid: CropGrid, model, drop: DropConfig, hidden: torch.Tensor) -> tuple[int, int]:
    """Bounds on r in the spatial layout, from the windows each image would merge first.

    A merged window saves window^2 - 1 tokens in the base image but only `crop_window_savings` in a crop,
    so the tokens left after merging r windows depend on which windows rank first: counted exactly, from
    the ranking the merge uses. The key set is counted as if no key token fell into the padding, plus
    the newline tokens.
    """
    window = drop.merge_window
    num_patches, num_windows = hidden.shape[1] - PATCHES_START, (grid.side // window) ** 2
    savings = torch.cat([torch.full((1, num_windows), window * window - 1), crop_window_savings(grid, window)])
    ranked = [saving[stable_top_k(scores, num_windows).cpu()] for saving, scores in
              zip(savings, window_scores(hidden, window))]
    saved = [0, *torch.stack(ranked).sum(dim=0).cumsum(dim=0).tolist()]
    unmerged = num_patches + grid.kept.numel() + grid.rows
    key_counts = [hidden.shape[0] * math.ceil(drop.key_share * count) + grid.rows
                  for count in merged_counts(num_patches, window)]
    return bounds_from_counts([unmerged - tokens for tokens in saved], key_counts, drop.budget,
                              stage_lengths(drop.drop_after, decoder_layer_count(model)))


def largest_tiling(geometry: ModelGeometry, layout: str) -> tuple[int, int]:
    """(images, newline tokens) of the model's largest tiling: the base image and `max_crops` crops, and in
    the spatial layout one newline per grid row (what `max_vision_tokens` counts beyond the images)."""
    images = 1 + geometry.max_crops
    newlines = geometry.max_vision_tokens - images * geometry.vision_tokens if layout == SPATIAL_LAYOUT else 0
    return images, newlines


# Prefill sees only the counts stage 1 left, and a LLaVA-NeXT image's count before it depends on its crops.
NEXT_KEEP_REFUSAL = ("keep_fraction with mustdrop's window merge runs on LLaVA-1.5 checkpoints only: on LLaVA-NeXT "
                     "its prefill stage does not see how many vision tokens each image had before stage 1 merged "
                     "them; give a budget (--budget N, the image's total) instead, or add --no_merge")


@register
class MustDrop(DropMethod):
    """Local spatial merge + key set in CLIP, dual attention filtering in prefill, output-aware cache.

    With `budget` set (our documented variant, not in the reference code), each dropping layer keeps a
    fixed count from a geometric schedule that reaches the target layer average, ranked by the global
    score (summed text attention), the key set always kept first. Stage 1 then merges at least the
    windows that make the budget reachable under the key-set rule (the layers before the first drop
    see every vision token, and the key set is never dropped) and at most those that keep `budget`
    tokens; between those bounds its threshold decides as usual (`merge_count_bounds`).

    On LLaVA-NeXT stage 1 takes the base image and its crops as one batch with one r. `next_layout` "flat"
    is the reference's layout (`encode_mustdrop_next`); "spatial" is our extension, the model's own
    spatial_unpad layout (`encode_mustdrop_spatial`): the crops' tokens stay where their windows were in the
    unpadded crop grid, a newline token after each row, and the newlines join the key set. The budget is
    then the total over the base image and its crops, and a budget the largest tiling cannot reach is refused.
    """

    name = "mustdrop"
    family = MULTI_STAGE
    options_class = DropConfig
    supports_next = True

    def __init__(self, options: DropConfig | None = None):
        super().__init__(options)
        self.compact_positions = self.options.compact_positions

    def count_in(self, prompt_vision_count: int, geometry: ModelGeometry) -> int:
        """The vision tokens a prompt's image brought into MustDrop (what `keep_fraction` takes its share
        of), from the count prefill sees: that count itself when stage 1 merges nothing, else the model's
        count per image, which every LLaVA-1.5 image has alike (on LLaVA-NeXT it depends on the crops, which
        prefill does not see: `check_model` refuses the fraction there)."""
        return geometry.vision_tokens if self.options.vision_merge else prompt_vision_count

    def encode_image(self, model, pixel_values: torch.Tensor) -> VisionOutput:
        if not self.options.enabled:
            return super().encode_image(model, pixel_values)
        return encode_mustdrop(model, pixel_values, self.prompt_options(geometry_of_model(model).vision_tokens))

    def encode_images(self, model, pixel_values: list[torch.Tensor],
                      image_sizes: list[torch.Tensor | None]) -> list[VisionOutput]:
        """LLaVA-1.5: all prompts' images through stage 1 together (`encode_mustdrop_images`); LLaVA-NeXT:
        each prompt's base image and crops as one batch, a prompt at a time."""
        if not self.options.enabled or is_next(model):
            return super().encode_images(model, pixel_values, image_sizes)
        if is_qwen(model):  # no vision stage on Qwen (`runs_on_qwen`): the tower's own tokens, no key set
            return self.asked(encode_images_together(model, pixel_values, image_sizes))
        drop = self.prompt_options(geometry_of_model(model).vision_tokens)
        return self.asked(encode_mustdrop_images(model, pixel_values, drop))

    def encode_next(self, model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> VisionOutput:
        if not self.options.enabled:
            return super().encode_next(model, pixel_values, image_sizes)
        if self.keep_fraction is not None and self.options.vision_merge:
            raise ValueError(NEXT_KEEP_REFUSAL)
        if self.options.next_layout == SPATIAL_LAYOUT:
            return encode_mustdrop_spatial(model, pixel_values, image_sizes, self.options)
        return encode_mustdrop_next(model, pixel_values, image_sizes, self.options)

    @property
    def enabled(self) -> bool:
        """A disabled config (no `--sparse`) is the unpruned model, on LLaVA-NeXT too."""
        return self.options.enabled

    @property
    def runs_on_qwen(self) -> bool:
        """Stages 2 and 3 run on Qwen as they are. Stage 1 does not: its key set is CLIP's CLS attention and
        Qwen's tower has no CLS token, so on Qwen MustDrop runs without its vision stage (and key set), and
        says so by asking for --no_merge rather than skipping it unasked."""
        return not self.options.vision_merge

    def qwen_refusal(self) -> str:
        return ("MustDrop's vision stage (the window merge after the first CLIP layer and the CLS-attention key "
                "set) needs CLIP's CLS token, which Qwen2-VL / Qwen2.5-VL's tower does not have; run stages 2 "
                "and 3 alone with --no_merge (--method-args vision_merge=false): no key set is kept then")

    def prefill_layers(self, geometry: ModelGeometry) -> tuple[int, ...]:
        return self.options.drop_after

    def select(self, context: LayerContext) -> torch.Tensor:
        attention = context.attention(TEXT_QUERIES)
        if self.options.budget is None and self.keep_fraction is None:
            return dual_attention_keep(attention, self.options.global_thr, self.options.individual_thr,
                                       context.key_mask, context.vision_valid)
        counts = [self.budget_count(vision, keys, context) for vision, keys in
                  zip(context.prompt_vision_counts, context.key_counts)]
        return ranked_keep_mask(attention.sum(dim=1), context.key_mask, context.key_counts, counts,
                                context.vision_valid)

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget below what merging every window and keeping only the key set reaches; on
        LLaVA-NeXT, where the budget is a total, below what the largest tiling reaches, so that every
        image can meet it. `keep_fraction` with stage 1 merging is refused on LLaVA-NeXT (`count_in`)."""
        options = self.options
        if options.keep_fraction is not None and options.vision_merge and geometry.max_crops:
            raise ValueError(NEXT_KEEP_REFUSAL)
        super().check_model(geometry)
        if options.budget is None or not options.drop_after:
            return
        images, newlines = largest_tiling(geometry, options.next_layout)
        key_rate = 0.0 if geometry.family == QWEN_FAMILY else options.key_share  # no key set on Qwen
        floor = mustdrop_budget_floor(geometry.patch_tokens, options.merge_window, options.vision_merge,
                                      options.drop_after, geometry.decoder_layers, key_rate, images, newlines)
        if options.budget < floor:
            how = "" if options.vision_merge or geometry.family == QWEN_FAMILY else (
                "; without --no_merge stage 1 could merge further")
            tiling = f" in each of {images} images" if geometry.max_crops else ""
            rows = f" plus {newlines} newline tokens" if newlines else ""
            raise ValueError(f"budget {options.budget:g} is below {floor:.1f}, the lowest layer average "
                             f"it can reach with drop_after {options.drop_after} and key_share "
                             f"{key_rate} on {geometry.patch_tokens} patches{tiling}{rows}{how}")

    def budget_count(self, prompt_vision_count: int, key_count: int, context: LayerContext) -> int:
        """Budget variant: this layer's share of a geometric schedule over the dropping layers."""
        budget = self.prompt_options(self.count_in(prompt_vision_count, context.geometry)).budget
        counts = geometric_keep_counts(prompt_vision_count, budget, self.options.drop_after,
                                       context.geometry.decoder_layers, minimum=key_count)
        return counts[self.options.drop_after.index(context.layer_idx)]

    def after_prefill(self, cache: KVCache, drops: list[tuple[int, list[torch.Tensor]]]) -> None:
        if self.options.decode_cache_policy:
            apply_output_aware_cache(cache, drops)
