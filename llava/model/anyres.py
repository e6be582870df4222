"""LLaVA-NeXT (v1.6) "anyres" preprocessing for original-layout checkpoints (liuhaotian/llava-v1.6-*).

A v1.6 model sees one image as several CLIP-sized views: the whole image squashed to the tower's input
size (the "base" view), then the crops of a higher-resolution copy. That copy is the image fitted,
aspect ratio kept, into the best of the checkpoint's `image_grid_pinpoints` and centred on black.
The rules follow LLaVA's own code, so the pixels match what the checkpoints were trained on.

Sizes are (width, height) throughout, as in PIL and in LLaVA's `image_grid_pinpoints`; transformers'
LLaVA-NeXT code writes them the other way round, (height, width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor

# LLaVA calls `image.resize(size)` without a filter; for RGB images Pillow's default is bicubic.
LLAVA_RESAMPLE = Image.Resampling.BICUBIC
ANYRES_ASPECT_RATIO = "anyres"  # the image_aspect_ratio of LLaVA-NeXT checkpoints
PADDING_COLOR = (0, 0, 0)  # LLaVA pads the fitted image with black, not with the CLIP mean colour

Size = tuple[int, int]  # (width, height)


def validate_pinpoints(pinpoints) -> list[Size]:
    """Accept only a list of [width, height] pairs of positive ints, so a bad config fails here.

    LLaVA's later string form such as "(1x1),...,(3x3)" is refused rather than guessed at.
    """
    if isinstance(pinpoints, (str, bytes)) or not isinstance(pinpoints, Sequence) or not pinpoints:
        raise ValueError(
            f"image_grid_pinpoints must be a non-empty list of [width, height] pairs, got {pinpoints!r}"
        )
    sizes = []
    for pair in pinpoints:
        if (
            isinstance(pair, (str, bytes))
            or not isinstance(pair, Sequence)
            or len(pair) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pair)
        ):
            raise ValueError(
                f"image_grid_pinpoints must be a list of [width, height] pairs of positive ints, "
                f"got {pinpoints!r} (bad entry {pair!r})"
            )
        sizes.append((pair[0], pair[1]))
    return sizes


def select_best_resolution(image_size: Size, pinpoints) -> Size:
    """The pinpoint that keeps the most of the image's pixels, and among those wastes the least area.

    Each candidate gets the image scaled to fit inside it; its effective resolution is the fitted
    pixel count, capped at the original pixel count (upscaling adds no detail). Ties on effective
    resolution go to the smaller unused area, then to the earlier candidate.
    """
    width, height = image_size
    best, best_effective, best_wasted = None, -1, math.inf
    for candidate_width, candidate_height in validate_pinpoints(pinpoints):
        scale = min(candidate_width / width, candidate_height / height)
        fitted_pixels = int(width * scale) * int(height * scale)
        effective = min(fitted_pixels, width * height)
        wasted = candidate_width * candidate_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (candidate_width, candidate_height), effective, wasted
    return best


def fitted_size(image_size: Size, target: Size) -> Size:
    """The size of the image scaled to fit inside `target`, aspect ratio kept, rounding up like LLaVA."""
    width, height = image_size
    target_width, target_height = target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return target_width, min(math.ceil(height * scale_width), target_height)
    return min(math.ceil(width * scale_height), target_width), target_height


def resize_and_pad(image: Image.Image, target: Size) -> Image.Image:
    """Fit the image into `target` keeping its aspect ratio, centred on a black canvas of that size."""
    resized = image.resize(fitted_size(image.size, target), LLAVA_RESAMPLE)
    canvas = Image.new("RGB", target, PADDING_COLOR)
    canvas.paste(resized, ((target[0] - resized.width) // 2, (target[1] - resized.height) // 2))
    return canvas


def check_divisible(resolution: Size, crop_size: int) -> None:
    """LLaVA's model lays out floor(side / crop) crops per side; a remainder would make unplaced crops."""
    if resolution[0] % crop_size or resolution[1] % crop_size:
        raise ValueError(f"grid pinpoint {list(resolution)} is not a multiple of the crop size {crop_size}")


def anyres_grid(image_size: Size, pinpoints, crop_size: int) -> tuple[int, int]:
    """(columns, rows) of crops the image is cut into; the model needs it to lay the crops out again."""
    width, height = select_best_resolution(image_size, pinpoints)
    check_divisible((width, height), crop_size)
    return width // crop_size, height // crop_size


def cut_into_crops(image: Image.Image, crop_size: int) -> list[Image.Image]:
    """Cut an image whose sides are multiples of `crop_size` into squares, row by row, left to right."""
    check_divisible(image.size, crop_size)
    return [
        image.crop((left, top, left + crop_size, top + crop_size))
        for top in range(0, image.height, crop_size)
        for left in range(0, image.width, crop_size)
    ]


def anyres_images(image: Image.Image, pinpoints, crop_size: int, base_size: int) -> list[Image.Image]:
    """The base view (whole image squashed to base_size x base_size) followed by the crops."""
    image = image.convert("RGB")
    padded = resize_and_pad(image, select_best_resolution(image.size, pinpoints))
    base = image.resize((base_size, base_size), LLAVA_RESAMPLE)
    return [base, *cut_into_crops(padded, crop_size)]


def process_anyres_image(image: Image.Image, image_processor: BaseImageProcessor, pinpoints) -> torch.Tensor:
    """Pixel values [1 + K, 3, H, W] of one image: its base view, then its K crops, all through CLIP."""
    views = anyres_images(
        image,
        pinpoints,
        crop_size=image_processor.crop_size["height"],
        base_size=image_processor.size["shortest_edge"],
    )
    return image_processor(views, return_tensors="pt")["pixel_values"]


def process_anyres_batch(
    images: Sequence[Image.Image], image_processor: BaseImageProcessor, pinpoints
) -> torch.Tensor:
    """Pixel values [N, 1 + K, 3, H, W]; images must share K, as one tensor cannot hold ragged views."""
    if pinpoints is None:
        raise ValueError(
            f"image_aspect_ratio {ANYRES_ASPECT_RATIO!r} (LLaVA-NeXT's tiling) needs grid_pinpoints, "
            "the checkpoint's image_grid_pinpoints: a list of [width, height] pairs"
        )
    per_image = [process_anyres_image(image, image_processor, pinpoints) for image in images]
    view_counts = sorted({len(views) for views in per_image})
    if len(view_counts) > 1:
        raise ValueError(
            f"images with different crop grids ({view_counts} views each) cannot share one tensor; "
            "process them in separate calls (one image per call always works)"
        )
    return torch.stack(per_image)
