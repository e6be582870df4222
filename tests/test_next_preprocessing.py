"""LLaVA-NeXT "anyres" preprocessing: the resolution choice, the padded canvas, the crops and the tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from llava.mm_utils import process_images
from llava.model.anyres import (
    anyres_grid,
    anyres_images,
    fitted_size,
    process_anyres_image,
    select_best_resolution,
)
from llava.model.image_processor import default_clip_image_processor

CROP = 336
# liuhaotian/llava-v1.6-* image_grid_pinpoints, [width, height]
V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
GRID_2X2_PINPOINTS = [[336, 672], [672, 336], [672, 672]]

WIDE, TALL, SQUARE, TINY = (1000, 300), (300, 1000), (800, 800), (20, 10)
BLACK = (0, 0, 0)
RED, GREEN, BLUE, YELLOW = (200, 30, 60), (20, 180, 40), (10, 20, 230), (240, 220, 10)


def solid(size, color) -> Image.Image:
    return Image.new("RGB", size, color)


def quadrants(size, colors) -> Image.Image:
    """An image whose top-left, top-right, bottom-left and bottom-right quarters have the given colours."""
    width, height = size
    image = Image.new("RGB", size)
    boxes = [(0, 0, width // 2, height // 2), (width // 2, 0, width, height // 2)]
    boxes += [(0, height // 2, width // 2, height), (width // 2, height // 2, width, height)]
    for box, color in zip(boxes, colors):
        image.paste(color, box)
    return image


def random_image(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def normalized(color, processor) -> torch.Tensor:
    """What CLIP makes of one 0..255 colour: rescale to 0..1, then (x - mean) / std, in float32."""
    mean = np.asarray(processor.image_mean, dtype=np.float32)
    std = np.asarray(processor.image_std, dtype=np.float32)
    return torch.from_numpy((np.asarray(color, dtype=np.float32) / 255 - mean) / std)


# --- best resolution ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        # 1000x300: 1008x336 scales by 1.008 to 1008x302 >= 300000 px, so it keeps all 300000;
        # every other candidate scales by 0.672 or 0.336 and keeps at most 672x201 = 135072.
        (WIDE, (1008, 336)),
        # 300x1000: the mirror image of the wide case.
        (TALL, (336, 1008)),
        # 800x800: 672x672 keeps 672*672 = 451584; the others keep 336*336 = 112896.
        (SQUARE, (672, 672)),
        # 20x10: every candidate keeps all 200 px; 336x672 and 672x336 both waste 225792 - 200,
        # the least of all, and 336x672 comes first.
        (TINY, (336, 672)),
    ],
)
def test_best_resolution_v16_pinpoints(image_size, expected):
    assert select_best_resolution(image_size, V16_PINPOINTS) == expected


@pytest.mark.parametrize(
    ("image_size", "expected"),
    [
        # 1000x300: 672x336 and 672x672 both keep 672x201 = 135072; 672x336 wastes less.
        (WIDE, (672, 336)),
        (TALL, (336, 672)),
        # 800x800: 672x672 keeps 451584, the oblong ones 112896.
        (SQUARE, (672, 672)),
        # 20x10: all keep 200 px; 336x672 and 672x336 waste the same, 336x672 is first.
        (TINY, (336, 672)),
    ],
)
def test_best_resolution_2x2_grid(image_size, expected):
    assert select_best_resolution(image_size, GRID_2X2_PINPOINTS) == expected


def test_equal_effective_resolution_goes_to_less_waste_even_when_listed_later():
    # 1000x300 keeps 672x201 = 135072 px in both; 672x672 wastes 316512, 672x336 only 90720.
    assert select_best_resolution(WIDE, [[672, 672], [672, 336]]) == (672, 336)


def test_full_tie_goes_to_the_first_candidate():
    # 800x800 fits both at scale 0.42 as 336x336, so effective and waste are equal.
    assert select_best_resolution(SQUARE, [[336, 672], [672, 336]]) == (336, 672)
    assert select_best_resolution(SQUARE, [[672, 336], [336, 672]]) == (672, 336)


def test_effective_resolution_is_capped_at_the_original_pixels():
    # Without the cap 672x672 (scale 33.6, 672x336 px) would beat 336x672 (scale 16.8, 336x168 px).
    assert select_best_resolution(TINY, [[672, 672], [336, 672]]) == (336, 672)


@pytest.mark.parametrize(
    "bad",
    ["(1x1),...,(3x3)", [[336]], [[336, "672"]], [], [(336.0, 672.0)], None, [[0, 336]]],
)
def test_pinpoints_other_than_width_height_pairs_are_refused(bad):
    with pytest.raises(ValueError, match="image_grid_pinpoints") as error:
        select_best_resolution(WIDE, bad)
    assert repr(bad) in str(error.value)


# --- crop grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pinpoints", "image_size", "grid"),
    [
        (V16_PINPOINTS, WIDE, (3, 1)),
        (V16_PINPOINTS, TALL, (1, 3)),
        (V16_PINPOINTS, SQUARE, (2, 2)),
        (V16_PINPOINTS, TINY, (1, 2)),
        (GRID_2X2_PINPOINTS, WIDE, (2, 1)),
        (GRID_2X2_PINPOINTS, TALL, (1, 2)),
        (GRID_2X2_PINPOINTS, SQUARE, (2, 2)),
        (GRID_2X2_PINPOINTS, TINY, (1, 2)),
    ],
)
def test_crop_grid_and_view_count(pinpoints, image_size, grid):
    assert anyres_grid(image_size, pinpoints, CROP) == grid
    views = anyres_images(solid(image_size, RED), pinpoints, CROP, CROP)
    assert len(views) == 1 + grid[0] * grid[1]
    assert all(view.size == (CROP, CROP) for view in views)


def test_pinpoints_that_are_not_multiples_of_the_crop_are_refused():
    with pytest.raises(ValueError, match=r"\[300, 600\] is not a multiple of the crop size 336"):
        anyres_grid(WIDE, [[300, 600]], CROP)


# --- fitting and padding --------------------------------------------------------------------------


def test_fitted_size_rounds_up_and_stays_inside_the_target():
    # 1000x300 into 1008x336: width limits (1.008 < 1.12), height ceil(302.4) = 303.
    assert fitted_size(WIDE, (1008, 336)) == (1008, 303)
    # 300x1000 into 336x1008: height limits, width ceil(302.4) = 303.
    assert fitted_size(TALL, (336, 1008)) == (303, 1008)
    # 20x10 into 336x672: width limits (16.8 < 67.2), height 168.
    assert fitted_size(TINY, (336, 672)) == (336, 168)


def test_wide_image_is_centred_between_black_bands():
    # 1000x300 -> 1008x303 on a 1008x336 canvas, pasted at y = (336 - 303) // 2 = 16:
    # rows 0..15 and 319..335 are black, rows 16..318 the image, in each of the three crops.
    crops = anyres_images(solid(WIDE, RED), V16_PINPOINTS, CROP, CROP)[1:]
    assert len(crops) == 3
    for crop in crops:
        pixels = np.asarray(crop)
        assert (pixels[:16] == BLACK).all()
        assert (pixels[16:319] == RED).all()
        assert (pixels[319:] == BLACK).all()


def test_tall_image_is_centred_between_black_bands():
    # 300x1000 -> 303x1008 on a 336x1008 canvas, pasted at x = 16.
    crops = anyres_images(solid(TALL, GREEN), V16_PINPOINTS, CROP, CROP)[1:]
    assert len(crops) == 3
    for crop in crops:
        pixels = np.asarray(crop)
        assert (pixels[:, :16] == BLACK).all()
        assert (pixels[:, 16:319] == GREEN).all()
        assert (pixels[:, 319:] == BLACK).all()


def test_tiny_image_is_upscaled_into_the_middle_of_the_canvas():
    # 20x10 -> 336x168 on 336x672, pasted at y = (672 - 168) // 2 = 252: crop 0 holds rows 0..335 of
    # the canvas (image from row 252), crop 1 rows 336..671 (image down to canvas row 419 = crop row 83).
    top, bottom = (np.asarray(crop) for crop in anyres_images(solid(TINY, BLUE), V16_PINPOINTS, CROP, CROP)[1:])
    assert (top[:252] == BLACK).all() and (top[252:] == BLUE).all()
    assert (bottom[:84] == BLUE).all() and (bottom[84:] == BLACK).all()


def test_crops_are_row_major_starting_top_left():
    # 672x672 is itself the best resolution, so the canvas is the image and the crops its quarters.
    colors = [RED, GREEN, BLUE, YELLOW]
    crops = anyres_images(quadrants((672, 672), colors), V16_PINPOINTS, CROP, CROP)[1:]
    for crop, color in zip(crops, colors, strict=True):
        assert (np.asarray(crop) == color).all()


def test_crops_follow_the_quadrants_after_a_resize():
    # 800x800 -> 672x672: each quarter of the image lands in its own crop; the crop centres are far
    # from the seams, so bicubic leaves them the pure colour.
    colors = [RED, GREEN, BLUE, YELLOW]
    crops = anyres_images(quadrants(SQUARE, colors), V16_PINPOINTS, CROP, CROP)[1:]
    assert [crop.getpixel((168, 168)) for crop in crops] == colors


def test_base_view_squashes_the_whole_image():
    # Left quarter blue, the rest yellow: a squash keeps the split at column 336 / 4 = 84; a shortest-edge
    # resize with a centre crop would keep only yellow.
    image = solid(WIDE, YELLOW)
    image.paste(BLUE, (0, 0, 250, 300))
    base = anyres_images(image, V16_PINPOINTS, CROP, CROP)[0]
    assert base.size == (CROP, CROP)
    pixels = np.asarray(base)
    assert (pixels[:, :80] == BLUE).all()
    assert (pixels[:, 88:] == YELLOW).all()


def test_resizes_use_pillows_default_filter_as_llava_does():
    """LLaVA calls `image.resize(size)` with no filter; the views must equal what that gives."""
    image = random_image((500, 300))
    base, *crops = anyres_images(image, GRID_2X2_PINPOINTS, CROP, CROP)
    assert base.tobytes() == image.resize((CROP, CROP)).tobytes()
    # 500x300 -> 672x336 (keeps 500x300 at scale 1.12); fitted 560x336, pasted at x = 56.
    canvas = Image.new("RGB", (672, 336))
    canvas.paste(image.resize((560, 336)), (56, 0))
    assert [crop.tobytes() for crop in crops] == [
        canvas.crop((0, 0, 336, 336)).tobytes(),
        canvas.crop((336, 0, 672, 336)).tobytes(),
    ]


def test_non_rgb_input_is_converted_first():
    gray = Image.new("L", (672, 672), 77)
    views = anyres_images(gray, V16_PINPOINTS, CROP, CROP)
    assert all(view.mode == "RGB" for view in views)
    assert views[1].getpixel((0, 0)) == (77, 77, 77)


# --- tensors --------------------------------------------------------------------------------------


def test_tensor_shape_and_normalised_padding():
    processor = default_clip_image_processor()
    pixels = process_anyres_image(solid(WIDE, RED), processor, V16_PINPOINTS)
    assert pixels.shape == (4, 3, CROP, CROP)
    black, red = normalized(BLACK, processor), normalized(RED, processor)
    for crop in pixels[1:]:
        assert torch.equal(crop[:, 0, 0], black)  # top padding band
        assert torch.equal(crop[:, 335, 335], black)  # bottom padding band
        assert torch.equal(crop[:, 100, 100], red)
    assert torch.equal(pixels[0, :, 0, 0], red)  # the base view has no padding


def test_process_images_anyres_one_image():
    processor = default_clip_image_processor()
    image = random_image(SQUARE)
    pixels = process_images([image], processor, "anyres", grid_pinpoints=V16_PINPOINTS)
    assert pixels.shape == (1, 5, 3, CROP, CROP)
    assert torch.equal(pixels[0], process_anyres_image(image, processor, V16_PINPOINTS))


def test_process_images_anyres_stacks_images_of_one_grid():
    processor = default_clip_image_processor()
    pixels = process_images([solid(WIDE, RED), solid((900, 290), BLUE)], processor, "anyres", V16_PINPOINTS)
    assert pixels.shape == (2, 4, 3, CROP, CROP)
    assert torch.equal(pixels[1, 1, :, 100, 100], normalized(BLUE, processor))


def test_process_images_anyres_needs_pinpoints():
    with pytest.raises(ValueError, match="'anyres'.*needs grid_pinpoints"):
        process_images([solid(WIDE, RED)], default_clip_image_processor(), "anyres")


def test_process_images_anyres_refuses_mixed_grids():
    images = [solid(WIDE, RED), solid(SQUARE, RED)]  # 3 crops and 4 crops
    with pytest.raises(ValueError, match=r"different crop grids \(\[4, 5\] views each\).*separate calls"):
        process_images(images, default_clip_image_processor(), "anyres", V16_PINPOINTS)


def test_process_images_other_ratios_unchanged_in_shape():
    processor = default_clip_image_processor()
    assert process_images([solid(WIDE, RED)], processor, "pad").shape == (1, 3, CROP, CROP)
    with pytest.raises(ValueError, match="unsupported image_aspect_ratio 'tiles'"):
        process_images([solid(WIDE, RED)], processor, "tiles")


# --- against transformers -------------------------------------------------------------------------


def transformers_next_processor(pinpoints) -> LlavaNextImageProcessorPil:
    """transformers' PIL LLaVA-NeXT processor set up like LLaVA v1.6 (its pinpoints are [height, width])."""
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": CROP},
        crop_size={"height": CROP, "width": CROP},
        image_grid_pinpoints=[[height, width] for width, height in pinpoints],
    )


def test_selection_rule_matches_transformers_over_many_sizes():
    """transformers has the same rule on (height, width); swapped, it must choose as we do, ties included."""
    hf_pinpoints = [[height, width] for width, height in V16_PINPOINTS]
    sizes = [(width, height) for width in range(10, 2100, 97) for height in range(10, 2100, 89)]
    sizes += [WIDE, TALL, SQUARE, TINY]
    for width, height in sizes:
        hf_height, hf_width = hf_select_best_resolution((height, width), hf_pinpoints)
        assert select_best_resolution((width, height), V16_PINPOINTS) == (hf_width, hf_height), (width, height)


@pytest.mark.parametrize("image_size", [WIDE, TALL, SQUARE, TINY, (640, 480)])
def test_pixels_match_transformers_llava_next_processor(image_size):
    """On transformers 5.24 the PIL LLaVA-NeXT processor gives the same views, bit for bit.

    Both squash the whole image for the base view (transformers resizes to shortest_edge x shortest_edge;
    its later shortest-edge resize and centre crop are then no-ops), both pad the fitted image with black
    and both resize with bicubic. Where they differ: transformers takes pinpoints as [height, width];
    it pads a batch of images with different crop counts with all-zero views, where we refuse the batch;
    and it cuts pinpoints that are not multiples of the crop into ragged crops, where we refuse them.
    """
    image = random_image(image_size, seed=image_size[0])
    ours = process_anyres_image(image, default_clip_image_processor(), V16_PINPOINTS)
    theirs = transformers_next_processor(V16_PINPOINTS)(image, return_tensors="pt")
    columns, rows = anyres_grid(image_size, V16_PINPOINTS, CROP)
    assert theirs["pixel_values"].shape == (1, 1 + columns * rows, 3, CROP, CROP)
    assert torch.equal(ours, theirs["pixel_values"][0])
