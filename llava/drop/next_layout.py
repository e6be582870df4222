"""Where LLaVA-NeXT's vision tokens sit in the model's own `spatial_unpad` layout, on index grids.

transformers' `LlavaNextModel.pack_image_features` lays the crops' patch features out as one big grid
(crop rows x patches per side by crop columns x patches per side), removes the rows or columns that came
from padding (`unpad_image`) and appends a newline token after each remaining row. A method that
shortens a crop's sequence (MustDrop merges a window into one token) can keep that layout by anchoring
each token to one cell of the big grid. These helpers compute the layout by running transformers' own
grid-shape and unpad functions on a grid of cell indices, so the rounding is always the model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

NEWLINE = -1  # a newline token's entry in `spatial_order`
NO_CELL = -1  # anchor of a token none of whose patches survives the unpad
EMPTY_SLOT = -2  # a grid cell no token is anchored at (a merged window's other patches)
CROP_CELLS_PATTERN = "(ch h) (cw w) -> (ch cw) (h w)"  # big grid -> each crop's patches, row-major


@dataclass(frozen=True)
class CropGrid:
    """The crops of one image as the model packs them: `kept` holds the big-grid cell index (row-major
    over the padded big grid) of every cell that survives the unpad, in its unpadded row and column."""

    crops_high: int
    crops_wide: int
    side: int  # patches per crop side
    kept: torch.Tensor  # [rows, cols]

    @property
    def rows(self) -> int:
        """Rows of the unpadded grid, i.e. newline tokens."""
        return self.kept.shape[0]

    @property
    def crops(self) -> int:
        return self.crops_high * self.crops_wide

    def crop_cells(self) -> torch.Tensor:
        """[crops, side * side]: the big-grid cell of each crop's patch (crops and patches row-major)."""
        cells = torch.arange(self.crops * self.side * self.side).view(self.crops_high * self.side, -1)
        return rearrange(cells, CROP_CELLS_PATTERN, h=self.side, w=self.side)

    def surviving(self) -> torch.Tensor:
        """[crops, side * side] bool: which of each crop's patches the unpad keeps."""
        survives = torch.zeros(self.crops * self.side * self.side, dtype=torch.bool)
        survives[self.kept.flatten()] = True
        return survives[self.crop_cells()]


def crop_grid(config, image_size: torch.Tensor) -> CropGrid:
    """The crop grid the model builds for an image of `image_size` ([height, width]), from its
    `image_grid_pinpoints`, exactly as `pack_image_features` does."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    crops_high, crops_wide = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints,
                                                         config.vision_config.image_size)
    cells = torch.arange(crops_high * side * crops_wide * side).view(1, crops_high * side, crops_wide * side)
    return CropGrid(crops_high, crops_wide, side, unpad_image(cells, image_size)[0])


def token_anchors(grid: CropGrid, groups_per_crop: list[list[list[int]]]) -> torch.Tensor:
    """The big-grid cell each crop token is placed at, crops in order: the first patch of the token's
    group (row-major) that survives the unpad, or NO_CELL when none does.

    `groups_per_crop[c]` lists, per token of crop c in sequence order, the crop-local patches it stands
    for (one patch, or a merged window's patches in row-major order). Anchoring at the first *surviving*
    patch keeps a merged window that straddles the unpad edge, as its surviving patches would have been.
    """
    cells, survives = grid.crop_cells().tolist(), grid.surviving().tolist()
    return torch.tensor([next((cells[crop][patch] for patch in group if survives[crop][patch]), NO_CELL)
                         for crop, groups in enumerate(groups_per_crop) for group in groups], dtype=torch.long)


def spatial_order(grid: CropGrid, anchors: torch.Tensor) -> torch.Tensor:
    """The crop part of the spatial sequence: per slot, the index of the token anchored there, or NEWLINE.

    Row by row over the unpadded grid, the tokens anchored in that row (left to right), then one newline;
    every row gets its newline, also a row that merging left without tokens, as the model gives every
    row of the unpadded grid one. Tokens anchored at NO_CELL are left out.
    """
    rows, cols = grid.kept.shape
    slot_of_cell = torch.full((grid.crops * grid.side * grid.side,), NO_CELL, dtype=torch.long)
    unpadded = torch.arange(rows * cols)
    slot_of_cell[grid.kept.flatten()] = unpadded // cols * (cols + 1) + unpadded % cols  # room for the newline
    slots = torch.full((rows, cols + 1), EMPTY_SLOT, dtype=torch.long)
    slots[:, cols] = NEWLINE
    placed = (anchors != NO_CELL).nonzero().flatten()
    slots.view(-1)[slot_of_cell[anchors[placed]]] = placed
    slots = slots.flatten()
    return slots[slots != EMPTY_SLOT]
