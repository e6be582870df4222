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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llava.drop.blocks import check_budget, check_keep_fraction
from llava.drop.image_reduction import ImageReduction, ReducedImage, run_to_select_layer
from llava.drop.method import BASELINE
from llava.drop.methods.registry import register
from llava.drop.timing import Stopwatch
from llava.drop.vision import PATCHES_START

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


@register
class Pool(ImageReduction):
    """Average pooling of every image's patch grid; the decoder runs unchanged."""

    name = "pool"
    family = BASELINE
    options_class = PoolOptions

    def check_model(self, geometry) -> None:
        """Also refuse a pooled grid larger than the image's."""
        super().check_model(geometry)
        grid = math.isqrt(geometry.patch_tokens)
        if self.budget is None and self.keep_fraction is None and self.options.side > grid:
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
