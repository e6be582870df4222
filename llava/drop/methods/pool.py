"""Pooling: average-pool each image's grid of patch features down to the square grid nearest a budget.

The plain downsampling baseline that independent evaluations of vision-token pruning (UniPruneBench,
arXiv 2511.02650; VTC-Bench, arXiv 2510.07143) found competitive with many published methods.

- The select layer's 24 x 24 patch features (before the projector) are average-pooled to s x s, where
  s x s is the square nearest `budget` (64 -> 8 x 8, 128 -> 11 x 11 = 121, 192 -> 14 x 14 = 196; two
  squares are never equally near). So the count reached can differ from the budget; the statistics
  report what was reached. Without a budget, `side` sets s (default 12: 144 tokens).
- Pooling is torch's `adaptive_avg_pool2d`: when s does not divide 24 its windows overlap by one patch
  (window i covers floor(i * 24 / s) .. ceil((i + 1) * 24 / s) - 1 along each axis). Tokens keep 2D
  row-major order; CLS stays when LLaVA's select strategy keeps it.
- LLaVA-NeXT: each tower image (base image, then each crop) is pooled on its own to the square nearest
  its share of the budget (llava/drop/image_reduction.py).

Qwen2-VL / Qwen2.5-VL (`Pool.reduce_qwen`): the image's decoder tokens, the model's own tower and merger
output (each token one 2 x 2 block of patches), lie on a rows x columns grid of the image's own shape, and are
average-pooled on that grid (the merger's outputs, not the tower's states before it: the merger is what makes
Qwen's tokens).
- The pooled grid keeps the image's aspect: for each length L = 1 .. longer of the pooled grid's longer side,
  its shorter side is L * shorter / longer rounded half up (at least 1), and the grid whose size is nearest
  the budget (round(F * V) under `keep_fraction` F, V the image's tokens; `side` * `side` without either) is
  taken, the smaller on a tie (`nearest_grid`). So the count reached is that grid's, not the budget (a 6 x 18
  grid offers 24 and 30 tokens but nothing between), and a square grid gives the nearest square as on LLaVA.
  An image with no more tokens than the budget keeps its own grid, unpooled.
- Windows are adaptive pooling's along each axis (`pool_windows`: they overlap by one token where the pooled
  side does not divide the grid's), taken separately for rows and columns, so a non-square grid pools as a
  square one does.
- Position rule: a pooled token sits at its window's middle token, (t, floor((first + last row) / 2),
  floor((first + last column) / 2)). It is a token of the image (integral, inside the image's span), pooled
  tokens never share a position (window starts and ends both rise along an axis), and they keep row-major
  order; the text after the image keeps its positions (the image's span is unchanged).
- Its `patch_groups` lists the cells (row * columns + column) of the token grid each pooled token averages.
- One frame per image (t = 1, as Qwen's image processor gives every image); several frames are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction, round_half_up
from llava.drop.image_reduction import ImageReduction, QwenTokens, ReducedImage, run_to_select_layer
from llava.drop.method import BASELINE
from llava.drop.methods.registry import register
from llava.drop.timing import Stopwatch
from llava.drop.vision import PATCHES_START, VisionOutput
from llava.model.geometry import QWEN_FAMILY
from llava.model.qwen import merged_grid

DEFAULT_SIDE = 12


@dataclass(frozen=True)
class PoolOptions:
    """The pooled grid's side, or a budget whose nearest square sets it (the budget wins), or a
    `keep_fraction` (that share of each prompt's vision tokens as its budget)."""

    side: int = DEFAULT_SIDE
    budget: float | None = None
    keep_fraction: float | None = None

    def __post_init__(self):
        if self.side < 1:
            raise ValueError(f"side must be >= 1, got {self.side}")
        check_budget(self.budget, whole=True)
        check_keep_fraction(self.keep_fraction, self.budget)


def nearest_side(tokens: int) -> int:
    """The side s whose square s x s is nearest `tokens` (>= 1)."""
    side = math.isqrt(tokens)
    return side if tokens - side * side <= (side + 1) ** 2 - tokens else side + 1


def pool_windows(grid: int, side: int) -> list[range]:
    """The patches along one axis that each of the `side` pooled cells averages (adaptive pooling's rule)."""
    return [range(i * grid // side, -(-(i + 1) * grid // side)) for i in range(side)]


def pooled_groups(grid: int, side: int) -> list[list[int]]:
    """Row-major patches (of a grid x grid image) under each pooled cell, cells in row-major order."""
    windows = pool_windows(grid, side)
    return [[row * grid + column for row in rows for column in columns] for rows in windows for columns in windows]


def pool_patches(patches: torch.Tensor, side: int) -> torch.Tensor:
    """Patch features [grid * grid, dim] averaged to [side * side, dim], row-major; unchanged at side = grid."""
    grid = math.isqrt(patches.shape[0])
    if side == grid:
        return patches
    square = patches.T.reshape(1, -1, grid, grid)
    return F.adaptive_avg_pool2d(square, side)[0].flatten(1).T


def nearest_grid(rows: int, columns: int, tokens: int) -> tuple[int, int]:
    """The pooled (rows, columns) of a rows x columns grid nearest `tokens` (>= 1) among the grids of its aspect:
    for each length of the longer side, the shorter side in proportion, rounded half up (at least 1); the
    smaller grid on a tie. Sizes rise with the length, so the search is one pass."""
    longer, shorter = max(rows, columns), min(rows, columns)
    best = (1, 1)
    for length in range(1, longer + 1):
        side = max(1, round_half_up(length * shorter / longer))
        if abs(length * side - tokens) < abs(best[0] * best[1] - tokens):
            best = (length, side)
    return best if rows >= columns else best[::-1]


def window_middles(grid: int, side: int) -> list[int]:
    """The middle token (rounded down) of each of the `side` pooling windows along an axis of `grid` tokens."""
    return [(window.start + window.stop - 1) // 2 for window in pool_windows(grid, side)]


def pool_grid(tokens: torch.Tensor, rows: int, columns: int, pooled: tuple[int, int]) -> torch.Tensor:
    """Row-major tokens [rows * columns, dim] averaged to the pooled grid, row-major (adaptive pooling, in
    float32, returned in the tokens' dtype); unchanged when the grid is the image's own."""
    if pooled == (rows, columns):
        return tokens
    grid = tokens.T.reshape(1, -1, rows, columns)
    return F.adaptive_avg_pool2d(grid.float(), pooled)[0].flatten(1).T.to(tokens.dtype)


def pooled_cells(rows: int, columns: int, pooled: tuple[int, int]) -> list[list[int]]:
    """The cells (row * columns + column) of a rows x columns grid under each pooled token, row-major."""
    row_windows, column_windows = pool_windows(rows, pooled[0]), pool_windows(columns, pooled[1])
    return [[row * columns + column for row in row_window for column in column_window]
            for row_window in row_windows for column_window in column_windows]


@register
class Pool(ImageReduction):
    """Average pooling of every image's patch grid; the decoder runs unchanged."""

    name = "pool"
    family = BASELINE
    options_class = PoolOptions

    def check_model(self, geometry) -> None:
        """Also refuse a pooled grid larger than the image's (on Qwen: `side` * `side` above the tokens an image
        brings at most)."""
        super().check_model(geometry)
        if self.budget is not None or self.keep_fraction is not None:
            return
        if geometry.family == QWEN_FAMILY:
            if self.options.side ** 2 > geometry.max_vision_tokens:
                raise ValueError(f"side {self.options.side} asks for {self.options.side ** 2} tokens, more than the "
                                 f"{geometry.max_vision_tokens} vision tokens this model gives an image at most")
            return
        grid = math.isqrt(geometry.patch_tokens)
        if self.options.side > grid:
            raise ValueError(f"side {self.options.side} is larger than the {grid} x {grid} patch grid")

    def side_for(self, count: int | None, grid: int) -> int:
        side = self.options.side if count is None else nearest_side(count)
        if side > grid:
            raise ValueError(f"a pooled grid of side {side} is larger than the image's {grid} x {grid} patches")
        return side

    def reduce(self, model, images: torch.Tensor, counts: list[int | None], selecting: Stopwatch) -> list[ReducedImage]:
        _, _, hidden = run_to_select_layer(model, images)
        grid = math.isqrt(hidden.shape[1] - PATCHES_START)
        reduced = []
        with selecting:
            for states, count in zip(hidden, counts):
                side = self.side_for(count, grid)
                pooled = pool_patches(states[PATCHES_START:], side)
                reduced.append(ReducedImage(torch.cat([states[:PATCHES_START], pooled]), pooled_groups(grid, side)))
        return reduced

    def reduce_qwen(self, model, vision: VisionOutput, pixel_values: torch.Tensor, grid: torch.Tensor,
                    count: int | None) -> QwenTokens:
        """The image's token grid average-pooled to the aspect-keeping grid nearest `count` (`side` * `side`
        without one), each pooled token at its window's middle token (module docstring)."""
        frames, rows, columns = merged_grid(model, grid)
        if frames != 1:
            raise ValueError(f"pool on Qwen pools one frame's token grid; this input has {frames} frames")
        pooled = nearest_grid(rows, columns, self.options.side ** 2 if count is None else count)
        features = pool_grid(vision.features, rows, columns, pooled)
        middles = torch.tensor([row * columns + column for row in window_middles(rows, pooled[0])
                                for column in window_middles(columns, pooled[1])], device=vision.positions.device)
        return QwenTokens(features, vision.positions[:, middles], pooled_cells(rows, columns, pooled))
