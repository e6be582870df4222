"""Pictures of what a token-dropping method keeps: one panel per stage, on the image the model saw.

    python -m llava.viz --model-path M --image IMG --question Q [--method mustdrop] [--method-args k=v,...]
        [--conv-mode vicuna_v1] [--out-dir viz/] [--device cpu] [--dtype fp32] [--min-pixels N] [--max-pixels N]

Runs the vision stage and the prefill once (no decoding) and writes `0_vision.png`, one
`K_layerLL.png` per dropping layer and `overview.png` with every panel side by side.

How tokens map back to the image: `VisionOutput.patch_groups` says which patches of the 24 x 24 grid
each vision token stands for (a MustDrop merged token covers its 3 x 3 window); without groups, token
i is patch i when the count matches, and the mapping is drawn as unknown otherwise. Each prefill drop
lists the sequence positions it keeps in the sequence as it was then, so composing the vision part of
the successive keep lists gives the original vision tokens that survive each dropping layer.

On LLaVA-NeXT each stage is two panels: the base image on its 24 x 24 grid, and the crops put back
together on the crop grid, in the image's own layout (the places the model unpads, which are no token,
hatched; newline tokens counted in the title). The vision tokens are then the model's own (`next_token_cells`:
its `mm_patch_merge_type`, flat or spatial_unpad), which is what the unpruned model and the methods that
drop only in the decoder (FastV, PDrop, SparseVLM) start from. A method with a vision stage of its own
(MustDrop, VisionZip, ...) reports no token-to-patch map on NeXT, so it is refused there before the model
loads, with the methods that can be drawn, rather than drawn wrong.

On Qwen2-VL / Qwen2.5-VL the picture is the image at the size the image processor resized it to (the
patches' pixel values put back together, normalisation undone), under its grid of decoder tokens: each
token is one 28 x 28 px cell (2 x 2 patches of 14 px), h/2 rows by w/2 columns of the patch grid [t, h, w],
and its row and column are read from `VisionOutput.positions` (`qwen_token_cells`). Only the methods that
run on Qwen are drawn: the unpruned model, FastV, PDrop, SparseVLM and MustDrop without its vision stage
(`--method-args vision_merge=false`, no key set); the vision-stage methods are refused before the model
loads, with the methods that can be drawn. Without `--conv-mode` a Qwen checkpoint is prompted with its own
template (`qwen`), a LLaVA one with vicuna_v1; `auto` reads it from the checkpoint's config files.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from llava.conversation import get_conv_template
from llava.drop.next_layout import CropGrid, crop_grid
from llava.drop.prefill import MultimodalPrompt, PrefillResult, build_prompt, prefill_prompt
from llava.drop.methods import METHODS, DropMethod, create_method, parse_method_args
from llava.drop.methods.registry import discover_methods
from llava.drop.vision import FLAT_MERGE, VisionOutput, is_next, vision_token_offset
from llava.eval.answering.loop import resolve_conv_mode
from llava.eval.cli_errors import RunError, interruptible, main_guard, refuse_non_finite_options
from llava.mm_utils import load_image
from llava.model.builder import check_device, default_device, load_pretrained_model
from llava.model.checkpoint_files import CheckpointError
from llava.model.geometry import QWEN_FAMILY, ModelGeometry, geometry_of_model, read_geometry
from llava.model.inputs import encode_question
from llava.model.qwen import is_qwen, merged_grid
from llava.output_paths import check_output_folder

NUM_PATCHES = 576  # LLaVA-1.5's 24 x 24 grid
DEFAULT_METHOD = "mustdrop"
DEFAULT_CONV_MODE = "vicuna_v1"
DEFAULT_OUT_DIR = "viz"
VISION_STAGE = "vision stage"
VISION_STEM = "0_vision"
OVERVIEW_STEM = "overview"
PANEL_INCHES = 4.6
TITLE_INCHES = 0.6  # room above the image for the two-line title
LEGEND_INCHES = 0.7
CAPTION_GAP_INCHES = 0.05  # between the panels and a caption, which sits above the legend
LABEL_INCHES = 0.3  # room left of the panels for a LLaVA-NeXT picture's label
DPI = 110
# Dropped patches: shaded dark blue, not grey, so that they stand apart from LLaVA's pad-to-square margin,
# which is CLIP's mean colour (a warm grey) and is often dropped too.
DIM_RGBA = (0.05, 0.07, 0.3, 0.78)
GRID_LINE = {"color": "white", "linewidth": 0.3, "alpha": 0.35}
MERGED_COLOUR = "#ff9f1c"
MERGED_LINE_WIDTH = 1.6
KEY_COLOUR = "#e71d36"
KEY_DOT_SIZE = 22
UNKNOWN_TEXT = "token-to-patch mapping unknown\n(the method reports no patch groups)"
NO_TOKEN = -1  # a grid place that is no token of the model's (LLaVA-NeXT unpads the crops' padding)
NO_TOKEN_RGBA = (0.85, 0.85, 0.85, 0.9)
NO_TOKEN_HATCH = "////"
CROP_BORDER = {"color": "white", "linewidth": 1.4, "alpha": 0.9}
BASE_IMAGE_LABEL = "base image"
# On Qwen, MustDrop runs (and is drawn) without its vision stage; how to ask for that on this CLI.
QWEN_MUSTDROP = "mustdrop with --method-args vision_merge=false"  # listed last by `drawable_on_qwen`


@dataclass(frozen=True)
class PatchGrid:
    """A picture under a patch grid: `image` [H, W, 3] in 0..1 and, per grid place, the cell of the stage masks
    it shows (NO_TOKEN: no token stands there). `tile` draws the crops' borders every `tile` patches (0: none).
    A Qwen picture's places are decoder tokens (`cell_name`), its size said once under the panels (`caption`)."""

    label: str  # "" for LLaVA-1.5's one image and Qwen's; "base image" and "crops ..." on LLaVA-NeXT
    image: np.ndarray
    cells: np.ndarray  # [rows, cols] int
    tile: int = 0
    cell_name: str = "patch"  # what one grid place is, in the legend
    caption: str = ""

    def places(self) -> dict[int, tuple[int, int]]:
        """(row, column) of each cell this grid shows."""
        return {int(self.cells[row, col]): (int(row), int(col)) for row, col in np.argwhere(self.cells != NO_TOKEN)}


@dataclass(frozen=True)
class TokenCells:
    """Which cells each vision token stands for (`groups[t]`; a CLS or newline token: none) among `num_cells`
    (None: unknown), and which tokens are LLaVA-NeXT's newline tokens."""

    groups: list[list[int]] | None
    num_cells: int
    newlines: frozenset[int] = frozenset()


@dataclass
class StageView:
    """What survives one stage, on the patch grid. Masks are None when the mapping is unknown."""

    name: str  # "vision stage" or "after layer L"
    file_stem: str  # "0_vision", "1_layer02", ...
    tokens_kept: int
    tokens_in: int  # vision tokens before any dropping (the unpruned model's count)
    kept: np.ndarray | None  # [num_patches] bool: patches behind a surviving token
    key_groups: list[list[int]]  # patches behind each surviving key-set token
    merged: list[list[int]]  # patches behind each surviving token that stands for several (outlined)
    newlines_kept: int = 0  # LLaVA-NeXT's newline tokens (one per crop-grid row) still present
    newlines_in: int = 0

    @property
    def keys(self) -> np.ndarray | None:
        """[num_patches] bool: patches behind a surviving key-set token."""
        if self.kept is None:
            return None
        return patch_mask(self.key_groups, self.kept.size)


def patch_mask(groups: Sequence[Sequence[int]], num_patches: int) -> np.ndarray:
    mask = np.zeros(num_patches, dtype=bool)
    for group in groups:
        mask[list(group)] = True
    return mask


def token_patch_groups(vision: VisionOutput, num_patches: int) -> list[list[int]] | None:
    """Patches behind each vision token; identity when one token per patch; None when unknown."""
    if vision.patch_groups is not None:
        return vision.patch_groups
    if vision.features.shape[0] == num_patches:
        return [[patch] for patch in range(num_patches)]
    return None


def surviving_tokens(drops: Sequence[tuple[int, torch.Tensor]], vision_start: int,
                     vision_count: int) -> list[tuple[int, np.ndarray]]:
    """(layer, original vision-token indices still present) after each drop.

    Each keep list indexes the sequence as it was before that drop: system tokens, then the vision
    tokens alive so far, then text; its vision part picks among the alive tokens.
    """
    alive = np.arange(vision_count)
    survivors = []
    for layer, keep in drops:
        keep = keep.detach().cpu().numpy()
        in_vision = (keep >= vision_start) & (keep < vision_start + alive.size)
        alive = alive[keep[in_vision] - vision_start]
        survivors.append((layer, alive))
    return survivors


def stage_view(name: str, file_stem: str, alive: np.ndarray, cells: TokenCells, key_tokens: set[int],
               tokens_in: int) -> StageView:
    """One stage's masks from the original vision tokens still present."""
    newlines = (len(cells.newlines & set(alive.tolist())), len(cells.newlines))
    if cells.groups is None:
        return StageView(name, file_stem, alive.size, tokens_in, None, [], [], *newlines)
    alive_groups = [cells.groups[token] for token in alive.tolist()]
    key_groups = [cells.groups[token] for token in alive.tolist() if token in key_tokens and cells.groups[token]]
    return StageView(name, file_stem, alive.size, tokens_in, patch_mask(alive_groups, cells.num_cells), key_groups,
                     [group for group in alive_groups if len(group) > 1], *newlines)


def kept_patches_per_stage(vision: VisionOutput, prefilled: PrefillResult, prompt: MultimodalPrompt,
                           num_patches: int = NUM_PATCHES, cells: TokenCells | None = None) -> list[StageView]:
    """The vision stage's view, then one per prefill drop, each mapped onto the patch grid: by `cells` where
    given (LLaVA-NeXT's own layout), else by the vision output's patch groups over `num_patches` patches."""
    if cells is None:
        cells = TokenCells(token_patch_groups(vision, num_patches), num_patches)
    if cells.groups is not None and len(cells.groups) != prompt.vision_count:
        raise ValueError(f"{len(cells.groups)} patch groups for {prompt.vision_count} vision tokens")
    key_tokens = set() if vision.key_indices is None else set(vision.key_indices.tolist())
    tokens_in = vision.stats.get("vision_tokens_in", prompt.vision_count)
    views = [stage_view(VISION_STAGE, VISION_STEM, np.arange(prompt.vision_count), cells, key_tokens, tokens_in)]
    survivors = surviving_tokens(prefilled.drops, prompt.vision_start, prompt.vision_count)
    for step, (layer, alive) in enumerate(survivors, start=1):
        views.append(stage_view(f"after layer {layer}", f"{step}_layer{layer:02d}", alive, cells, key_tokens,
                                tokens_in))
    return views


def crop_cell_numbers(grid: CropGrid) -> np.ndarray:
    """Per place of the crop grid (row-major over the padded grid), its cell: patch p of crop c (crops
    row-major) is cell (1 + c) * P + p, after the base image's P cells."""
    per_image = grid.side * grid.side
    numbers = np.empty(grid.crops * per_image, dtype=np.int64)
    numbers[grid.crop_cells().flatten().numpy()] = per_image + np.arange(grid.crops * per_image)
    return numbers


def is_flat(config) -> bool:
    return getattr(config, "mm_patch_merge_type", None) == FLAT_MERGE


def next_token_cells(config, grid: CropGrid, images: int) -> TokenCells:
    """LLaVA-NeXT's own layout of one image's vision tokens (`encode_next_image`; no method changed the
    tower's tokens), over cells i * P + p, patch p of tower image i (0: the base image, then the crops
    row-major). "flat": every tower image's tokens in turn (CLS first when the select strategy keeps it);
    "spatial_unpad": the base image's, then the crop grid unpadded row by row, a newline token after each row."""
    per_image = grid.side * grid.side
    if is_flat(config):
        image_groups = [[]] * vision_token_offset(config) + [[patch] for patch in range(per_image)]
        groups = [[cell + image * per_image for cell in group] for image in range(images) for group in image_groups]
        return TokenCells(groups, images * per_image)
    numbers = crop_cell_numbers(grid)
    groups, newlines = [[]] * vision_token_offset(config) + [[patch] for patch in range(per_image)], []
    for row in grid.kept.tolist():
        groups += [[int(numbers[place])] for place in row]
        newlines.append(len(groups))
        groups.append([])
    return TokenCells(groups, (1 + grid.crops) * per_image, frozenset(newlines))


def image_crop_grid(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None) -> CropGrid | None:
    """The crop grid of a LLaVA-NeXT prompt's image, or None when its pixel values are not its base image and
    that grid's crops (then no picture can place them)."""
    if image_sizes is None or pixel_values.dim() != 5 or image_sizes.shape[0] != 1:
        return None
    grid = crop_grid(model.config, image_sizes[0].tolist())
    return grid if pixel_values.shape[1] == 1 + grid.crops else None


def model_token_cells(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None,
                      vision_count: int) -> TokenCells | None:
    """On LLaVA-NeXT, the cells of the model's own vision tokens (unknown when the layout does not give
    `vision_count` tokens); None on LLaVA-1.5, where the vision output's patch groups say it."""
    if not is_next(model):
        return None
    grid = image_crop_grid(model, pixel_values, image_sizes)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    unknown = TokenCells(None, pixel_values.shape[1] * side * side)
    if grid is None:
        return unknown
    cells = next_token_cells(model.config, grid, pixel_values.shape[1])
    return cells if len(cells.groups) == vision_count else unknown


def qwen_token_cells(model, vision: VisionOutput, grid: torch.Tensor) -> TokenCells:
    """Qwen2-VL / Qwen2.5-VL: each vision token's cell on the decoder-token grid of the patch grid `grid` [[t, h, w]]
    (h/2 rows by w/2 columns, cells row-major), read from its (t, row, column) offset in `vision.positions`;
    unknown when the tokens carry no positions or the grid has several frames (a video), which one picture
    cannot show."""
    frames, rows, columns = merged_grid(model, grid)
    positions = vision.positions
    if positions is None or frames != 1 or positions.shape[1] != vision.features.shape[0]:
        return TokenCells(None, rows * columns)
    _, row, column = positions.detach().cpu().long()
    return TokenCells([[cell] for cell in (row * columns + column).tolist()], rows * columns)


def qwen_view_image(pixel_values: torch.Tensor, grid: torch.Tensor, image_processor) -> np.ndarray:
    """The resized image a Qwen tower saw, [h * 14, w * 14, 3] in 0..1, from its patches [patches, channels *
    temporal * 14 * 14] and their grid [[t, h, w]]: the image processor's patch order undone (2 x 2 blocks of
    patches row-major, the patches of a block row-major, a frame repeated over the temporal patch), its
    normalisation too. The first frame of the first temporal patch."""
    _, height, width = (int(size) for size in grid.reshape(-1))
    merge, patch = image_processor.merge_size, image_processor.patch_size
    channels = len(image_processor.image_mean)
    patches = pixel_values.detach().float().cpu()[: height * width]
    patches = patches.reshape(height // merge, width // merge, merge, merge, channels,
                              image_processor.temporal_patch_size, patch, patch)[:, :, :, :, :, 0]
    # (block row, block column, row in block, column in block, channel, pixel row, pixel column) -> [H, W, C]
    image = patches.permute(0, 2, 5, 1, 3, 6, 4).reshape(height * patch, width * patch, channels)
    mean, std = torch.tensor(image_processor.image_mean), torch.tensor(image_processor.image_std)
    return (image * std + mean).clamp(0, 1).numpy()


def qwen_grid(model, image_processor, pixel_values: torch.Tensor, grid: torch.Tensor) -> PatchGrid:
    """A Qwen image's picture: the resized image under its grid of decoder tokens (cell r * columns + c)."""
    _, rows, columns = merged_grid(model, grid)
    image = qwen_view_image(pixel_values, grid, image_processor)
    side = image.shape[0] // rows
    caption = (f"as resized for the model: {image.shape[1]} x {image.shape[0]} px, "
               f"{rows} x {columns} tokens of {side} x {side} px")
    return PatchGrid("", image, np.arange(rows * columns).reshape(rows, columns), cell_name="token", caption=caption)


def pixel_image(pixels: torch.Tensor, image_processor) -> np.ndarray:
    """One tower image [3, H, W] as the tower saw it, [H, W, 3] in 0..1 (normalisation undone)."""
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return (pixels.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def model_view_image(pixel_values: torch.Tensor, image_processor) -> np.ndarray:
    """The padded, resized image the tower saw, [side, side, 3] in 0..1 (normalisation undone); on
    LLaVA-NeXT the base image."""
    return pixel_image(pixel_values[0, 0] if pixel_values.dim() == 5 else pixel_values[0], image_processor)


def single_grid(image: np.ndarray, num_cells: int) -> PatchGrid:
    """LLaVA-1.5's one square grid of `num_cells` patches over `image`."""
    side = math.isqrt(num_cells)
    return PatchGrid("", image, np.arange(side * side).reshape(side, side))


def next_grids(pixel_values: torch.Tensor, image_processor, grid: CropGrid, unpadded: bool) -> list[PatchGrid]:
    """LLaVA-NeXT's two pictures: the base image on its grid, and the crops put back together on the crop
    grid (`unpadded`: the places the model's spatial_unpad removes are no token)."""
    side, per_image = grid.side, grid.side * grid.side
    crops = [pixel_image(pixel_values[0, 1 + crop], image_processor) for crop in range(grid.crops)]
    picture = np.concatenate([np.concatenate(crops[row * grid.crops_wide : (row + 1) * grid.crops_wide], axis=1)
                              for row in range(grid.crops_high)], axis=0)
    cells = crop_cell_numbers(grid)
    if unpadded:
        tokens = np.zeros(cells.size, dtype=bool)
        tokens[grid.kept.flatten().numpy()] = True
        cells[~tokens] = NO_TOKEN
    label = f"crops ({grid.crops_high} x {grid.crops_wide} grid{', unpadded' if unpadded else ''})"
    return [PatchGrid(BASE_IMAGE_LABEL, pixel_image(pixel_values[0, 0], image_processor),
                      np.arange(per_image).reshape(side, side)),
            PatchGrid(label, picture, cells.reshape(grid.crops_high * side, grid.crops_wide * side), tile=side)]


def picture_grids(model, image_processor, pixel_values: torch.Tensor,
                  image_sizes: torch.Tensor | None = None) -> list[PatchGrid]:
    """The pictures the stages are drawn on: LLaVA-1.5's one image, LLaVA-NeXT's base image and crops (its base
    image alone when its crops cannot be placed, which `model_token_cells` reports as unknown too), a Qwen
    image at its resized size under its token grid (`image_sizes` is its patch grid [[t, h, w]] there)."""
    if is_qwen(model):
        return [qwen_grid(model, image_processor, pixel_values, image_sizes)]
    vision_config = model.config.vision_config
    per_image = (vision_config.image_size // vision_config.patch_size) ** 2
    grid = image_crop_grid(model, pixel_values, image_sizes) if is_next(model) else None
    if grid is None:
        return [single_grid(model_view_image(pixel_values, image_processor), per_image)]
    return next_grids(pixel_values, image_processor, grid, unpadded=not is_flat(model.config))


def outline_edges(places: set[tuple[int, int]]) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Edges (in patch units, x right, y down) between these (row, column) places and the places outside them."""
    edges = []
    for row, col in places:
        sides = {(row - 1, col): ((col, row), (col + 1, row)), (row + 1, col): ((col, row + 1), (col + 1, row + 1)),
                 (row, col - 1): ((col, row), (col, row + 1)), (row, col + 1): ((col + 1, row), (col + 1, row + 1))}
        edges += [edge for neighbour, edge in sides.items() if neighbour not in places]
    return edges


def group_outline(group: Sequence[int], grid: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Edges between the group's patches (row-major on a `grid` x `grid` grid) and the patches outside it."""
    return outline_edges({divmod(patch, grid) for patch in group})


def no_token_runs(tokens: np.ndarray) -> list[tuple[int, int, int]]:
    """(row, first column, length) of each run of places that are no token, row by row."""
    runs = []
    for row, line in enumerate(tokens):
        edges = np.flatnonzero(np.diff(np.concatenate([[1], line.astype(np.int8), [1]])))
        runs += [(row, int(start), int(end - start)) for start, end in zip(edges[::2], edges[1::2])]
    return runs


def stage_title(stage: StageView, method: str) -> str:
    return f"{method}: {stage.name}\n{stage.tokens_kept} of {stage.tokens_in} vision tokens kept"


def grid_title(stage: StageView) -> str:
    """The title of a NeXT picture below the first: its newline tokens, which have no place on it."""
    return f"newline tokens: {stage.newlines_kept} of {stage.newlines_in} kept" if stage.newlines_in else ""


def draw_stage(ax, grid: PatchGrid, stage: StageView, title: str) -> None:
    """The picture on its patch grid: dropped patches shaded, merged tokens outlined, key tokens dotted, places
    that are no token hatched."""
    rows, cols = grid.cells.shape
    extent = (0, cols, rows, 0)
    ax.imshow(grid.image, extent=extent)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if grid.label:
        ax.set_ylabel(grid.label, fontsize=9)
    if stage.kept is None:
        ax.text(cols / 2, rows / 2, UNKNOWN_TEXT, ha="center", va="center", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.85})
        return
    tokens = grid.cells != NO_TOKEN
    dropped = np.zeros(grid.cells.shape, dtype=bool)
    dropped[tokens] = ~stage.kept[grid.cells[tokens]]
    overlay = np.zeros((rows, cols, 4))
    overlay[dropped] = DIM_RGBA
    overlay[~tokens] = NO_TOKEN_RGBA
    ax.imshow(overlay, extent=extent, interpolation="nearest")
    for row, start, length in no_token_runs(tokens):
        ax.add_patch(Rectangle((start, row), length, 1, fill=False, hatch=NO_TOKEN_HATCH, linewidth=0,
                               edgecolor="grey"))
    for line in range(1, rows):
        ax.axhline(line, **(CROP_BORDER if grid.tile and line % grid.tile == 0 else GRID_LINE))
    for line in range(1, cols):
        ax.axvline(line, **(CROP_BORDER if grid.tile and line % grid.tile == 0 else GRID_LINE))
    places = grid.places()
    edges = [edge for group in stage.merged for edge in outline_edges({places[c] for c in group if c in places})]
    ax.add_collection(LineCollection(edges, colors=MERGED_COLOUR, linewidths=MERGED_LINE_WIDTH))
    centres = [np.mean([places[c] for c in group if c in places], axis=0)[::-1] + 0.5
               for group in stage.key_groups if any(c in places for c in group)]
    if centres:
        centres = np.array(centres)
        ax.scatter(centres[:, 0], centres[:, 1], s=KEY_DOT_SIZE, c=KEY_COLOUR, edgecolors="white", linewidths=0.6)
    ax.set_xlim(0, cols)
    ax.set_ylim(rows, 0)


def legend_handles(stages: Sequence[StageView], grids: Sequence[PatchGrid] = ()) -> list:
    """Legend entries for what the panels show; none where no panel maps tokens to patches."""
    if all(stage.kept is None for stage in stages):
        return []
    cell = grids[0].cell_name if grids else "patch"
    handles = [Patch(facecolor="none", edgecolor="black", label=f"kept {cell} (clear)"),
               Patch(facecolor=DIM_RGBA, label=f"dropped {cell} (shaded blue)")]
    if any((grid.cells == NO_TOKEN).any() for grid in grids):
        handles.append(Patch(facecolor=NO_TOKEN_RGBA, edgecolor="grey", hatch=NO_TOKEN_HATCH,
                             label="no token (the model unpads it)"))
    if any(stage.merged for stage in stages):
        handles.append(Patch(facecolor="none", edgecolor=MERGED_COLOUR, linewidth=MERGED_LINE_WIDTH,
                             label="merged window (one token)"))
    if any(stage.key_groups for stage in stages):
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor=KEY_COLOUR,
                              markeredgecolor="white", label="key-set token (never dropped)"))
    return handles


def as_grids(image: np.ndarray | Sequence[PatchGrid], stages: Sequence[StageView]) -> list[PatchGrid]:
    """The pictures to draw on: `image` is LLaVA-1.5's image the tower saw (one square grid of the stages'
    size) or the pictures from `picture_grids`."""
    if isinstance(image, np.ndarray):
        sizes = {stage.kept.size for stage in stages if stage.kept is not None}
        return [single_grid(image, sizes.pop() if len(sizes) == 1 else NUM_PATCHES)]
    return list(image)


def panels_figure(image: np.ndarray | Sequence[PatchGrid], stages: Sequence[StageView], method: str) -> Figure:
    """One figure with the stages side by side (a row per picture: on LLaVA-NeXT the base image, then the
    crops) and a shared legend underneath, the pictures' captions (a Qwen image's resized size) above it."""
    grids = as_grids(image, stages)
    panel_heights = [PANEL_INCHES * min(1.0, grid.cells.shape[0] / grid.cells.shape[1]) for grid in grids]
    width = PANEL_INCHES * len(stages) + (LABEL_INCHES if grids[0].label else 0)
    height = sum(panel_heights) + TITLE_INCHES * len(grids) + LEGEND_INCHES
    figure = Figure(figsize=(width, height), dpi=DPI)
    axes = figure.subplots(len(grids), len(stages), squeeze=False, gridspec_kw={"height_ratios": panel_heights})
    left = (LABEL_INCHES + 0.02 * PANEL_INCHES) / width if grids[0].label else 0.02
    figure.subplots_adjust(left=left, right=0.98, bottom=LEGEND_INCHES / height, top=1 - TITLE_INCHES / height,
                           wspace=0.05, hspace=TITLE_INCHES * len(grids) / sum(panel_heights))
    for row, grid in enumerate(grids):
        for ax, stage in zip(axes[row], stages):
            draw_stage(ax, grid, stage, stage_title(stage, method) if row == 0 else grid_title(stage))
    captions = [grid.caption for grid in grids if grid.caption]
    if captions:
        figure.text(0.5, (LEGEND_INCHES - CAPTION_GAP_INCHES) / height, "; ".join(captions), ha="center", va="top",
                    fontsize=8)
    handles = legend_handles(stages, grids)
    if handles:
        legend_columns = len(handles) if len(stages) > 1 else 2
        figure.legend(handles=handles, loc="lower center", ncol=legend_columns, fontsize=8, frameon=False)
    return figure


def save_figures(image: np.ndarray | Sequence[PatchGrid], stages: Sequence[StageView], method: str,
                 out_dir: Path) -> list[Path]:
    """One PNG per stage and an overview with all of them; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = {stage.file_stem: [stage] for stage in stages} | {OVERVIEW_STEM: list(stages)}
    paths = []
    for stem, shown in panels.items():
        paths.append(out_dir / f"{stem}.png")
        panels_figure(image, shown, method).savefig(paths[-1])
    return paths


def drawable_on_next() -> list[str]:
    """The methods whose vision tokens on LLaVA-NeXT are the model's own, so a picture can place them."""
    discover_methods()
    return sorted(name for name in METHODS if not create_method(name, {}).has_own_vision_stage)


def next_refusal(method: DropMethod) -> str | None:
    """Why `method` cannot be drawn on LLaVA-NeXT, or None: a vision stage of its own changes the base image's
    and crops' tokens without reporting which patches each stands for there."""
    if not method.has_own_vision_stage:
        return None
    return (f"--method {method.name}: llava.viz cannot draw it on LLaVA-NeXT: its vision stage changes the base "
            "image's and crops' tokens without reporting which patches each one stands for there; draw "
            f"{', '.join(drawable_on_next())} on this checkpoint, or {method.name} on a LLaVA-1.5 checkpoint")


def drawable_on_qwen() -> list[str]:
    """The methods that run on Qwen2-VL / Qwen2.5-VL as they are asked for by default, and MustDrop without its
    vision stage."""
    discover_methods()
    return [*sorted(name for name in METHODS if create_method(name, {}).runs_on_qwen), QWEN_MUSTDROP]


def qwen_refusal(method: DropMethod) -> str | None:
    """Why `method` cannot be drawn on Qwen2-VL / Qwen2.5-VL, or None: it does not run there (a vision stage
    written for CLIP's tower), so there is nothing to draw."""
    if not method.enabled or method.runs_on_qwen:
        return None
    *others, mustdrop = drawable_on_qwen()
    return (f"--method {method.name}: llava.viz cannot draw it on Qwen2-VL / Qwen2.5-VL: its vision stage reads "
            "CLIP's CLS token or square grid of patches, which Qwen's tower does not have, so it does not run there; "
            f"draw {', '.join(others)}, or {mustdrop} (its stages 2 and 3, no key set) on this checkpoint")


def check_drawable(method: DropMethod, geometry: ModelGeometry) -> None:
    """Refuse what cannot be drawn on this model, from its geometry (its config files): a method that does not
    run on a Qwen checkpoint, the method's own checks, and a NeXT checkpoint for a method whose tokens cannot
    be placed on it."""
    refusal = qwen_refusal(method) if geometry.family == QWEN_FAMILY else None
    if refusal:
        raise ValueError(refusal)
    method.check_model(geometry)
    refusal = next_refusal(method) if geometry.max_crops else None
    if refusal:
        raise ValueError(refusal)


@torch.inference_mode()
def trace_stages(model, method: DropMethod, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                 image_sizes: torch.Tensor | None = None) -> list[StageView]:
    """Vision stage and prefill once, as `generate` runs them, mapped onto the patch grid (LLaVA-NeXT and Qwen:
    onto the cells of `picture_grids`; their `image_sizes` are needed there: NeXT's image size, Qwen's patch
    grid [[t, h, w]])."""
    check_drawable(method, geometry_of_model(model))
    if is_qwen(model):
        vision = method.encode_images(model, [pixel_values], [image_sizes])[0]
        prompt = build_prompt(model, input_ids, vision)
        prefilled = prefill_prompt(model, prompt, method)
        return kept_patches_per_stage(vision, prefilled, prompt, cells=qwen_token_cells(model, vision, image_sizes))
    next_model = is_next(model)
    vision = (method.encode_next(model, pixel_values, image_sizes) if next_model
              else method.encode_image(model, pixel_values))
    prompt = build_prompt(model, input_ids, vision)
    prefilled = prefill_prompt(model, prompt, method)
    vision_config = model.config.vision_config
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    cells = model_token_cells(model, pixel_values, image_sizes, prompt.vision_count)
    return kept_patches_per_stage(vision, prefilled, prompt, num_patches, cells)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", type=str, required=True)
    parser.add_argument("--image", type=str, required=True)
    parser.add_argument("--question", type=str, required=True)
    parser.add_argument("--method", type=str, default=DEFAULT_METHOD, help="a registered method (see llava/drop/methods)")
    parser.add_argument("--method-args", type=str, default="", help="the method's options as key=value,key=value")
    parser.add_argument("--conv-mode", type=str, default=None,
                        help=f"a conversation template, or auto: the checkpoint's own (default: {DEFAULT_CONV_MODE}; "
                             "qwen for a Qwen2-VL / Qwen2.5-VL checkpoint)")
    parser.add_argument("--out-dir", type=str, default=DEFAULT_OUT_DIR)
    parser.add_argument("--device", type=str, default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", type=str, default=None, help="fp32, fp16 or bf16 (default: fp16 on cuda, fp32 on cpu)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="Qwen2-VL / Qwen2.5-VL: the fewest pixels an image is resized to (default: the checkpoint's)")
    parser.add_argument("--max-pixels", type=int, default=None,
                        help="Qwen2-VL / Qwen2.5-VL: the most pixels an image is resized to (default: the checkpoint's)")
    parser.set_defaults(model_base=None)  # `resolve_conv_mode` reads it for --conv-mode auto
    return parser


def check_before_loading(model_path: str, method: DropMethod, max_pixels: int | None = None) -> None:
    """`check_drawable` on the checkpoint's config files, before any weight loads. A checkpoint whose config
    cannot be read is left to the load, which names the problem in the same words."""
    try:
        geometry = read_geometry(model_path, max_pixels=max_pixels)
    except CheckpointError:
        return
    check_drawable(method, geometry)


def run(args: argparse.Namespace) -> list[Path]:
    """Check the method, template and image first (fast failures), then load, trace and draw."""
    try:
        check_output_folder(args.out_dir, "--out-dir")
        check_device(args.device or default_device())
        method_args = parse_method_args(args.method_args)
        refuse_non_finite_options(method_args)
        method = create_method(args.method, method_args)
        resolve_conv_mode(args, DEFAULT_CONV_MODE)  # none given: vicuna_v1, or qwen for a Qwen checkpoint
        get_conv_template(args.conv_mode)
        image = load_image(args.image)
        check_before_loading(args.model_path, method, args.max_pixels)
        tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, device=args.device,
                                                                     torch_dtype=args.dtype, min_pixels=args.min_pixels,
                                                                     max_pixels=args.max_pixels)
        inputs = encode_question(args.question, image, model, tokenizer, image_processor, args.conv_mode)
        stages = trace_stages(model, method, inputs.input_ids, inputs.pixel_values, inputs.image_sizes)
        grids = picture_grids(model, image_processor, inputs.pixel_values, inputs.image_sizes)
    except ValueError as error:  # bad inputs, checkpoint problems (CheckpointError) included
        raise RunError(str(error)) from None
    paths = save_figures(grids, stages, method.name, Path(args.out_dir))
    for path in paths:
        print(path)
    return paths


@interruptible
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    main_guard(lambda: run(args))


if __name__ == "__main__":
    main()
