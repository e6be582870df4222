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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction, index_sum, top_positions
from llava.drop.image_reduction import (
    budget_shares,
    prompt_tower_images,
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
    vision_token_offset,
)
from llava.model.geometry import ModelGeometry

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


@register
class VisionZip(PromptsTogether, DropMethod):
    """Dominant (CLS and the CLS-attended patches) + contextual (merged) tokens out of CLIP; the decoder runs
    unchanged."""

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
        if dominant + contextual > CLS_TOKENS + geometry.patch_tokens:
            raise ValueError(f"dominant + contextual = {dominant} + {contextual} exceeds the "
                             f"{CLS_TOKENS + geometry.patch_tokens} tokens (CLS and {geometry.patch_tokens} patches) "
                             "this model gives an image")

    @torch.no_grad()
    def encode_prompts(self, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
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
