"""FastV, PyramidDrop, SparseVLM and VisionZip on LLaVA-NeXT (docs/next_methods.md): `--budget` lands within
1 % of the budget on the demo images, or is refused up front where a method's first layers alone exceed
it (and its documented way out lands); keeping everything is the unpruned model; VisionZip's per-image
counts and its two layouts, checked by hand."""

from __future__ import annotations

import json

import pytest
import torch

from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import create_method
from llava.drop.methods.visionzip import VisionZip, VisionZipOptions, budget_shares, grid_reading_order
from llava.drop.vision import encode_next_image, flat_next_features
from llava.eval.model_vqa_loader import main as answer_main
from llava.mm_utils import load_image
from llava.model.geometry import read_geometry
from llava.model.inputs import encode_question
from tests.conftest import DEMO_IMAGE_FOLDER, NEXT_DEMO_IMAGES, cli_args, questions_about

NEW_TOKENS = 2
SIDE = 24  # patches per crop side
PATCHES = SIDE * SIDE
BUDGETS = (640, 320, 160)
TOLERANCE = 0.01  # of the budget, on the average over the demo images
# the unpruned model's own layout (spatial_unpad), see tests/test_next_generation.py
VISION_TOKENS = {"tall": 576 + 40 * 25, "square": 576 + 48 * 49, "wide": 576 + 16 * 49}
GRIDS = {"tall": (2, 1), "square": (2, 2), "wide": (1, 2)}  # crop rows x crop columns
UNPADDED_ROWS = {"tall": 40, "square": 48, "wide": 16}  # patch rows left after unpad (columns are kept)
# Budgets a method refuses on NeXT (its first layers alone average more for a 2 x 2 grid's 2928 tokens),
# the message naming the way out, and that way out.
REFUSED = {
    ("fastv", 160): ("choose drop_after=0 or less", {"drop_after": "0"}),
    ("pdrop", 160): ("drop first after an earlier layer than 1", {"drop_after": "0;5;11"}),
    ("sparsevlm", 160): ("drop first after an earlier layer than 2", {"drop_after": "0;6;15"}),
}
METHODS = ("fastv", "pdrop", "sparsevlm", "visionzip")
# Settings that keep every vision token (SparseVLM: counts above any image's 2928 tokens).
KEEP_EVERYTHING = {"fastv": {"kept_share": "1"}, "pdrop": {"kept_share": "1"}, "sparsevlm": {"keep": "4000;4000;4000"}}


@pytest.fixture(scope="module")
def next_inputs(loaded_next_original):
    """The demo images' inputs, by shape."""
    tokenizer, model, image_processor, _ = loaded_next_original
    return {shape: encode_question("What is written here?", load_image(DEMO_IMAGE_FOLDER / name), model, tokenizer,
                                   image_processor, "vicuna_v1")
            for shape, name in NEXT_DEMO_IMAGES.items()}


def answer(loaded, inputs, method, new_tokens: int = NEW_TOKENS):
    tokenizer, model, _, _ = loaded
    return generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=new_tokens),
                    {tokenizer.eos_token_id}, drop=method, image_sizes=inputs.image_sizes)


@pytest.fixture(scope="module")
def averages(loaded_next_original, next_inputs):
    """averages(name, options) -> {shape: avg_vision_tokens}, each setting run once per module."""
    found = {}

    def measure(name: str, options: dict[str, str]) -> dict[str, float]:
        key = (name, tuple(sorted(options.items())))
        if key not in found:
            method = create_method(name, options)
            found[key] = {shape: answer(loaded_next_original, inputs, method).stats["avg_vision_tokens"]
                          for shape, inputs in next_inputs.items()}
        return found[key]

    return measure


def assert_lands(per_image: dict[str, float], budget: int) -> None:
    mean = sum(per_image.values()) / len(per_image)
    assert abs(mean - budget) <= TOLERANCE * budget, (budget, per_image)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", METHODS)
def test_budget_lands_within_one_percent_or_is_refused_with_a_way_out(tiny_next_original, averages, name, budget):
    options = {"budget": str(budget)}
    if (name, budget) not in REFUSED:
        assert_lands(averages(name, options), budget)
        return
    hint, way_out = REFUSED[name, budget]
    geometry = read_geometry(str(tiny_next_original))  # config files only, as the CLIs check before loading
    with pytest.raises(ValueError, match=f"budget 160.* is below .*; {hint}"):
        create_method(name, options).check_model(geometry)
    create_method(name, {**options, **way_out}).check_model(geometry)
    assert_lands(averages(name, {**options, **way_out}), budget)


@pytest.mark.parametrize("name", sorted(KEEP_EVERYTHING))
def test_keeping_everything_answers_as_the_unpruned_model(loaded_next_original, next_inputs, name):
    inputs = next_inputs["tall"]
    kept = answer(loaded_next_original, inputs, create_method(name, KEEP_EVERYTHING[name]), new_tokens=4)
    unpruned = answer(loaded_next_original, inputs, None, new_tokens=4)
    assert set(kept.stats["vision_tokens_after_layer"].values()) == {VISION_TOKENS["tall"]}
    assert kept.stats["avg_vision_tokens"] == unpruned.stats["avg_vision_tokens"] == VISION_TOKENS["tall"]
    assert kept.token_ids == unpruned.token_ids


ZIP_EVERYTHING = VisionZipOptions(dominant=1 + PATCHES, contextual=0)  # CLS and every patch of each image


def test_visionzip_keeping_every_patch_is_the_unpruned_flat_model_with_cls(loaded_next_original, next_inputs,
                                                                          monkeypatch):
    """Every image's CLS and patches, image after image: the flat model whose select strategy keeps CLS."""
    model = loaded_next_original[1]
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "flat", raising=False)
    for shape, inputs in next_inputs.items():
        zipped = VisionZip(ZIP_EVERYTHING).encode_next(model, inputs.pixel_values, inputs.image_sizes)
        unpruned = flat_next_features(model, inputs.pixel_values[0])
        images = unpruned.shape[0]
        torch.testing.assert_close(zipped.features.view(images, 1 + PATCHES, -1)[:, 1:], unpruned, rtol=0, atol=1e-6)
        assert images == 1 + GRIDS[shape][0] * GRIDS[shape][1]
        assert (zipped.stats["vision_tokens"], zipped.stats["vision_tokens_in"]) == (images * (1 + PATCHES),
                                                                                    images * PATCHES)
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    inputs = next_inputs["tall"]
    kept = answer(loaded_next_original, inputs, VisionZip(ZIP_EVERYTHING), new_tokens=4)
    assert kept.token_ids == answer(loaded_next_original, inputs, None, new_tokens=4).token_ids


@pytest.mark.parametrize("shape", sorted(NEXT_DEMO_IMAGES))
def test_visionzip_keeping_every_patch_is_the_unpruned_grid_without_unpad_or_newlines(loaded_next_original, next_inputs,
                                                                                     shape):
    """The released code packs the crops' kept patches on the whole crop grid, row by row, and neither
    unpads it nor adds newline tokens: with every patch kept, the rows the model's own layout keeps match
    it token for token once its newline tokens are left out. The base image brings its CLS first, the
    crops theirs after the grid."""
    model = loaded_next_original[1]
    inputs = next_inputs[shape]
    zipped = VisionZip(ZIP_EVERYTHING).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    unpruned = encode_next_image(model, inputs.pixel_values, inputs.image_sizes).features
    rows, columns = (count * SIDE for count in GRIDS[shape])
    crops = GRIDS[shape][0] * GRIDS[shape][1]
    assert zipped.features.shape[0] == 1 + PATCHES + rows * columns + crops
    assert zipped.stats["vision_tokens_in"] == unpruned.shape[0] == VISION_TOKENS[shape]
    torch.testing.assert_close(zipped.features[1 : 1 + PATCHES], unpruned[:PATCHES], rtol=0, atol=1e-6)
    grid = zipped.features[1 + PATCHES : 1 + PATCHES + rows * columns].view(rows, columns, -1)
    kept_rows = UNPADDED_ROWS[shape]
    cut = (rows - kept_rows) // 2
    own = unpruned[PATCHES:].view(kept_rows, columns + 1, -1)[:, :columns]  # the newline closes each row
    torch.testing.assert_close(grid[cut : cut + kept_rows], own, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("budget", "images", "shares"), [
    (320, 5, [64] * 5), (320, 3, [107, 107, 106]), (640, 5, [128] * 5), (640, 3, [214, 213, 213]),
    (160, 5, [32] * 5), (160, 3, [54, 53, 53]),
])
def test_visionzip_shares_a_budget_over_the_base_image_and_crops(budget, images, shares):
    assert budget_shares(budget, images) == shares
    counts = VisionZipOptions(budget=budget).image_counts(images)
    assert [dominant + contextual for dominant, contextual in counts] == shares


def test_visionzip_splits_each_share_like_llava_1_5():
    assert VisionZipOptions(budget=320).image_counts(5) == [(54, 10)] * 5  # the paper's 64 = 54 + 10 per image
    assert VisionZipOptions(budget=320).image_counts(3) == [(90, 17), (90, 17), (89, 17)]
    assert VisionZipOptions().image_counts(3) == [(54, 10)] * 3  # without a budget every image keeps 54 + 10


def test_visionzip_reads_the_crops_dominant_patches_row_by_row_across_the_grid():
    """A 2 x 2 grid of 2 x 2-patch crops, the whole grid's cells numbered row by row:
         0  1 |  2  3        crop 0 keeps patches 0, 3 -> cells 0, 5;  crop 1 keeps 1 -> cell 3
         4  5 |  6  7        crop 2 keeps 2 -> cell 12;  crop 3 keeps all -> cells 10, 11, 14, 15
         8  9 | 10 11
        12 13 | 14 15        listed crop by crop: cells 0, 5, 3, 12, 10, 11, 14, 15"""
    kept = [torch.tensor([0, 3]), torch.tensor([1]), torch.tensor([2]), torch.tensor([0, 1, 2, 3])]
    assert grid_reading_order(kept, (2, 2), 2).tolist() == [0, 2, 1, 4, 5, 3, 6, 7]
    assert grid_reading_order(kept[:2], (1, 2), 2).tolist() == [0, 2, 1]  # a row of two crops: cells 0, 5, 3
    assert grid_reading_order(kept[:2], (2, 1), 2).tolist() == [0, 1, 2]  # a column: crop 0's rows come first


def zipped_alone(model, image: torch.Tensor, dominant: int, contextual: int):
    """One tower image zipped on its own, the LLaVA-1.5 way: its features (CLS first) and its dominant patches."""
    out = VisionZip(VisionZipOptions(dominant=dominant, contextual=contextual)).encode_image(model, image[None])
    return out.features, [group[0] for group in out.patch_groups[1:dominant]]


@pytest.mark.parametrize("shape", ["square", "wide"])
def test_visionzip_spatial_layout_is_base_then_grid_ordered_dominant_then_contextual(loaded_next_original,
                                                                                     next_inputs, shape):
    model = loaded_next_original[1]
    inputs = next_inputs[shape]
    zipped = VisionZip(VisionZipOptions(budget=320)).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    counts = VisionZipOptions(budget=320).image_counts(inputs.pixel_values.shape[1])
    alone = [zipped_alone(model, image, *count) for image, count in zip(inputs.pixel_values[0], counts)]
    columns = GRIDS[shape][1]
    placed = []  # (grid row, grid column, token) of every crop's dominant patch
    for crop, ((features, patches), (dominant, _)) in enumerate(zip(alone[1:], counts[1:])):
        crop_row, crop_column = divmod(crop, columns)
        placed += [(crop_row * SIDE + patch // SIDE, crop_column * SIDE + patch % SIDE, features[1 + index])
                   for index, patch in enumerate(patches)]
    expected = torch.cat([alone[0][0], torch.stack([token for *_, token in sorted(placed, key=lambda p: p[:2])]),
                          *(features[:1] for features, _ in alone[1:]),
                          *(features[dominant:] for (features, _), (dominant, _) in zip(alone[1:], counts[1:]))])
    assert zipped.features.shape[0] == 320
    torch.testing.assert_close(zipped.features, expected, rtol=0, atol=1e-5)
    assert zipped.stats["vision_tokens_in"] == VISION_TOKENS[shape]
    assert zipped.stats["dominant"] == sum(dominant for dominant, _ in counts)
    assert zipped.stats["contextual"] == sum(contextual for _, contextual in counts)


def test_visionzip_flat_layout_is_each_image_in_turn(loaded_next_original, next_inputs, monkeypatch):
    model = loaded_next_original[1]
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "flat", raising=False)
    inputs = next_inputs["tall"]
    zipped = VisionZip(VisionZipOptions(budget=320)).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    counts = [(90, 17), (90, 17), (89, 17)]
    expected = torch.cat([zipped_alone(model, image, *count)[0]
                          for image, count in zip(inputs.pixel_values[0], counts)])
    torch.testing.assert_close(zipped.features, expected, rtol=0, atol=1e-5)
    assert zipped.stats["vision_tokens_in"] == 3 * PATCHES  # the unpruned flat layout: three whole images


@pytest.mark.parametrize("shape", sorted(NEXT_DEMO_IMAGES))
def test_visionzip_counts_what_the_unpruned_model_would_have_seen(loaded_next_original, next_inputs, shape):
    inputs = next_inputs[shape]
    zipped = answer(loaded_next_original, inputs, VisionZip(VisionZipOptions(budget=320)))
    stats = zipped.stats
    assert stats["vision_tokens_in"] == VISION_TOKENS[shape]
    assert stats["vision_tokens"] == stats["avg_vision_tokens"] == 320
    crops = GRIDS[shape][0] * GRIDS[shape][1]
    assert (stats["images"], stats["crops"]) == (1 + crops, crops)
    assert stats["prefill_flops_ratio"] < 1


@pytest.mark.parametrize("name", ["fastv", "visionzip"])
def test_answering_cli_runs_a_method_with_a_budget_on_next(tiny_next_original, tmp_path, name):
    answers = tmp_path / "answers.jsonl"
    questions = questions_about(NEXT_DEMO_IMAGES.values(), tmp_path)
    answer_main(cli_args(tiny_next_original, questions, answers, "--method", name, "--budget", "320",
                         max_new_tokens=NEW_TOKENS))
    records = [json.loads(line)["metadata"] for line in answers.read_text().splitlines()]
    assert len(records) == 3
    assert sorted(record["crops"] for record in records) == [2, 2, 4]
    for record in records:
        assert record["images"] == 1 + record["crops"]
        assert record["avg_vision_tokens_per_image"] * record["images"] == pytest.approx(record["avg_vision_tokens"])
        assert record["run"]["method"] == name
    assert abs(sum(record["avg_vision_tokens"] for record in records) / 3 - 320) <= TOLERANCE * 320


def test_the_transformers_layout_tiles_and_counts_alike(loaded_next_hf):
    """transformers' own NeXT processor and config (pinpoints as [height, width]) give VisionZip the same
    grid and unpruned count, and FastV's budget lands there too."""
    tokenizer, model, image_processor, _ = loaded_next_hf
    inputs = encode_question("What is written here?", load_image(DEMO_IMAGE_FOLDER / NEXT_DEMO_IMAGES["tall"]), model,
                             tokenizer, image_processor, "vicuna_v1")
    zipped = answer(loaded_next_hf, inputs, VisionZip(VisionZipOptions(budget=320))).stats
    assert (zipped["vision_tokens_in"], zipped["vision_tokens"], zipped["crops"]) == (VISION_TOKENS["tall"], 320, 2)
    pruned = answer(loaded_next_hf, inputs, create_method("fastv", {"budget": "320"})).stats
    assert abs(pruned["avg_vision_tokens"] - 320) <= 0.5
