"""The simple baselines: random subsets and average pooling, on hand-made grids, then on the tiny models."""

from __future__ import annotations

import argparse

import pytest
import torch

from llava.drop.image_reduction import ImageReduction, budget_shares
from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.pool import Pool, PoolOptions, nearest_side, pool_patches, pool_windows, pooled_groups
from llava.drop.methods.random import RandomDrop, RandomOptions, image_seed, random_subset
from llava.drop.vision import encode_image
from llava.eval.answering.loop import add_model_args, method_from_args
from llava.mm_utils import load_image, process_images
from llava.model.geometry import ModelGeometry, read_geometry
from tests.conftest import NEXT_DEMO_IMAGES, answer, next_demo_inputs

PATCHES, GRID = 576, 24
SELECT = -2  # LLaVA's vision_feature_layer
LLAVA_15 = ModelGeometry(decoder_layers=32, vision_tokens=PATCHES, patch_tokens=PATCHES, context_length=2048)


def pixels(loaded, image_path) -> torch.Tensor:
    return process_images([load_image(image_path)], loaded[2])


def select_layer_patches(model, pixel_values) -> torch.Tensor:
    """The patch features LLaVA projects, straight from the tower (no CLS): [576, dim]."""
    with torch.no_grad():
        return model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[SELECT][0, 1:]


# --- pooling, by hand -----------------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, side", [(1, 1), (2, 1), (3, 2), (64, 8), (128, 11), (144, 12), (192, 14),
                                          (576, 24)])
def test_the_nearest_square_sets_the_grid(tokens, side):
    assert nearest_side(tokens) == side


def test_pool_windows_follow_adaptive_pooling():
    assert pool_windows(4, 2) == [range(0, 2), range(2, 4)]
    assert pool_windows(3, 2) == [range(0, 2), range(1, 3)]  # 3 does not divide by 2: the windows overlap
    assert pool_windows(24, 11)[:2] == [range(0, 3), range(2, 5)]
    assert pooled_groups(4, 2) == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_pooling_averages_each_window_in_row_major_order():
    patches = torch.arange(16.0).view(16, 1) * torch.tensor([[1.0, -2.0]])  # a 4 x 4 grid, two channels
    expected = torch.tensor([[2.5, -5.0], [4.5, -9.0], [10.5, -21.0], [12.5, -25.0]])  # means of the groups above
    torch.testing.assert_close(pool_patches(patches, 2), expected)
    overlapping = pool_patches(torch.arange(9.0).view(9, 1), 2)  # 3 x 3 -> 2 x 2 over rows/columns 0-1 and 1-2
    torch.testing.assert_close(overlapping.flatten(), torch.tensor([2.0, 3.0, 5.0, 6.0]))
    assert pool_patches(patches, 4) is patches  # the full grid is left alone


def test_pool_options_and_refusals():
    assert create_method("pool", {"budget": "64"}).options == PoolOptions(budget=64)
    with pytest.raises(ValueError, match="side must be >= 1, got 0"):
        PoolOptions(side=0)
    with pytest.raises(ValueError, match="budget must be a whole number of tokens >= 1, got 64.5"):
        PoolOptions(budget=64.5)
    with pytest.raises(ValueError, match="side 30 is larger than the 24 x 24 patch grid"):
        Pool(PoolOptions(side=30)).check_model(LLAVA_15)
    with pytest.raises(ValueError, match="budget 600 exceeds the 576 vision tokens"):
        Pool(PoolOptions(budget=600)).check_model(LLAVA_15)


# --- random subsets, by hand ----------------------------------------------------------------------------

def test_random_subsets_are_distinct_ascending_and_repeat_with_their_seed():
    subset = random_subset(PATCHES, 64, seed=7)
    assert subset.numel() == subset.unique().numel() == 64
    assert torch.equal(subset, subset.sort().values) and 0 <= subset.min() and subset.max() < PATCHES
    assert torch.equal(subset, random_subset(PATCHES, 64, seed=7))
    assert not torch.equal(subset, random_subset(PATCHES, 64, seed=8))
    assert random_subset(PATCHES, PATCHES, seed=7).tolist() == list(range(PATCHES))


def test_the_draw_depends_on_the_seed_and_the_image_only():
    image = torch.rand(3, 8, 8)
    assert image_seed(image, 0) == image_seed(image.clone(), 0)
    assert image_seed(image, 0) != image_seed(image, 1)
    assert image_seed(image, 0) != image_seed(torch.flip(image, dims=[2]), 0)
    assert 0 <= image_seed(image, 0) < 2 ** 63


def test_random_needs_a_whole_budget():
    with pytest.raises(ValueError, match="random dropping needs a budget"):
        RandomOptions(budget=None)
    with pytest.raises(ValueError, match="got 0"):
        RandomOptions(budget=0)


def test_the_cli_seed_seeds_the_draw():
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    common = ["--model-path", "m", "--method", "random"]
    assert method_from_args(parser.parse_args([*common, "--seed", "5", "--budget", "32"])).options == \
        RandomOptions(budget=32, seed=5)
    explicit = parser.parse_args([*common, "--seed", "5", "--method-args", "seed=9"])
    assert method_from_args(explicit).options.seed == 9  # the method's own option wins
    assert method_from_args(parser.parse_args([*common])).options == RandomOptions()


# --- on the tiny models ---------------------------------------------------------------------------------

def test_pooling_reaches_the_nearest_square_of_hand_pooled_features(loaded_original, demo_images):
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[0])
    output = Pool(PoolOptions(budget=128)).encode_image(model, pixel_values)
    assert output.stats == {"vision_tokens_in": PATCHES, "vision_tokens": 121}
    patches = select_layer_patches(model, pixel_values)
    by_hand = torch.stack([patches[group].mean(dim=0) for group in pooled_groups(GRID, 11)])
    with torch.no_grad():
        torch.testing.assert_close(output.features, model.model.multi_modal_projector(by_hand))
    assert output.patch_groups == pooled_groups(GRID, 11)


def test_random_keeps_exactly_the_budget_of_unpruned_features(loaded_original, demo_images):
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[1])
    output = RandomDrop(RandomOptions(budget=64, seed=3)).encode_image(model, pixel_values)
    assert output.stats == {"vision_tokens_in": PATCHES, "vision_tokens": 64}
    kept = [group[0] for group in output.patch_groups]
    assert kept == random_subset(PATCHES, 64, image_seed(pixel_values[0], 3)).tolist()
    torch.testing.assert_close(output.features, encode_image(model, pixel_values).features[kept])
    again = RandomDrop(RandomOptions(budget=64, seed=3)).encode_image(model, pixel_values)
    assert torch.equal(again.features, output.features)


@pytest.mark.parametrize("method", [Pool(PoolOptions(budget=PATCHES)), Pool(PoolOptions(side=GRID)),
                                    RandomDrop(RandomOptions(budget=PATCHES))], ids=["pool-576", "pool-24", "random"])
def test_keeping_everything_is_the_unpruned_model(loaded_original, demo_images, method):
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[2])
    assert torch.equal(method.encode_image(model, pixel_values).features, encode_image(model, pixel_values).features)
    assert answer(loaded_original, demo_images[2], method).token_ids == \
        answer(loaded_original, demo_images[2], DropMethod()).token_ids


@pytest.mark.parametrize("name, budget, total", [("random", 160, 160), ("pool", 160, 3 * 49)])
def test_next_shares_the_budget_over_the_base_image_and_crops(loaded_next_original, name, budget, total):
    model = loaded_next_original[1]
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["wide"])  # base image + 2 crops
    output = create_method(name, {"budget": str(budget)}).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    assert budget_shares(budget, 3) == [54, 53, 53]  # pool: 7 x 7 is the nearest square to each share
    assert output.features.shape[0] == output.stats["vision_tokens"] == total
    assert output.stats["images"] == 3 and output.stats["crops"] == 2


def test_next_budget_below_one_token_per_tower_image_is_refused(tiny_next_original):
    geometry = read_geometry(str(tiny_next_original))
    images = 1 + geometry.max_crops
    with pytest.raises(ValueError, match=f"budget {images - 1} is below one token for each of the {images}"):
        create_method("pool", {"budget": str(images - 1)}).check_model(geometry)
    create_method("random", {"budget": str(images)}).check_model(geometry)


def test_both_share_the_per_image_base():
    assert issubclass(Pool, ImageReduction) and issubclass(RandomDrop, ImageReduction)
    assert Pool.family == RandomDrop.family == "baseline"
