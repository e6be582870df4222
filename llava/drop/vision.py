"""Vision stage: run the CLIP tower layer by layer and project the selected features.

We drive the encoder layers ourselves (rather than calling the tower) so that the sequence can be
shortened between layers (MustDrop's local spatial merge) and only the one attention row the key set
needs is computed, leaving every layer on its fast attention kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange

from llava.drop.budget import merge_count_bounds
from llava.drop.config import MERGE_AFTER_LAYER, DropConfig
from llava.drop.timing import timed

CLS_INDEX = 0
PATCHES_START = CLS_INDEX + 1
DROP_CLS_STRATEGY = "default"  # transformers' name for LLaVA's `select_feature = patch`
# Window layout on the patch grid: grid rows/cols split into (window index, offset inside the window).
WINDOW_PATTERN = "... (gh wh gw ww) d -> ... (gh gw) (wh ww) d"
WINDOW_MASK_PATTERN = "(gh gw) (wh ww) -> (gh wh gw ww)"


@dataclass
class VisionOutput:
    """Projected vision tokens for one image, plus what later stages need to know."""

    features: torch.Tensor  # [num_vision_tokens, llm_hidden]
    key_indices: torch.Tensor | None = None  # vision-token positions later stages must keep
    stats: dict = field(default_factory=dict)
    # Per vision token, the row-major grid patches it stands for (CLS: none), so a picture can map tokens
    # back to the image. None means token i is patch i (or, with fewer tokens, that the mapping is unknown).
    patch_groups: list[list[int]] | None = None


def selected_layer_count(num_layers: int, feature_layer: int) -> int:
    """How many encoder layers to run so that the last output is `hidden_states[feature_layer]`.

    `hidden_states[0]` is the embedding output and `hidden_states[i]` the output of layer i-1.
    """
    index = feature_layer if feature_layer >= 0 else num_layers + 1 + feature_layer
    if not 0 <= index <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is out of range for a {num_layers}-layer tower")
    return index


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


def merge_windows(hidden: torch.Tensor, threshold: float, window: int) -> tuple[torch.Tensor, int]:
    """MustDrop's local spatial merge: similar windows collapse into one mean token each.

    `hidden` is [1, 1 + num_patches, dim] with CLS first. Returns the new sequence
    `[CLS] + [merged tokens, best window first] + [tokens of unmerged windows, grid order]` and r.
    """
    merged, top = merge_windows_in_order(hidden, threshold, window)
    return merged, top.numel()


def merge_windows_in_order(
    hidden: torch.Tensor, threshold: float, window: int, count_bounds: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_windows`, returning the merged windows' row-major indices (best first) instead of r.

    The indices are what `merged_patch_groups` needs to map the merged tokens back to the grid.
    `count_bounds` (least, most) clamps r, for the budget variant; the threshold alone decides otherwise.
    """
    if hidden.shape[0] != 1:
        raise ValueError(f"the vision merge supports batch size 1, got {hidden.shape[0]}")
    cls, patches = hidden[:, :PATCHES_START], hidden[:, PATCHES_START:]
    grid = patch_grid_side(patches.shape[1], window)
    scores = window_similarity(patches[0], grid, window)
    r = int((scores >= threshold).sum())
    if count_bounds is not None:
        r = min(max(r, count_bounds[0]), count_bounds[1])
    # Stable sort: windows with equal scores are merged in window order, so results are reproducible.
    top = torch.sort(scores, descending=True, stable=True).indices[:r]
    if r == 0:
        return hidden, top
    windows = rearrange(patches[0], WINDOW_PATTERN, wh=window, ww=window, gh=grid // window)
    merged = windows[top].float().mean(dim=1).to(hidden.dtype)
    merged_window = torch.zeros_like(scores, dtype=torch.bool)
    merged_window[top] = True
    in_merged_window = rearrange(merged_window[:, None].expand(-1, window * window), WINDOW_MASK_PATTERN,
                                 wh=window, ww=window, gh=grid // window)
    kept = patches[0][~in_merged_window]
    return torch.cat([cls[0], merged, kept], dim=0)[None], top


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


@torch.no_grad()
def cls_attention_to_patches(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Head-averaged attention of the CLS query to every patch key of `layer`, given its input.

    Only the CLS row is computed (one query against N keys), so the layer itself keeps its fast
    attention kernel. Returns float32 [N - 1]: the softmax runs over all N keys, CLS included.
    """
    if hidden.shape[0] != 1:
        raise ValueError(f"the key-set scoring supports batch size 1, got {hidden.shape[0]}")
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden[0])
    query = attention.q_proj(normed[CLS_INDEX]).view(attention.num_heads, attention.head_dim)
    keys = attention.k_proj(normed).view(-1, attention.num_heads, attention.head_dim)
    logits = torch.einsum("hd,nhd->hn", query.float(), keys.float()) * attention.scale
    return logits.softmax(dim=-1).mean(dim=0)[PATCHES_START:]


def top_key_indices(attn_row: torch.Tensor, rate: float) -> torch.Tensor:
    """Positions of the `ceil(rate * len(attn_row))` most attended patches, ascending.

    Ties go to the earlier patch (stable descending sort) so that the set does not depend on the
    backend's top-k implementation.
    """
    count = math.ceil(rate * attn_row.numel())
    best = torch.sort(attn_row, descending=True, stable=True).indices[:count]
    return best.sort().values


def embed_patches(tower: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """`hidden_states[0]` of the tower: patch + position embeddings after the pre-layer norm."""
    weight = tower.embeddings.patch_embedding.weight
    pixel_values = pixel_values.to(device=weight.device, dtype=weight.dtype)
    return tower.pre_layrnorm(tower.embeddings(pixel_values))


def run_tower_to(layers, hidden: torch.Tensor, start: int, wanted: set[int]) -> dict[int, torch.Tensor]:
    """Hidden states at each `wanted` index, running layers from `hidden = hidden_states[start]` on."""
    found = {start: hidden} if start in wanted else {}
    for index in range(start, max(wanted)):
        hidden = layers[index](hidden, None)
        if index + 1 in wanted:
            found[index + 1] = hidden
    return found


def project_features(model, hidden: torch.Tensor) -> torch.Tensor:
    """Drop CLS when LLaVA does, then project into the LLM's embedding space."""
    if model.config.vision_feature_select_strategy == DROP_CLS_STRATEGY:
        hidden = hidden[:, PATCHES_START:]
    return model.model.multi_modal_projector(hidden)[0]


def _vision_token_offset(config) -> int:
    """Where patch 0 sits among the vision tokens: after CLS when the select strategy keeps it."""
    return 0 if config.vision_feature_select_strategy == DROP_CLS_STRATEGY else PATCHES_START


def check_feature_layer(config) -> None:
    """We select one layer's hidden states; LLaVA variants that stack several are not handled."""
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("multi-layer vision features are not supported")


def _encode_plain(model, pixel_values: torch.Tensor) -> VisionOutput:
    """LLaVA's features, bit-identical to transformers' `get_image_features`."""
    tower = model.model.vision_tower
    hidden = embed_patches(tower, pixel_values)
    selected = selected_layer_count(len(tower.encoder.layers), model.config.vision_feature_layer)
    for layer in tower.encoder.layers[:selected]:
        hidden = layer(hidden, None)
    features = project_features(model, hidden)
    count = features.shape[0]
    return VisionOutput(features=features, stats={"vision_tokens_in": count, "vision_tokens": count})


def _merge_early(model, hidden: torch.Tensor, drop: DropConfig) -> tuple[torch.Tensor, int, list[int], float]:
    """Run the tower up to the merge point and merge there.

    Returns the merged hidden states, their `hidden_states` index, the merged windows (best first)
    and the merge's wall time.
    """
    layers = model.model.vision_tower.encoder.layers
    merge_index = MERGE_AFTER_LAYER + 1
    if selected_layer_count(len(layers), model.config.vision_feature_layer) < merge_index:
        raise ValueError(f"vision_feature_layer {model.config.vision_feature_layer} selects features from "
                         "before the merge")
    hidden = run_tower_to(layers, hidden, 0, {merge_index})[merge_index]
    bounds = None
    if drop.budget is not None:
        bounds = merge_count_bounds(hidden.shape[1] - PATCHES_START, drop.merge_window, drop.budget, drop.drop_layers,
                                    len(model.model.language_model.layers), drop.key_token_rate)
    (hidden, top), seconds = timed(
        lambda: merge_windows_in_order(hidden, drop.merge_threshold, drop.merge_window, bounds), hidden.device)
    return hidden, merge_index, top.tolist(), seconds


def _encode_mustdrop(model, pixel_values: torch.Tensor, drop: DropConfig) -> VisionOutput:
    """Stage 1 (docs/algorithm.md): optional merge after layer 0, features as usual, CLS-attention key set."""
    if pixel_values.shape[0] != 1:
        raise ValueError(f"MustDrop's vision stage supports batch size 1, got {pixel_values.shape[0]}")
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    key_input = len(layers) - 1  # hidden_states index of the input to the tower's last layer
    offset = _vision_token_offset(model.config)
    hidden = embed_patches(model.model.vision_tower, pixel_values)
    num_patches = hidden.shape[1] - PATCHES_START
    tokens_in = num_patches + offset
    start, merged_windows, merge_seconds = 0, [], 0.0
    if drop.vision_merge:
        hidden, start, merged_windows, merge_seconds = _merge_early(model, hidden, drop)
    states = run_tower_to(layers, hidden, start, {selected, key_input})
    key_row, key_seconds = timed(
        lambda: top_key_indices(cls_attention_to_patches(layers[key_input], states[key_input]),
                                drop.key_token_rate), hidden.device)
    features = project_features(model, states[selected])
    key_indices = key_row + offset
    stats = {"vision_tokens_in": tokens_in, "vision_tokens": features.shape[0],
             "merged_windows": len(merged_windows), "key_tokens": key_indices.numel(),
             "merge_seconds": merge_seconds, "key_seconds": key_seconds}
    patch_groups = [[]] * offset + merged_patch_groups(merged_windows, num_patches, drop.merge_window)
    return VisionOutput(features=features, key_indices=key_indices, stats=stats, patch_groups=patch_groups)


@torch.no_grad()
def encode_image(model, pixel_values: torch.Tensor, drop: DropConfig | None = None) -> VisionOutput:
    """Vision tokens of one image; with MustDrop enabled, merged and with their key set."""
    check_feature_layer(model.config)
    if drop is None or not drop.enabled:
        return _encode_plain(model, pixel_values)
    return _encode_mustdrop(model, pixel_values, drop)
