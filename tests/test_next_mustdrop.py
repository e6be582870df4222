"""MustDrop on LLaVA-NeXT in the reference's flat layout: the base image and its crops merge the same
number of windows (the fewest any of them has above the threshold), their features follow one another,
and each image's key set is shifted to its place in the flat span. Also the budget variant on NeXT, where
the budget is the image's total, in both layouts (the spatial layout itself: tests/test_next_spatial.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import DropConfig, MustDrop, create_method
from llava.drop.prefill import build_prompt, prefill_prompt
from llava.drop.methods.mustdrop import (
    bounds_from_counts,
    merge_count_bounds,
    merge_windows_per_image,
    mustdrop_budget_floor,
    window_similarity,
)
from llava.drop.vision import flat_next_features
from llava.eval.model_vqa_loader import main as answer_main
from llava.mm_utils import load_image
from llava.model.geometry import geometry_of_model
from llava.model.inputs import encode_question
from tests.conftest import DEMO_IMAGE_FOLDER, cli_args, first_questions

GRID, WINDOW, DIM = 24, 3, 16
NUM_PATCHES = GRID * GRID
SAVED_PER_WINDOW = WINDOW * WINDOW - 1
THRESHOLD = 0.8
KEY_RATE = 0.08
# Hand-built similar windows, most similar first (each noisier than the one before): image 0 has five,
# image 1 three, so the batch merges three windows in each image.
SIMILAR_WINDOWS = ([7, 50, 3, 33, 12], [60, 1, 20])
NOISE_STEPS = (0.0, 0.02, 0.04, 0.06, 0.08)
TALL, SQUARE = "175e99412607ad5f.png", "3fc86ee644365862.png"  # 1 + 2 images and 1 + 4 images
NOTHING_MERGES = DropConfig(merge_threshold=1.0)  # the demo images score below 1 everywhere (checked below)
WIDE = "2383bc6655712a55.png"  # 1 + 2 images side by side
NEXT_BUDGETS = (640, 320, 160)  # the total layer-averaged vision tokens used for LLaVA-NeXT
DROP_LAYERS = (2, 6, 10, 14)


def window_patch_rows(window: int) -> list[int]:
    """Sequence rows (CLS is row 0) of one row-major window's patches, row-major inside the window."""
    row, col = divmod(window, GRID // WINDOW)
    return [1 + (row * WINDOW + i) * GRID + col * WINDOW + j for i in range(WINDOW) for j in range(WINDOW)]


def hand_built_batch() -> torch.Tensor:
    """[2, 577, DIM] random tokens (no window near 0.8) with each image's similar windows filled in."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(len(SIMILAR_WINDOWS), 1 + NUM_PATCHES, DIM, generator=generator)
    for image, windows in enumerate(SIMILAR_WINDOWS):
        for window, noise in zip(windows, NOISE_STEPS):
            base = torch.randn(DIM, generator=generator)
            for row in window_patch_rows(window):
                hidden[image, row] = base + noise * torch.randn(DIM, generator=generator)
    return hidden


def expected_merge(sequence: torch.Tensor, merged_windows: list[int]) -> torch.Tensor:
    """The merged sequence the slow obvious way: CLS, each merged window's mean, then the other patches."""
    merged_rows = {row for window in merged_windows for row in window_patch_rows(window)}
    means = [sequence[window_patch_rows(window)].mean(dim=0) for window in merged_windows]
    rest = [sequence[row] for row in range(1, 1 + NUM_PATCHES) if row not in merged_rows]
    return torch.stack([sequence[0], *means, *rest])


def test_batch_merges_the_fewest_windows_any_image_has_each_its_own_best() -> None:
    hidden = hand_built_batch()
    for image, windows in enumerate(SIMILAR_WINDOWS):  # setup: exactly these windows pass, in this order
        scores = window_similarity(hidden[image, 1:], GRID, WINDOW)
        assert (scores >= THRESHOLD).nonzero().flatten().tolist() == sorted(windows)
        assert scores[windows].argsort(descending=True).tolist() == list(range(len(windows)))

    merged, tops = merge_windows_per_image(hidden, THRESHOLD, WINDOW)

    r = len(SIMILAR_WINDOWS[1])
    assert tops.tolist() == [SIMILAR_WINDOWS[0][:r], SIMILAR_WINDOWS[1]]
    assert merged.shape == (2, 1 + NUM_PATCHES - SAVED_PER_WINDOW * r, DIM) == (2, 553, DIM)
    for image in range(2):
        torch.testing.assert_close(merged[image], expected_merge(hidden[image], tops[image].tolist()),
                                   rtol=0, atol=1e-6)
        alone, alone_tops = merge_windows_per_image(hidden[image : image + 1], THRESHOLD, WINDOW, count_bounds=(r, r))
        alone_top = alone_tops[0]
        assert torch.equal(merged[image], alone[0]) and torch.equal(tops[image], alone_top)


def test_batch_merges_nothing_when_one_image_has_no_similar_window() -> None:
    hidden = hand_built_batch()
    hidden[1] = torch.randn(1 + NUM_PATCHES, DIM, generator=torch.Generator().manual_seed(5))
    merged, tops = merge_windows_per_image(hidden, THRESHOLD, WINDOW)
    assert tops.shape == (2, 0)
    assert torch.equal(merged, hidden)


def next_inputs(loaded, image_name: str):
    tokenizer, model, image_processor, _ = loaded
    image = load_image(DEMO_IMAGE_FOLDER / image_name)
    return encode_question("What is written here?", image, model, tokenizer, image_processor, "vicuna_v1")


def assert_keys_per_image(key_indices: torch.Tensor, images: int, per_image: int) -> None:
    """Each image contributes ceil(rate * its tokens) keys, all inside its own stretch of the flat span."""
    for image in range(images):
        inside = (key_indices >= image * per_image) & (key_indices < (image + 1) * per_image)
        assert int(inside.sum()) == math.ceil(KEY_RATE * per_image)
    assert key_indices.numel() == images * math.ceil(KEY_RATE * per_image)


@pytest.mark.parametrize("image_name", [TALL, SQUARE])
def test_without_merging_the_features_are_the_flat_unpruned_ones(loaded_next_original, image_name):
    model = loaded_next_original[1]
    inputs = next_inputs(loaded_next_original, image_name)
    images = inputs.pixel_values.shape[1]

    out = MustDrop(NOTHING_MERGES).encode_next(model, inputs.pixel_values, inputs.image_sizes)

    assert out.stats["merged_windows"] == 0
    assert torch.equal(out.features, flat_next_features(model, inputs.pixel_values[0]).flatten(0, 1))
    assert out.stats["vision_tokens_per_image"] == out.stats["vision_tokens_per_image_in"] == NUM_PATCHES
    assert out.stats["vision_tokens"] == images * NUM_PATCHES
    assert_keys_per_image(out.key_indices, images, NUM_PATCHES)


def test_dropping_nothing_answers_as_the_unpruned_flat_model(loaded_next_original, monkeypatch):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_inputs(loaded_next_original, TALL)

    def run(drop):
        return generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=6),
                        {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)

    ours = run(MustDrop(NOTHING_MERGES))
    monkeypatch.setattr(model.config, "mm_patch_merge_type", "flat", raising=False)
    unpruned = run(None)
    assert ours.stats["vision_tokens_after_layer"] == {str(layer): 3 * NUM_PATCHES for layer in (2, 6, 10, 14)}
    assert ours.stats["vision_tokens"] == unpruned.stats["vision_tokens"] == 3 * NUM_PATCHES
    assert ours.token_ids == unpruned.token_ids


def test_a_disabled_config_is_the_unpruned_model(loaded_next_original):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_inputs(loaded_next_original, SQUARE)
    answers = [generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=3),
                        {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)
               for drop in (MustDrop(DropConfig.disabled()), None)]
    assert answers[0].stats["vision_tokens"] == answers[1].stats["vision_tokens"] == 576 + 48 * 49  # own layout
    assert answers[0].token_ids == answers[1].token_ids


@pytest.mark.parametrize("image_name", [TALL, SQUARE])
def test_every_image_keeps_the_same_count_after_the_merge(loaded_next_original, image_name):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_inputs(loaded_next_original, image_name)
    images = inputs.pixel_values.shape[1]
    drop = MustDrop(DropConfig(global_thr=0.011, individual_thr=0.01))

    vision = drop.encode_next(model, inputs.pixel_values, inputs.image_sizes)
    answer = generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=2),
                      {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)

    r = vision.stats["merged_windows"]
    per_image = NUM_PATCHES - SAVED_PER_WINDOW * r
    assert r > 0
    assert vision.stats["vision_tokens_per_image"] == per_image
    assert vision.features.shape[0] == images * per_image
    assert_keys_per_image(vision.key_indices, images, per_image)
    stats = answer.stats
    assert (stats["images"], stats["crops"], stats["merged_windows"]) == (images, images - 1, r)
    assert stats["vision_tokens"] == images * per_image and stats["vision_tokens_in"] == images * NUM_PATCHES
    assert stats["avg_vision_tokens_per_image"] * images == pytest.approx(stats["avg_vision_tokens"], rel=1e-12)
    assert stats["avg_vision_tokens"] < images * per_image  # stage 2 dropped some


def test_next_layout_is_validated():
    with pytest.raises(ValueError, match="next_layout must be one of flat, spatial"):
        DropConfig(next_layout="grid")


def test_merge_bounds_on_the_total_by_hand():
    # 3 images keeping 576 - 8r tokens each; the key-set floor is (3 * 3V + 29 * 3 * ceil(0.08 V)) / 32 for V per image.
    # 640: at most 3 (576 - 8r) >= 640, r <= 45.3 -> 45; r = 0 already floors at (5184 + 87 * 47) / 32 = 289.8.
    assert merge_count_bounds(576, 3, 640, DROP_LAYERS, 32, KEY_RATE, images=3) == (0, 45)
    # 160: r = 32 leaves V = 320, (2880 + 87 * 26) / 32 = 160.7 > 160; r = 33, V = 312: (2808 + 87 * 25) / 32 = 155.7.
    assert merge_count_bounds(576, 3, 160, DROP_LAYERS, 32, KEY_RATE, images=3) == (33, 64)
    # 5 images, 160: r = 48, V = 192: (2880 + 145 * 16) / 32 = 162.5; r = 49, V = 184: (2760 + 145 * 15) / 32 = 154.2.
    assert merge_count_bounds(576, 3, 160, DROP_LAYERS, 32, KEY_RATE, images=5) == (49, 64)
    assert merge_count_bounds(576, 3, 64, DROP_LAYERS, 32, KEY_RATE, images=1) == (25, 64)  # LLaVA-1.5's


def test_bounds_from_uneven_counts_by_hand():
    # Tokens left after 0..3 merges (a merge in the padding saves nothing: 100 -> 100), key sets 10, 10, 9, 9.
    # 95: floors (3 * count + 29 * keys) / 32 = 18.4, 18.4, 16.6, 15.7; the most merges keeping 95 tokens is 1.
    assert bounds_from_counts([100, 100, 90, 80], [10, 10, 9, 9], 95, [3, 4, 4, 4, 17]) == (0, 1)
    # 17: only r = 2 floors within it; at most 3 merges keep 17 tokens.
    assert bounds_from_counts([100, 100, 90, 80], [10, 10, 9, 9], 17, [3, 4, 4, 4, 17]) == (2, 3)


def test_budget_floor_on_the_largest_tiling_by_hand():
    # Every window merged leaves 64 tokens per image, 6 of them keys: 5 images -> (3 * 320 + 29 * 30) / 32.
    assert mustdrop_budget_floor(576, 3, True, DROP_LAYERS, 32, KEY_RATE, images=5) == (960 + 870) / 32 == 57.1875
    # The spatial layout adds 48 newline tokens, all kept: (3 * 368 + 29 * 78) / 32.
    assert mustdrop_budget_floor(576, 3, True, DROP_LAYERS, 32, KEY_RATE, images=5, newlines=48) == 3366 / 32


@pytest.mark.parametrize(("layout", "budget", "message"), [
    ("flat", 50, r"budget 50 is below 57\.2, .* on 576 patches in each of 5 images$"),
    ("spatial", 100, r"budget 100 is below 105\.2, .* in each of 5 images plus 48 newline tokens$"),
], ids=["flat", "spatial"])
def test_a_budget_the_largest_tiling_cannot_reach_is_refused(loaded_next_original, layout, budget, message):
    tokenizer, model, _, _ = loaded_next_original
    inputs = next_inputs(loaded_next_original, TALL)
    drop = create_method("mustdrop", {"budget": str(budget), "next_layout": layout})
    with pytest.raises(ValueError, match=message):
        drop.check_model(geometry_of_model(model))
    with pytest.raises(ValueError, match=message):  # generate checks before the vision stage runs
        generate(model, inputs.input_ids, torch.full_like(inputs.pixel_values, float("nan")),
                 SamplingConfig(max_new_tokens=1), {tokenizer.eos_token_id}, drop=drop, image_sizes=inputs.image_sizes)
    create_method("mustdrop", {"budget": str(budget + 10), "next_layout": layout}).check_model(geometry_of_model(model))


def prefill_average(model, inputs, method: MustDrop) -> float:
    """The layer-averaged vision tokens of one prefill (the total over the base image and its crops)."""
    with torch.no_grad():
        prompt = build_prompt(model, inputs.input_ids, method.encode_next(model, inputs.pixel_values,
                                                                          inputs.image_sizes))
        counts = prefill_prompt(model, prompt, method).vision_tokens_per_layer
    return sum(counts) / len(counts)


@pytest.mark.parametrize("layout", ["flat", "spatial"])
def test_next_budgets_land_within_one_percent_on_the_demo_images(loaded_next_original, layout):
    model = loaded_next_original[1]
    inputs = [next_inputs(loaded_next_original, name) for name in (TALL, SQUARE, WIDE)]
    for budget in NEXT_BUDGETS:
        method = MustDrop(DropConfig(budget=budget, next_layout=layout))
        method.check_model(geometry_of_model(model))
        averages = [prefill_average(model, image, method) for image in inputs]
        assert abs(sum(averages) / len(averages) - budget) <= 0.01 * budget, (layout, budget, averages)


def test_answering_cli_runs_mustdrop_on_next(tiny_next_original, tmp_path):
    answers = tmp_path / "answers.jsonl"
    answer_main(cli_args(tiny_next_original, first_questions(tmp_path, 2), answers, "--sparse", "--global_thr",
                         "0.011", "--individual_thr", "0.01", max_new_tokens=2))
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(records) == 2
    for metadata in (record["metadata"] for record in records):
        images, per_image = metadata["images"], metadata["vision_tokens_per_image"]
        assert metadata["crops"] == images - 1 and metadata["crops"] in (2, 4)
        assert metadata["vision_tokens_per_image_in"] == NUM_PATCHES
        assert per_image == NUM_PATCHES - SAVED_PER_WINDOW * metadata["merged_windows"]
        assert metadata["vision_tokens"] == images * per_image
        assert metadata["key_tokens"] == images * math.ceil(KEY_RATE * per_image)
        assert metadata["avg_vision_tokens_per_image"] * images == pytest.approx(metadata["avg_vision_tokens"])
        assert metadata["run"]["method_options"]["next_layout"] == "flat"


@pytest.mark.parametrize(("flags", "message"), [
    (["--sparse", "--budget", "50"], "budget 50 is below 57.2"),
    (["--sparse", "--next_layout", "spatial", "--budget", "100"], "budget 100 is below 105.2"),
], ids=["flat", "spatial"])
def test_an_unreachable_next_budget_is_refused_before_the_model_loads(tiny_next_original, tmp_path, monkeypatch, flags,
                                                                      message):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("llava.eval.answering.loop.load_pretrained_model", no_load)
    answers = tmp_path / "a.jsonl"
    with pytest.raises(SystemExit) as stop:
        answer_main(cli_args(tiny_next_original, first_questions(tmp_path, 1), answers, *flags))
    assert message in str(stop.value.code)
    assert not answers.exists()
