"""MustDrop on LLaVA-NeXT in the model's own spatial_unpad layout (`--next_layout spatial`, our extension):
the base image as on LLaVA-1.5, each crop's tokens where their windows were in the unpadded crop grid, a
newline token after every row, and the newlines in the key set."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import DropConfig, MustDrop
from llava.drop.methods.mustdrop import (
    crop_window_savings,
    merge_windows_per_image,
    spatial_key_indices,
    spatial_selection,
    window_similarity,
)
from llava.drop.next_layout import NEWLINE, crop_grid
from llava.drop.vision import encode_next_image
from llava.eval.model_vqa_loader import main as answer_main
from tests.conftest import cli_args, first_questions, next_demo_inputs

TALL, SQUARE, WIDE = "175e99412607ad5f.png", "3fc86ee644365862.png", "2383bc6655712a55.png"
SPATIAL = DropConfig(next_layout="spatial")
NOTHING_MERGES = DropConfig(merge_threshold=1.0, next_layout="spatial")  # the demo images score below 1 everywhere

# A hand-sized model: 84 px crops of 14 px patches (a 6 x 6 grid, four 3 x 3 windows), tiled 2 crops high and
# 1 wide. An image 100 high and 40 wide fills 12 x 4.8 patches of the 12 x 6 grid: transformers' unpad keeps
# int(round(40 * 12 / 100, 7)) = 4 columns, dropping (6 - 4) // 2 = 1 on each side: columns 1..4.
SMALL = SimpleNamespace(vision_config=SimpleNamespace(image_size=84, patch_size=14), image_grid_pinpoints=[[168, 84]])
SMALL_SIZE = [100, 40]
SIDE, WINDOW, DIM = 6, 3, 16
SMALL_PATCHES = SIDE * SIDE
# One similar window per image, so r = 1: the base image merges window 2 (rows 3-5, columns 0-2), crop 0
# window 0 (rows 0-2, columns 0-2, its first column padding), crop 1 window 3 (rows 3-5, columns 3-5, its
# last column padding). Each image keeps 36 - 8 = 28 tokens.
SMALL_MERGES = (2, 0, 3)
SMALL_TOKENS = SMALL_PATCHES - (WINDOW * WINDOW - 1)
MERGED = "merged"
# The crop grid after the merge and unpad, row by row (crop-local (row, column) of each patch token): crop 0's
# merged token sits at the window's first surviving patch (0, 1); crop 1's at its window's first patch (3, 3).
SMALL_ROWS = [
    [MERGED, (0, 3), (0, 4)], [(1, 3), (1, 4)], [(2, 3), (2, 4)],
    [(3, 1), (3, 2), (3, 3), (3, 4)], [(4, 1), (4, 2), (4, 3), (4, 4)], [(5, 1), (5, 2), (5, 3), (5, 4)],
    [(0, 1), (0, 2), (0, 3), (0, 4)], [(1, 1), (1, 2), (1, 3), (1, 4)], [(2, 1), (2, 2), (2, 3), (2, 4)],
    [(3, 1), (3, 2), MERGED], [(4, 1), (4, 2)], [(5, 1), (5, 2)],
]
# 28 base tokens, then 3 + 2 + 2 + 4 + 4 + 4 (crop 0) + 4 + 4 + 4 + 3 + 2 + 2 (crop 1) = 38 tokens and 12
# newlines. Unmerged it would be 36 + 12 x 4 + 12 = 96; the base saves 8, each crop window 6 - 1 = 5 (its 6
# surviving patches become one token): 96 - 18 = 78.
SMALL_LENGTH = 78
SMALL_NEWLINES = [31, 34, 37, 42, 47, 52, 57, 62, 67, 71, 74, 77]  # 28 + cumulative row lengths, each + 1


def window_rows(window: int) -> list[int]:
    """Sequence rows (CLS is row 0) of one window's patches on the small 6 x 6 grid, row-major."""
    row, col = divmod(window, SIDE // WINDOW)
    return [1 + (row * WINDOW + i) * SIDE + col * WINDOW + j for i in range(WINDOW) for j in range(WINDOW)]


def small_batch() -> torch.Tensor:
    """[3, 37, DIM] random tokens with one near-identical window per image (SMALL_MERGES)."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 1 + SMALL_PATCHES, DIM, generator=generator)
    for image, window in enumerate(SMALL_MERGES):
        base = torch.randn(DIM, generator=generator)
        for row in window_rows(window):
            hidden[image, row] = base + 0.01 * torch.randn(DIM, generator=generator)
    return hidden


def test_crop_grid_is_the_models_unpad_by_hand():
    grid = crop_grid(SMALL, SMALL_SIZE)
    assert (grid.crops_high, grid.crops_wide, grid.side, grid.rows) == (2, 1, SIDE, 12)
    assert grid.kept.tolist() == [[row * SIDE + col for col in range(1, 5)] for row in range(12)]
    assert grid.surviving()[0, :SIDE].tolist() == [False, True, True, True, True, False]


def test_merged_tokens_and_newlines_land_where_their_windows_were():
    hidden = small_batch()
    for image, window in enumerate(SMALL_MERGES):  # setup: exactly that window passes the threshold
        scores = window_similarity(hidden[image, 1:], SIDE, WINDOW)
        assert (scores >= 0.8).nonzero().flatten().tolist() == [window]
    merged, tops = merge_windows_per_image(hidden, 0.8, WINDOW)
    assert tops.tolist() == [[window] for window in SMALL_MERGES]

    selection = spatial_selection(crop_grid(SMALL, SMALL_SIZE), tops, SMALL_PATCHES, WINDOW)
    newline = torch.full((DIM,), 7.0)
    features = torch.cat([merged[:, 1:].flatten(0, 1), newline[None]])[selection]

    def patch(image: int, row: int, col: int) -> torch.Tensor:
        return hidden[image, 1 + row * SIDE + col]

    def window_mean(image: int) -> torch.Tensor:
        return hidden[image, window_rows(SMALL_MERGES[image])].mean(dim=0)

    base_rest = [hidden[0, row] for row in range(1, 1 + SMALL_PATCHES) if row not in window_rows(SMALL_MERGES[0])]
    expected = [window_mean(0), *base_rest]  # the base image in LLaVA-1.5's order
    for row_index, row in enumerate(SMALL_ROWS):
        crop = 1 + row_index // SIDE
        expected += [window_mean(crop) if token == MERGED else patch(crop, *token) for token in row] + [newline]
    assert selection.numel() == len(expected) == SMALL_LENGTH
    torch.testing.assert_close(features, torch.stack(expected), rtol=0, atol=1e-6)
    assert (selection == 3 * SMALL_TOKENS).nonzero().flatten().tolist() == SMALL_NEWLINES


def test_key_set_follows_its_tokens_and_adds_every_newline():
    tops = torch.tensor([[window] for window in SMALL_MERGES])
    selection = spatial_selection(crop_grid(SMALL, SMALL_SIZE), tops, SMALL_PATCHES, WINDOW)
    # Flat keys: base token 5; crop 0's merged token (flat 28, placed first in the crop grid, at 28); crop 0's
    # first unmerged patch (0, 3) (flat 29, at 29); crop 0's patch (3, 0), which is padding (flat 28 + 1 + 9:
    # the 10th unmerged patch, after 3, 4, 5, 9, 10, 11, 15, 16, 17), so it leaves the key set.
    keys = spatial_key_indices(selection, torch.tensor([5, 28, 29, 38]), 3 * SMALL_TOKENS)
    assert keys.tolist() == sorted([5, 28, 29, *SMALL_NEWLINES])


def test_merging_a_padding_window_saves_nothing():
    # The tall demo image (300 x 180) tiles 2 crops high; unpad keeps 40 of the 48 rows: rows 4..43.
    tiny = SimpleNamespace(vision_config=SimpleNamespace(image_size=336, patch_size=14),
                           image_grid_pinpoints=[[672, 336]])
    grid = crop_grid(tiny, [300, 180])
    assert grid.kept.shape == (40, 24) and grid.kept[0, 0] == 4 * 24
    savings = crop_window_savings(grid, 3)
    # Crop 0: window row 0 (rows 0-2) is padding, window row 1 (rows 3-5) keeps rows 4 and 5: 6 patches -> 5.
    # Crop 1 (rows 24-47): window row 6 (rows 42-44) keeps 42 and 43 -> 5; window row 7 (rows 45-47) is padding.
    assert savings[0].tolist() == [0] * 8 + [5] * 8 + [8] * 48
    assert savings[1].tolist() == [8] * 48 + [5] * 8 + [0] * 8


@pytest.mark.parametrize("size", [[300, 180], [400, 400], [240, 360], [160, 500], [340, 260], [97, 331]],
                         ids=lambda size: f"{size[0]}x{size[1]}")
def test_unmerged_selection_is_the_models_packing(loaded_next_original, size):
    """Index features through transformers' own packing give the same order as our selection."""
    config = loaded_next_original[1].config
    grid = crop_grid(config, size)
    images, patches = 1 + grid.crops, grid.side * grid.side
    index_features = torch.arange(images * patches, dtype=torch.float64).view(images, patches, 1)
    packed, _ = LlavaNextModel.pack_image_features(SimpleNamespace(config=config), [index_features],
                                                   torch.tensor([size]), "default", torch.tensor([-1.0]))
    expected = packed[0][:, 0].long()
    selection = spatial_selection(grid, torch.empty(images, 0, dtype=torch.long), patches, 3)
    assert torch.equal(selection, torch.where(expected == NEWLINE, images * patches, expected))


@pytest.mark.parametrize("image_name", [TALL, SQUARE, WIDE])
def test_without_merging_the_features_are_the_models_own(loaded_next_original, image_name):
    model = loaded_next_original[1]
    inputs = next_demo_inputs(loaded_next_original, image_name)

    out = MustDrop(NOTHING_MERGES).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    unpruned = encode_next_image(model, inputs.pixel_values, inputs.image_sizes)

    assert out.stats["merged_windows"] == 0
    assert torch.equal(out.features, unpruned.features)
    assert out.stats["vision_tokens"] == out.stats["vision_tokens_in"] == unpruned.features.shape[0]
    newlines = (out.features == model.model.image_newline).all(dim=-1).nonzero().flatten()
    assert set(newlines.tolist()) <= set(out.key_indices.tolist())
    assert out.stats["key_newlines"] == newlines.numel()


def test_dropping_nothing_answers_as_the_unpruned_model(loaded_next_original):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_demo_inputs(loaded_next_original, TALL)

    def run(drop):
        return generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=6),
                        {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)

    ours, unpruned = run(MustDrop(NOTHING_MERGES)), run(None)
    # 576 base tokens + 40 rows x 24 columns + 40 newlines (the tall image, see test_merging_a_padding_window...)
    assert ours.stats["vision_tokens"] == unpruned.stats["vision_tokens"] == 576 + 40 * 24 + 40
    assert ours.stats["vision_tokens_after_layer"] == {str(layer): 1576 for layer in (2, 6, 10, 14)}
    assert ours.token_ids == unpruned.token_ids


@pytest.mark.parametrize("image_name", [TALL, SQUARE])
def test_merging_keeps_the_layout_and_the_counts(loaded_next_original, image_name):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_demo_inputs(loaded_next_original, image_name)
    drop = MustDrop(DropConfig(global_thr=0.011, individual_thr=0.01, next_layout="spatial"))

    vision = drop.encode_next(model, inputs.pixel_values, inputs.image_sizes)
    answer = generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=2),
                      {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)

    stats, images = vision.stats, inputs.pixel_values.shape[1]
    grid = crop_grid(model.config, inputs.image_sizes[0].tolist())
    assert stats["merged_windows"] > 0
    assert stats["vision_tokens_in"] == 576 + grid.kept.numel() + grid.rows
    assert stats["vision_tokens_per_image"] == pytest.approx(stats["vision_tokens"] / images)
    newlines = (vision.features == model.model.image_newline).all(dim=-1).nonzero().flatten()
    assert newlines.numel() == stats["key_newlines"] == grid.rows and newlines[-1] == vision.features.shape[0] - 1
    assert set(newlines.tolist()) <= set(vision.key_indices.tolist())
    kept_after = answer.stats["vision_tokens_after_layer"]
    assert all(count >= grid.rows for count in kept_after.values())  # the newlines survive every drop
    assert answer.stats["vision_tokens"] == stats["vision_tokens"] and answer.stats["images"] == images


def test_answering_cli_runs_the_spatial_layout(tiny_next_original, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answer_main(cli_args(tiny_next_original, first_questions(tmp_path, 2), answers, "--sparse", "--next_layout",
                         "spatial", "--budget", "320", max_new_tokens=2))
    for record in (json.loads(line) for line in answers.read_text().splitlines()):
        metadata = record["metadata"]
        assert metadata["run"]["method_options"]["next_layout"] == "spatial"
        assert metadata["vision_tokens_per_image"] * metadata["images"] == pytest.approx(metadata["vision_tokens"])
        assert metadata["avg_vision_tokens"] == pytest.approx(320, rel=0.01)


def test_without_merging_the_transformers_layout_checkpoint_is_its_own_too(loaded_next_hf):
    model = loaded_next_hf[1]
    inputs = next_demo_inputs(loaded_next_hf, WIDE)
    out = MustDrop(NOTHING_MERGES).encode_next(model, inputs.pixel_values, inputs.image_sizes)
    assert torch.equal(out.features, encode_next_image(model, inputs.pixel_values, inputs.image_sizes).features)
