"""VisionZip (Yang et al., CVPR 2025, "Longer is Better but Not Necessary"): a vision-stage method.

We follow the authors' released code (github.com/dvlab-research/VisionZip, `visionzip/clip_encoder.py`,
`visionzip/main.py`, `visionzip/utils.py`), which made the paper's numbers, where it reads differently
from the paper (docs/released_code.md lists each difference). The CLIP tower is run up to LLaVA's select
layer (`vision_feature_layer`, -2), the encoder layer whose output LLaVA projects; its attention says
which tokens matter:

- **Dominant tokens**: the CLS token and the `dominant - 1` patches that the CLS query attends to most
  (head-averaged attention inside the select layer; only the CLS row is computed, from that layer's
  input). `visionzip(model, dominant=54, ...)` hands `dominant - 1` to the tower, which keeps CLS on top:
  CLS counts as one of the dominant tokens. The patches keep their grid order, after CLS. Ties go to the
  earlier patch so that the set is reproducible.
- **Contextual tokens**: the remaining patches are cut into `contextual` groups. Targets are spaced
  uniformly over the remaining sequence (every `remaining // contextual`-th token, from the first);
  every other remaining token joins the target whose select-layer attention key is most similar
  (cosine of the head-averaged keys, ties to the earlier target). A contextual token is its target plus
  the plain mean of the tokens that joined it (`target + sum(members) / count`; a target nobody joined
  stays as it is), not the mean of target and members together.

Vision tokens = projector([CLS] + [dominant patches] + [contextual, in target order]). The released
tower returns these tokens itself, so LLaVA's select strategy (`patch` drops CLS) never runs: CLS reaches
the LLM under either strategy. The decoder is not touched. `dominant` = 577 (CLS and every patch) with
`contextual` = 0 gives the unpruned tower's CLS followed by its patch features.

The golden fixtures (tests/test_golden_released.py) hold our dominant tokens and answers equal to the
released code's at 54 + 10, 108 + 20 and 162 + 30.

The paper's other reading (CLS dropped, `dominant` patches, contextual tokens the mean of target and
members) is not kept as an option: no published number comes from it.

LLaVA-NeXT, as the released code runs it (`visionzip/llava_arch.py`): the base image and every crop is one
CLIP image and each is zipped on its own, with the same rule as above, into its dominant + contextual
tokens (CLS included).
- Counts: the released code gives every image the same counts, so an image of 1 + K crops brings
  (1 + K) x (dominant + contextual) tokens; the paper's NeXT settings 640 / 320 / 160 are its 128 / 64 /
  32 per image times the 5 images of a 2 x 2 grid. With `budget` the total is split over the image's
  actual 1 + K images (equal shares, the base image and then the first crops taking one more token when
  it does not divide), each share split 54 : 10 as above, so every image totals the budget exactly.
  `keep_fraction` F gives each prompt a budget of round(F * V), V its image's unpruned vision tokens in the
  model's own layout (its `vision_tokens_in`).
- Layout, "spatial_unpad" (the model's own): the base image's tokens (CLS, dominant patches, contextual),
  then the crops' dominant patches placed back on the whole crop grid and read row by row across crops
  (no unpadding, no newline tokens: the released `restore_image_features_sorted` builds the grid but
  never appends the newlines), then every crop's CLS token, then each crop's contextual tokens, crop by
  crop. "flat": each image's tokens, base image first.

Qwen2.5-VL and Qwen2-VL (`VisionZip.zip_qwen`): Qwen's tower has no CLS token, so the released rule cannot run
there. We follow LightCompress's port to Qwen2.5-VL (github.com/ModelTC/LightCompress, formerly ModelTC/llmc,
`llmc/compression/token_reduction/visionzip.py`: `Qwen2_5_VLVisionAttention_forward`, `merger_hook`,
`prune_qwenv25vl_hook`), which ranks tokens by the attention they receive rather than by a CLS query's:
- **Scores and keys** come from the tower's last block (a full-attention block on every released checkpoint),
  from that block's attention input: queries and keys after the tower's 2-D rotary embedding, a softmax over
  each image's own patches (the attention segments the tower gives that block), averaged over heads and summed
  over every query row: the attention each patch receives. A decoder token's score is the mean over its 2 x 2
  merged patches, its key the mean of their keys over patches and heads, both put in the merger's row-major
  output order (Qwen2.5-VL's tower holds patches window by window; that order is undone as the tower undoes
  it). Computed in float32, a block of query rows at a time (LightCompress: one eager attention matrix).
- **Dominant tokens**: the `dominant` best-scored decoder tokens (ties to the earlier token). With no CLS token,
  every dominant token is an image token.
- **Contextual tokens**: the other tokens, in their order, merged as on LLaVA (`contextual_merge`): uniform
  targets, every other token joining the target whose key is most cosine-similar, a contextual token being its
  target plus the plain mean of the tokens that joined it, merged on the decoder tokens (the merger's outputs:
  LightCompress merges the decoder's input embeddings).
- **Positions**: the tokens kept stay in the image's row-major order, each dominant token at its own (t, row,
  column) position and each contextual token at its target's, as LightCompress slices the model's position
  ids; the text after the image keeps its positions.
- **Counts**: LightCompress takes `dominant` and `contextual` as shares of the image's tokens; here they are
  counts as on LLaVA: `dominant` + `contextual`, or a `budget` split 54 : 10 (`split_total`), or under
  `keep_fraction` F the budget round(F * V), V the image's own token count. An image with no more tokens than
  that keeps them all. One frame per image (t = 1, as Qwen's image processor gives every image).
- LightCompress ports Qwen2.5-VL only. Qwen2-VL's tower is the same but for the windows (every block attends
  over the whole image); it runs the same rule, with no window order to undo.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction, index_sum, top_positions
from llava.drop.image_reduction import (
    QwenTokens,
    budget_shares,
    prompt_tower_images,
    qwen_output,
    reduce_qwen_images,
    run_to_select_layer,
    unpruned_next_count,
)
from llava.drop.method import ENCODER, DropMethod, PromptsTogether
from llava.drop.methods.registry import register
from llava.drop.timing import timed
from llava.drop.vision import (
    FLAT_MERGE,
    PATCHES_START,
    VisionOutput,
    check_feature_layer,
    cls_attention_to_patches,
    encode_qwen_images,
    vision_token_offset,
)
from llava.model.geometry import QWEN_FAMILY, ModelGeometry
from llava.model.qwen import is_qwen, merged_grid

# The paper's LLaVA-1.5 settings (192 = 162 + 30, 128 = 108 + 20, 64 = 54 + 10) all share this split.
DEFAULT_DOMINANT = 54
DEFAULT_CONTEXTUAL = 10
DOMINANT_SHARE = DEFAULT_DOMINANT / (DEFAULT_DOMINANT + DEFAULT_CONTEXTUAL)
CLS_TOKENS = 1  # the released code counts CLS among the dominant tokens


@dataclass(frozen=True)
class VisionZipOptions:
    """How many dominant (CLS included) and contextual tokens to keep; `budget` (their total) overrides both,
    and so does `keep_fraction` (that share of each prompt's vision tokens as its budget)."""

    dominant: int = DEFAULT_DOMINANT
    contextual: int = DEFAULT_CONTEXTUAL
    budget: float | None = None  # vision tokens in all, split in the paper's 54 : 10 proportion
    keep_fraction: float | None = None

    def __post_init__(self):
        if self.dominant < CLS_TOKENS:
            raise ValueError(f"dominant must be >= {CLS_TOKENS} (it counts the CLS token), got {self.dominant}")
        if self.contextual < 0:
            raise ValueError(f"contextual must be >= 0, got {self.contextual}")
        check_budget(self.budget, whole=True)
        check_keep_fraction(self.keep_fraction, self.budget)

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
    """(dominant, contextual) adding up to `total` >= 1, in the paper's 54 : 10 proportion; the dominant
    share always holds CLS."""
    dominant = max(CLS_TOKENS, round(total * DOMINANT_SHARE))
    return dominant, total - dominant


def dominant_indices(cls_row: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` patches the CLS query attends to most, ascending (original order)."""
    return top_positions(cls_row, count)


def target_positions(remaining: int, count: int) -> torch.Tensor:
    """`count` >= 1 positions spaced uniformly over `remaining` tokens, starting at the first."""
    if count > remaining:
        raise ValueError(f"cannot pick {count} contextual targets among {remaining} remaining tokens")
    return torch.arange(count) * (remaining // count)


def join_targets(keys: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-target rows of `keys` [R, dim] and, for each, the index of the target whose key is most
    cosine-similar (ties to the earlier target). Targets join no one: each leads its own group."""
    members = torch.ones(keys.shape[0], dtype=torch.bool, device=keys.device)
    members[targets] = False
    unit = F.normalize(keys.float(), dim=-1)
    return members.nonzero().flatten(), (unit[members] @ unit[targets].T).argmax(dim=-1)


def contextual_merge(tokens: torch.Tensor, keys: torch.Tensor, count: int) -> torch.Tensor:
    """Merge `tokens` [R, dim] into `count` tokens: each uniform target plus the plain mean of the tokens
    that joined it (`join_targets` on `keys` [R, key_dim]), computed in float32, returned in `tokens`' dtype."""
    if count == 0:
        return tokens[:0]
    targets = target_positions(tokens.shape[0], count).to(tokens.device)
    members, groups = join_targets(keys, targets)
    sums = index_sum(torch.zeros(count, tokens.shape[1], device=tokens.device), groups, tokens[members].float())
    sizes = torch.bincount(groups, minlength=count).clamp(min=1)
    return (tokens[targets].float() + sums / sizes[:, None]).to(tokens.dtype)


@torch.no_grad()
def head_averaged_keys(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Attention keys of a CLIP layer for every token of `hidden` [1, N, dim], averaged over heads."""
    attention = layer.self_attn
    keys = attention.k_proj(layer.layer_norm1(hidden[0]))
    return keys.view(-1, attention.num_heads, attention.head_dim).mean(dim=1)


@dataclass
class ZippedImage:
    """One tower image after VisionZip: its select-layer tokens and what each stands for."""

    sequence: torch.Tensor  # [1, dominant + contextual, dim]: CLS, dominant patches, contextual tokens
    kept: torch.Tensor  # the dominant patches, ascending
    rest: torch.Tensor  # [P] boolean: the patches left for the contextual tokens
    keys: torch.Tensor  # [P, key_dim] every patch's head-averaged key


def zip_image(layer: torch.nn.Module, layer_input: torch.Tensor, hidden: torch.Tensor, dominant: int,
              contextual: int) -> ZippedImage:
    """One image zipped from its select layer's input and output [1, 1 + P, dim]: CLS, the `dominant - 1`
    most CLS-attended patches in grid order, then the contextual merges of the other patches."""
    patches = hidden[0, PATCHES_START:]
    if dominant + contextual > CLS_TOKENS + patches.shape[0]:
        raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the image's "
                         f"{CLS_TOKENS + patches.shape[0]} tokens (CLS and {patches.shape[0]} patches)")
    kept = dominant_indices(cls_attention_to_patches(layer, layer_input), dominant - CLS_TOKENS)
    rest = torch.ones(patches.shape[0], dtype=torch.bool, device=patches.device)
    rest[kept] = False
    keys = head_averaged_keys(layer, layer_input)[PATCHES_START:]
    merged = contextual_merge(patches[rest], keys[rest], contextual)
    return ZippedImage(torch.cat([hidden[0, :PATCHES_START], patches[kept], merged])[None], kept, rest, keys)


def project_zipped(model, sequence: torch.Tensor) -> torch.Tensor:
    """Project every zipped token, CLS included: the released tower hands LLaVA its tokens directly, so
    LLaVA's select strategy never drops CLS here."""
    return model.model.multi_modal_projector(sequence)[0]


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


def spatial_features(projected: list[torch.Tensor], counts: list[tuple[int, int]], order: torch.Tensor) -> torch.Tensor:
    """The released code's "spatial_unpad" sequence from each image's projected tokens [CLS + dominant
    patches + contextual, hidden]: the base image's, then every crop's dominant patches in `order` (grid
    reading order), then the crops' CLS tokens, then their contextual tokens, crop by crop."""
    crops = list(zip(projected[1:], counts[1:]))
    dominant = torch.cat([tokens[CLS_TOKENS:d] for tokens, (d, _) in crops])[order]
    cls = torch.cat([tokens[:CLS_TOKENS] for tokens, _ in crops])
    contextual = torch.cat([tokens[d:] for tokens, (d, _) in crops])
    return torch.cat([projected[0], dominant, cls, contextual])


# --- Qwen2.5-VL / Qwen2-VL: LightCompress's port (module docstring) -------------------------------------

QUERY_BLOCK_ELEMENTS = 1 << 24  # attention probabilities computed at once (heads x query rows x keys)


@dataclass
class LastBlockInput:
    """What the tower's last block's attention was given in one tower pass over every prompt's image: its input
    [patches, dim] (after the block's norm, in the tower's own patch order), its attention segments (cumulative
    patch counts) and its rotary (cos, sin) [patches, head_dim]."""

    hidden: torch.Tensor
    segments: list[int]
    cos: torch.Tensor
    sin: torch.Tensor


def encode_qwen_capturing(model, pixel_values: list[torch.Tensor],
                          grids: list[torch.Tensor]) -> tuple[list[VisionOutput], LastBlockInput]:
    """`encode_qwen_images` (one tower pass for every prompt, the model's own) that also keeps what the tower's last
    block's attention is given."""
    captured = {}

    def capture(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        segments = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
        cos, sin = kwargs["position_embeddings"]
        captured["input"] = LastBlockInput(hidden, [int(bound) for bound in segments.tolist()], cos, sin)

    handle = model.model.visual.blocks[-1].attn.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        outputs = encode_qwen_images(model, pixel_values, grids)
    finally:
        handle.remove()
    return outputs, captured["input"]


def rotate_vision(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's 2-D rotary embedding on [patches, heads, head_dim] (transformers' `apply_rotary_pos_emb_vision`),
    in float32."""
    states, cos, sin = states.float(), cos[:, None].float(), sin[:, None].float()
    half = states.shape[-1] // 2
    return states * cos + torch.cat([-states[..., half:], states[..., :half]], dim=-1) * sin


def received_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[patches]: the head-averaged attention each key receives, summed over every query row (queries and keys
    [patches, heads, head_dim] of one attention segment), a block of query rows at a time."""
    patches, heads, _ = keys.shape
    rows = max(1, QUERY_BLOCK_ELEMENTS // (heads * patches))
    received = torch.zeros(patches, device=keys.device)
    for first in range(0, patches, rows):
        logits = torch.einsum("qhd,khd->hqk", queries[first : first + rows], keys) * scale
        received += logits.softmax(dim=-1).mean(dim=0).sum(dim=0)
    return received


def tower_unit_order(model, grid: torch.Tensor) -> torch.Tensor | None:
    """The order in which Qwen2.5-VL's tower holds one image's merge units (window by window; its merger output goes
    back to row-major order by this order's inverse); None for Qwen2-VL, whose tower keeps them row-major."""
    visual = model.model.visual
    if getattr(visual, "window_size", None) is None:
        return None
    if hasattr(visual, "get_window_index"):  # transformers before `vision_utils`
        return visual.get_window_index(grid)[0]
    from transformers.vision_utils import get_vision_window_index

    return get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]


@torch.no_grad()
def qwen_token_scores(model, block: LastBlockInput, start: int, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's decoder-token scores [tokens] (the attention its merged patches receive in the tower's last block)
    and keys [tokens, head_dim], in the merger's row-major output order; the image's patches are start .. start +
    t * h * w of the tower pass `block` comes from, and `grid` is its [[t, h, w]]."""
    attention = model.model.visual.blocks[-1].attn
    end = start + int(grid.prod())
    bounds = [bound for bound in block.segments if start <= bound <= end]
    if not bounds or bounds[0] != start or bounds[-1] != end:
        raise ValueError(f"the tower's last block attends across images (segments {block.segments}); VisionZip's "
                         f"scores need the image's patches {start}..{end} on their own")
    heads = attention.num_heads
    states = attention.qkv(block.hidden[start:end]).reshape(end - start, 3, heads, -1)
    cos, sin = block.cos[start:end], block.sin[start:end]
    queries, keys = rotate_vision(states[:, 0], cos, sin), rotate_vision(states[:, 1], cos, sin)
    scale = keys.shape[-1] ** -0.5
    received = torch.cat([received_attention(queries[low - start : high - start], keys[low - start : high - start],
                                             scale) for low, high in zip(bounds, bounds[1:])])
    unit = model.model.visual.spatial_merge_size ** 2
    scores = received.view(-1, unit).mean(dim=-1)
    token_keys = keys.view(-1, unit, heads, keys.shape[-1]).mean(dim=(1, 2))
    order = tower_unit_order(model, grid.reshape(1, -1))
    if order is not None:
        back = order.to(scores.device).argsort()
        scores, token_keys = scores[back], token_keys[back]
    return scores, token_keys


def zip_qwen_tokens(vision: VisionOutput, scores: torch.Tensor, keys: torch.Tensor, dominant: int,
                    contextual: int) -> QwenTokens:
    """One image's decoder tokens (one frame) zipped (module docstring): the `dominant` best-scored tokens and
    `contextual` merged ones, in the image's order, each at its own position (a contextual token at its
    target's), with the cells (token indices of the row-major grid) each stands for."""
    features = vision.features
    device = features.device
    kept = top_positions(scores, dominant).to(device)
    rest = torch.ones(features.shape[0], dtype=torch.bool, device=device)
    rest[kept] = False
    rest_tokens = rest.nonzero().flatten()
    merged = contextual_merge(features[rest], keys[rest], contextual)
    groups = [[token] for token in kept.tolist()]
    targets = torch.zeros(0, dtype=torch.long, device=device)
    if contextual:
        targets = target_positions(rest_tokens.numel(), contextual).to(device)
        members, joined = join_targets(keys[rest], targets)
        groups += [sorted([rest_tokens[target].item(), *rest_tokens[members[joined == group]].tolist()])
                   for group, target in enumerate(targets.tolist())]
    chosen = torch.cat([kept, rest_tokens[targets]])
    order = chosen.argsort()
    positions = vision.positions[:, chosen[order].to(vision.positions.device)]
    return QwenTokens(torch.cat([features[kept], merged])[order], positions, [groups[i] for i in order.tolist()])


@register
class VisionZip(PromptsTogether, DropMethod):
    """Dominant (CLS and the CLS-attended patches) + contextual (merged) tokens out of CLIP (Qwen: LightCompress's
    port, module docstring); the decoder runs unchanged."""

    name = "visionzip"
    family = ENCODER
    options_class = VisionZipOptions
    supports_next = True
    compact_positions = True  # nothing is dropped inside the decoder: positions never change

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse more tokens than an image has (CLS and its patches); on LLaVA-NeXT for the budget's
        share of an image tiled into the most crops (an image with fewer crops is checked when it arrives)."""
        super().check_model(geometry)
        dominant, contextual = self.options.image_counts(1 + geometry.max_crops)[0]
        if geometry.family == QWEN_FAMILY:  # no CLS token; each image brings its own count (module docstring)
            if dominant + contextual > geometry.max_vision_tokens:
                raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the "
                                 f"{geometry.max_vision_tokens} vision tokens this model gives an image at most")
            return
        if dominant + contextual > CLS_TOKENS + geometry.patch_tokens:
            raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the "
                             f"{CLS_TOKENS + geometry.patch_tokens} tokens (CLS and {geometry.patch_tokens} patches) "
                             "this model gives an image")

    @torch.no_grad()
    def encode_prompts(self, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
                    tiled: bool) -> list[VisionOutput]:
        """All prompts' tower images (their images, or `tiled`: base images and crops) through CLIP as one
        batch; then every tower image is zipped on its own. Qwen: `zip_qwen`."""
        if is_qwen(model):
            return self.zip_qwen(model, pixel_values, image_sizes)
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
        tokens_in = hidden.shape[1] - PATCHES_START + vision_token_offset(model.config)
        dominant, contextual = self.prompt_options(tokens_in).counts()
        zipped, seconds = timed(lambda: zip_image(layer, layer_input, hidden, dominant, contextual), hidden.device)
        features = project_zipped(model, zipped.sequence)
        stats = {"vision_tokens_in": tokens_in, "vision_tokens": features.shape[0], "dominant": dominant,
                 "contextual": contextual}
        return VisionOutput(features=features, stats=stats, selection_seconds=seconds,
                            patch_groups=self.patch_groups(zipped, contextual))

    def zip_next(self, model, layer, layer_input: torch.Tensor, hidden: torch.Tensor, image_sizes: torch.Tensor,
                 grid: tuple[int, int]) -> VisionOutput:
        """A LLaVA-NeXT image, every tower image (base, then crops) zipped on its own, laid out as the released
        code does (module docstring): crops' dominant patches in grid reading order under "spatial_unpad",
        image after image under "flat"."""
        side = math.isqrt(hidden.shape[1] - PATCHES_START)
        per_image = side * side + vision_token_offset(model.config)
        tokens_in = unpruned_next_count(model, image_sizes, grid, per_image, side)
        counts = self.prompt_options(tokens_in).image_counts(hidden.shape[0])
        zipped, seconds = timed(lambda: [
            zip_image(layer, layer_input[image : image + 1], hidden[image : image + 1], dominant, contextual)
            for image, (dominant, contextual) in enumerate(counts)], hidden.device)
        projected = [project_zipped(model, image.sequence) for image in zipped]
        if getattr(model.config, "mm_patch_merge_type", None) == FLAT_MERGE:
            features = torch.cat(projected)
        else:
            order = grid_reading_order([image.kept for image in zipped[1:]], grid, side)
            features = spatial_features(projected, counts, order)
        stats = {"vision_tokens_in": tokens_in, "vision_tokens": features.shape[0], "images": len(counts),
                 "crops": len(counts) - 1, "vision_tokens_per_image_in": per_image,
                 "dominant": sum(d for d, _ in counts), "contextual": sum(c for _, c in counts)}
        return VisionOutput(features=features, stats=stats, selection_seconds=seconds)

    @property
    def runs_on_qwen(self) -> bool:
        return True  # LightCompress's port (module docstring)

    @torch.no_grad()
    def zip_qwen(self, model, pixel_values: list[torch.Tensor], grids: list[torch.Tensor]) -> list[VisionOutput]:
        """Qwen2.5-VL / Qwen2-VL: every prompt's image through the model's own tower in one pass, the last block's
        attention input kept; then each image's decoder tokens zipped on their own (module docstring)."""
        outputs, block = encode_qwen_capturing(model, pixel_values, grids)
        starts = list(itertools.accumulate((int(grid.prod()) for grid in grids), initial=0))  # each image's patches

        def zip_one(n: int, vision: VisionOutput, budget: int | None) -> VisionOutput:
            tokens = vision.features.shape[0]
            dominant, contextual = self.prompt_options(tokens).counts()  # the budget, split (or the options' own)
            frames = merged_grid(model, grids[n])[0]
            if frames != 1:
                raise ValueError(f"VisionZip on Qwen zips one frame's tokens; this input has {frames} frames")
            if dominant + contextual >= tokens:  # nothing to zip: the image keeps every token
                everything = QwenTokens(vision.features, vision.positions, [[token] for token in range(tokens)])
                return qwen_output(vision, everything, {"dominant": tokens, "contextual": 0})
            scores, keys = qwen_token_scores(model, block, starts[n], grids[n])
            zipped = zip_qwen_tokens(vision, scores, keys, dominant, contextual)
            return qwen_output(vision, zipped, {"dominant": dominant, "contextual": contextual})

        return reduce_qwen_images(self, outputs, zip_one)

    @staticmethod
    def patch_groups(zipped: ZippedImage, contextual: int) -> list[list[int]]:
        """Which patches each output token stands for (CLS: none), so `llava.viz` can draw what was kept."""
        rest_patches = zipped.rest.nonzero().flatten()
        merged = []
        if contextual:
            targets = target_positions(rest_patches.numel(), contextual).to(rest_patches.device)
            members, groups = join_targets(zipped.keys[zipped.rest], targets)
            merged = [sorted([rest_patches[target].item(), *rest_patches[members[groups == group]].tolist()])
                      for group, target in enumerate(targets.tolist())]
        return [[]] * CLS_TOKENS + [[patch] for patch in zipped.kept.tolist()] + merged
