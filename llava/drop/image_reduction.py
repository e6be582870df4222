"""Vision-stage methods that shrink each tower image on its own, on LLaVA-1.5 and LLaVA-NeXT alike.

ToMe, PruMerge, random dropping and pooling all turn one CLIP image (576 patches) into fewer tokens
before the projector and leave the decoder alone. `ImageReduction` holds what they share: running
them on LLaVA-1.5's one image or on LLaVA-NeXT's base image + crops, splitting a `budget` over those
images, projecting, and the statistics. A method only writes `reduce`.

LLaVA-NeXT layout: every tower image (base image first, then the crops in the processor's order) is
reduced on its own and the results follow one another, with no unpad and no newline tokens, as in
VisionZip's released code: after merging or pooling, the crop grid that the newlines delimit no
longer exists. A budget is the image's total, shared over its 1 + K tower images (`budget_shares`). A
`keep_fraction` F gives each prompt a budget of round(F * V), V the vision tokens the unpruned model gives
its image (`vision_count_in`, its `vision_tokens_in`).

Qwen2-VL / Qwen2.5-VL (`encode_qwen`): every prompt's image goes through the model's own tower and merger
in one pass (`encode_qwen_images`), and a method reduces each image's decoder tokens on their own
(`reduce_qwen`): the tokens the merger made of 2 x 2 patches, row-major over the image's (h/2) x (w/2)
grid, each with its (t, row, column) offset in `VisionOutput.positions`. A method keeps a subset of those
tokens or makes new ones, and gives every token it returns a position of its own (`QwenTokens`); the image's `position_span`, how far the
text after it moves on, stays as it was (docs/qwen.md: the rule when tokens are dropped). A budget, or a
`keep_fraction` F (a budget of round(F * V), V the image's own token count), is each image's count; an image
with no more tokens than its budget keeps them all. A method without a Qwen port keeps `reduce_qwen` and is
refused before anything runs (`runs_on_qwen`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from llava.drop.method import DropMethod, PromptsTogether
from llava.drop.next_layout import crop_grid
from llava.drop.timing import Stopwatch
from llava.drop.vision import (
    FLAT_MERGE,
    PATCHES_START,
    VisionOutput,
    check_feature_layer,
    check_next_inputs,
    embed_patches,
    encode_qwen_images,
    project_features,
    run_tower_to,
    selected_layer_count,
    vision_token_offset,
)
from llava.model.geometry import ModelGeometry
from llava.model.qwen import is_qwen


@dataclass
class ReducedImage:
    """One tower image after a method: select-layer states with CLS first, and what each token stands for."""

    hidden: torch.Tensor  # [1 + tokens, dim]: CLS, then the kept / merged / pooled patch tokens
    patch_groups: list[list[int]]  # per token after CLS, the row-major patches it stands for


def budget_shares(total: int, images: int) -> list[int]:
    """`total` tokens over `images` images as equally as whole tokens allow, earlier images first taking
    the remainder (the released code gives every image the same count)."""
    share, remainder = divmod(total, images)
    return [share + int(image < remainder) for image in range(images)]


def run_to_select_layer(model, images: torch.Tensor) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The select layer (whose output LLaVA projects), its input and its output for images [n, 3, H, W]."""
    layers = model.model.vision_tower.encoder.layers
    selected = selected_layer_count(len(layers), model.config.vision_feature_layer)
    if selected == 0:
        raise ValueError(f"vision_feature_layer {model.config.vision_feature_layer} selects the embeddings, "
                         "which have no attention to rank patches by")
    states = run_tower_to(layers, embed_patches(model.model.vision_tower, images), 0, {selected - 1, selected})
    return layers[selected - 1], states[selected - 1], states[selected]


def given_crop_grid(model, image_sizes: torch.Tensor, crops: int) -> tuple[int, int]:
    """(rows, columns) of crops LLaVA-NeXT tiled this image into, by transformers' own anyres rule;
    refused unless it holds the `crops` crops that were given."""
    grid = crop_grid(model.config, image_sizes[0].tolist())
    if grid.crops != crops:
        raise ValueError(f"image size {image_sizes[0].tolist()} tiles into {grid.crops_high} x {grid.crops_wide} "
                         f"crops, but {crops} crops were given")
    return grid.crops_high, grid.crops_wide


def unpruned_next_count(model, image_sizes: torch.Tensor, grid: tuple[int, int], per_image: int, side: int) -> int:
    """Vision tokens the unpruned model gives this image in its own layout (what the FLOPs ratio is taken
    against): every image's tokens ("flat"), or the base image plus the unpadded crop grid with one
    newline token per row ("spatial_unpad")."""
    if getattr(model.config, "mm_patch_merge_type", None) == FLAT_MERGE:
        return (1 + grid[0] * grid[1]) * per_image
    unpadded = crop_grid(model.config, image_sizes[0].tolist()).kept
    return per_image + unpadded.shape[0] * (unpadded.shape[1] + 1)


def vision_count_in(model, image_sizes: torch.Tensor | None, grid: tuple[int, int] | None) -> int:
    """The vision tokens the unpruned model gives a prompt's image (its `vision_tokens_in`): LLaVA-1.5's
    patches (and CLS, where kept), or LLaVA-NeXT's in the model's own layout (`grid`: its crop grid)."""
    side = patch_side(model)
    per_image = side * side + vision_token_offset(model.config)
    return per_image if grid is None else unpruned_next_count(model, image_sizes, grid, per_image, side)


def prompt_tower_images(name: str, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
                        tiled: bool) -> tuple[list[torch.Tensor], list[tuple[int, int] | None]]:
    """Each prompt's tower images [n, 3, H, W]: its one image, or (`tiled`, LLaVA-NeXT) its base image and crops,
    checked against its crop grid, which comes back too (None for one image); refused before any tower work."""
    images, grids = [], []
    for pixels, sizes in zip(pixel_values, image_sizes):
        if tiled:
            check_next_inputs(pixels, sizes)
            grids.append(given_crop_grid(model, sizes, pixels.shape[1] - 1))
            images.append(pixels[0])
        elif pixels.shape[0] != 1:
            raise ValueError(f"{name}'s vision stage takes one image per prompt, got {pixels.shape[0]}")
        else:
            images.append(pixels)
            grids.append(None)
    return images, grids


def patch_side(model) -> int:
    """Patches along one side of a tower image (24 for CLIP-L/14 at 336 px)."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


class ImageReduction(PromptsTogether, DropMethod):
    """A vision-stage method applied to each tower image on its own (module docstring); subclasses keep
    their options in `self.options` (an `options_class` instance with a `budget` field, None for the
    method's own count, and a `keep_fraction` field) and write `reduce`."""

    supports_next = True
    prompts_together: ClassVar[bool] = True  # all prompts' tower images go through `reduce` in one call

    def reduce(self, model, images: torch.Tensor, counts: list[int | None], selecting: Stopwatch) -> list[ReducedImage]:
        """Each of the images [n, 3, H, W] (already in the tower's dtype and device) cut to its count of
        patch tokens (None: the method's own choice); the work of choosing and merging tokens (not the
        tower's own layers) runs inside `with selecting:`."""
        raise NotImplementedError

    def reduce_qwen(self, model, vision: VisionOutput, pixel_values: torch.Tensor, grid: torch.Tensor,
                    count: int | None) -> QwenTokens:
        """One Qwen image's decoder tokens (its unpruned `vision`, from its patches `pixel_values` of grid
        [[t, h, w]]) cut to `count` tokens (None: the method's own choice), each token with a position of its
        own. A method with no Qwen port leaves this, and `runs_on_qwen` refuses it before anything runs."""
        raise ValueError(self.qwen_refusal())

    @torch.no_grad()
    def encode_qwen(self, model, pixel_values: list[torch.Tensor], grids: list[torch.Tensor]) -> list[VisionOutput]:
        """Qwen2-VL / Qwen2.5-VL: every prompt's image through the model's own tower and merger in one pass, then
        each image's decoder tokens through `reduce_qwen` on their own, to its prompt's budget."""
        def reduce_one(n: int, vision: VisionOutput, count: int | None) -> VisionOutput:
            return qwen_output(vision, self.reduce_qwen(model, vision, pixel_values[n], grids[n], count))

        return reduce_qwen_images(self, encode_qwen_images(model, pixel_values, grids), reduce_one)

    @property
    def runs_on_qwen(self) -> bool:
        """Whether the method has a Qwen port (it writes `reduce_qwen`)."""
        return type(self).reduce_qwen is not ImageReduction.reduce_qwen

    @property
    def budget(self) -> int | None:
        budget = getattr(self.options, "budget", None)
        return None if budget is None else int(budget)

    def check_model(self, geometry: ModelGeometry) -> None:
        """Also refuse a budget that leaves a tower image of the largest tiling without a token, or that
        gives one image more tokens than it has patches."""
        super().check_model(geometry)
        if self.budget is None:
            return
        images = 1 + geometry.max_crops
        if self.budget < images:
            raise ValueError(f"budget {self.budget} is below one token for each of the {images} tower images "
                             f"(base image + {geometry.max_crops} crops) this model can tile an image into")
        largest = budget_shares(self.budget, images)[0]
        if largest > geometry.patch_tokens:
            raise ValueError(f"budget {self.budget} gives a tower image {largest} tokens, more than its "
                             f"{geometry.patch_tokens} patches")

    def counts(self, images: int, patches: int, budget: float | None) -> list[int | None]:
        """Each tower image's share of a prompt's budget (None without one), checked against its patches."""
        if budget is None:
            return [None] * images
        budget = int(budget)
        shares = budget_shares(budget, images)
        if min(shares) < 1 or max(shares) > patches:
            raise ValueError(f"budget {budget} over {images} tower images gives shares {min(shares)}.."
                             f"{max(shares)}; each must be 1..{patches} (the patches of one image)")
        return shares

    @torch.no_grad()
    def encode_prompts(self, model, pixel_values: list[torch.Tensor], image_sizes: list[torch.Tensor | None],
                       tiled: bool) -> list[VisionOutput]:
        """Every prompt's tower images (its image, or `tiled`: its base image and crops) reduced in one call of
        `reduce`, each image to its own prompt's share of the budget, as it would be alone (a prompt at a time
        where `prompts_together` is false). Qwen2-VL / Qwen2.5-VL: `reduce_qwen` on each image (module docstring)."""
        if is_qwen(model):
            return self.encode_qwen(model, pixel_values, image_sizes)
        if not self.prompts_together and len(pixel_values) > 1:
            return [output for pixels, sizes in zip(pixel_values, image_sizes)
                    for output in self.encode_prompts(model, [pixels], [sizes], tiled)]
        check_feature_layer(model.config)
        tower_images, grids = prompt_tower_images(self.name, model, pixel_values, image_sizes, tiled)
        side = patch_side(model)
        counts_in = [vision_count_in(model, sizes, grid) for sizes, grid in zip(image_sizes, grids)]
        counts = [count for images, count_in in zip(tower_images, counts_in)
                  for count in self.counts(images.shape[0], side * side, self.prompt_options(count_in).budget)]
        weight = model.model.vision_tower.embeddings.patch_embedding.weight
        selecting = Stopwatch(weight.device)
        reduced = self.reduce(model, torch.cat(tower_images).to(device=weight.device, dtype=weight.dtype), counts,
                              selecting)
        cls_kept = vision_token_offset(model.config)
        outputs, first = [], 0
        for n, images in enumerate(tower_images):
            mine = reduced[first : first + images.shape[0]]
            first += images.shape[0]
            outputs.append(self.image_output(model, mine[0], cls_kept, counts_in[n]) if grids[n] is None
                           else self.next_output(model, mine, counts_in[n], cls_kept))
        share = selecting.seconds() / len(outputs)
        for output in outputs:
            output.selection_seconds = share
        return outputs

    def image_output(self, model, reduced: ReducedImage, cls_kept: int, count_in: int) -> VisionOutput:
        """A LLaVA-1.5 prompt's features from its reduced image."""
        features = project_features(model, reduced.hidden[None])
        stats = {"vision_tokens_in": count_in, "vision_tokens": features.shape[0]}
        return VisionOutput(features=features, stats=stats, patch_groups=[[]] * cls_kept + reduced.patch_groups)

    def next_output(self, model, reduced: list[ReducedImage], count_in: int, cls_kept: int) -> VisionOutput:
        """A LLaVA-NeXT prompt's features: its reduced tower images one after the other (module docstring)."""
        features = torch.cat([project_features(model, image.hidden[None]) for image in reduced])
        stats = {"vision_tokens_in": count_in, "vision_tokens": features.shape[0], "images": len(reduced),
                 "crops": len(reduced) - 1, "vision_tokens_per_image_in": patch_side(model) ** 2 + cls_kept}
        return VisionOutput(features=features, stats=stats)


@dataclass
class QwenTokens:
    """One Qwen image's decoder tokens after a method: features [n, hidden], each token's (t, row, column) offset
    [3, n] (long), and per token the cells of the image's token grid it stands for (cell row * columns +
    column of the merged grid; None when the grid has several frames)."""

    features: torch.Tensor
    positions: torch.Tensor
    cells: list[list[int]] | None


def token_cells(positions: torch.Tensor, columns: int, frames: int) -> list[list[int]] | None:
    """Each token's one cell (row * columns + column) of a one-frame token grid; None for several frames."""
    if frames != 1:
        return None
    _, rows, cols = positions.detach().cpu().long()
    return [[cell] for cell in (rows * columns + cols).tolist()]


def kept_qwen_tokens(vision: VisionOutput, kept: torch.Tensor, columns: int, frames: int) -> QwenTokens:
    """The decoder tokens `kept` (ascending) of an unpruned Qwen image, each with its own position."""
    kept = kept.to(vision.features.device)
    positions = vision.positions[:, kept.to(vision.positions.device)]
    return QwenTokens(vision.features[kept], positions, token_cells(positions, columns, frames))


def qwen_output(vision: VisionOutput, tokens: QwenTokens, stats: dict | None = None) -> VisionOutput:
    """A Qwen prompt's vision output from its unpruned one and the tokens a method returned: the image's
    `position_span` (where the text after it goes on) unchanged."""
    return VisionOutput(features=tokens.features, positions=tokens.positions, position_span=vision.position_span,
                        patch_groups=tokens.cells,
                        stats={**vision.stats, "vision_tokens": tokens.features.shape[0], **(stats or {})})


def reduce_qwen_images(method: DropMethod, outputs: list[VisionOutput], reduce_one) -> list[VisionOutput]:
    """Every prompt's unpruned Qwen vision output (`encode_qwen_images`: one tower pass for them all) reduced on its
    own by `reduce_one(n, vision, count)`, `count` prompt n's budget (None without one: the method's own choice),
    timed as the method's selection."""
    reduced = []
    selecting = Stopwatch(outputs[0].features.device) if outputs else None
    for n, vision in enumerate(outputs):
        budget = method.prompt_options(vision.features.shape[0]).budget
        with selecting:
            reduced.append(reduce_one(n, vision, None if budget is None else int(budget)))
    share = selecting.seconds() / len(reduced) if reduced else 0.0
    for output in reduced:
        output.selection_seconds = share
    return reduced


def keep_patches(hidden: torch.Tensor, kept: torch.Tensor) -> ReducedImage:
    """One image's select-layer states [1 + P, dim] cut to CLS and the patches `kept` (ascending)."""
    tokens = torch.cat([hidden[:PATCHES_START], hidden[PATCHES_START:][kept]])
    return ReducedImage(tokens, [[patch] for patch in kept.tolist()])
