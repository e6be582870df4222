"""Fixed token budgets: the geometric keep schedule, ranked selection, and MustDrop's budget variant."""

from __future__ import annotations

import pytest
import torch

from llava.drop.blocks import layer_average, ranked_keep, stage_lengths
from llava.drop.methods.mustdrop import DropConfig, MustDrop, geometric_keep_counts, merge_count_bounds
from tests.conftest import answer

MUSTDROP_LAYERS = (2, 6, 10, 14)


def test_stage_lengths():
    # layers 0-2 see V, 3-6 k1, 7-10 k2, 11-14 k3, 15-31 k4
    assert stage_lengths(MUSTDROP_LAYERS, 32) == [3, 4, 4, 4, 17]
    assert stage_lengths((1,), 32) == [2, 30]


@pytest.mark.parametrize("budget", [192, 128, 100])
def test_schedule_hits_the_budget_within_a_token(budget):
    counts = geometric_keep_counts(576, budget, MUSTDROP_LAYERS, 32)
    assert counts == sorted(counts, reverse=True)  # never grows back
    assert abs(layer_average([576, *counts], stage_lengths(MUSTDROP_LAYERS, 32)) - budget) <= 1


def test_budget_above_the_vision_tokens_keeps_everything():
    assert geometric_keep_counts(150, 192, MUSTDROP_LAYERS, 32) == [150, 150, 150, 150]


def test_floor_is_respected_even_when_the_budget_is_missed():
    # 3 layers at 576 already average 54; a floor of 47 over the other 29 layers gives 96.6 > 64
    counts = geometric_keep_counts(576, 64, MUSTDROP_LAYERS, 32, minimum=47)
    assert counts == [47, 47, 47, 47]


def test_ranked_keep_takes_the_key_set_first():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2])
    assert ranked_keep(scores, None, 3).tolist() == [0, 2, 4]
    assert ranked_keep(scores, torch.tensor([1]), 3).tolist() == [0, 1, 4]  # key 1, then 0.9 and 0.8
    assert ranked_keep(scores, torch.tensor([1, 3, 5]), 2).tolist() == [1, 3, 5]  # key set kept whole


def test_mustdrop_budget_on_the_model(loaded_original, demo_images):
    """128 is reachable on the first demo image (stage 1 leaves 360 tokens, key set 29)."""
    stats = answer(loaded_original, demo_images[0], MustDrop(DropConfig(budget=128))).stats
    assert stats["vision_tokens"] == 360
    assert abs(stats["avg_vision_tokens"] - 128) <= 1
    counts = [stats["vision_tokens_after_layer"][str(layer)] for layer in MUSTDROP_LAYERS]
    # a geometric schedule with rho ~ 0.65 (234/360, 151/234, 98/151, 64/98), averaging
    # (3 x 360 + 4 x 234 + 4 x 151 + 4 x 98 + 17 x 64) / 32 = 4100 / 32 = 128.1, every count above the 29 key tokens
    assert counts == [234, 151, 98, 64]


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="budget must be a positive number of tokens, got 0"):
        DropConfig(budget=0)


def test_merge_count_bounds_by_hand():
    # 64: merging r windows leaves V = 576 - 8r; the lowest reachable average is (3V + 29 * ceil(0.08 V)) / 32.
    # r = 24: V = 384, key set 31 -> (1152 + 899) / 32 = 64.09 > 64;  r = 25: V = 376 -> (1128 + 899) / 32 = 63.3
    # at most floor((576 - 64) / 8) = 64 windows (all of them) keep at least 64 tokens
    assert merge_count_bounds(576, 3, 64, MUSTDROP_LAYERS, 32, 0.08) == (25, 64)
    # 192: no merge is needed; at most floor((576 - 192) / 8) = 48 windows keep 192 tokens
    assert merge_count_bounds(576, 3, 192, MUSTDROP_LAYERS, 32, 0.08) == (0, 48)


def test_mustdrop_budgets_on_the_demo_set(loaded_original, demo_images):
    """Every budget is met within one token on average over the 12 demo images (prefill only)."""
    from llava.drop.prefill import build_prompt, prefill_prompt
    from llava.mm_utils import load_image, process_images, tokenizer_image_token
    from tests.conftest import vicuna_prompt

    tokenizer, model, image_processor, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt("What is the word?"), tokenizer, return_tensors="pt")
    pixels = [process_images([load_image(path)], image_processor) for path in demo_images]
    for budget in (192, 128, 64):
        method = MustDrop(DropConfig(budget=budget))
        averages = []
        with torch.no_grad():
            for pixel_values in pixels:
                prompt = build_prompt(model, input_ids, method.encode_image(model, pixel_values))
                counts = prefill_prompt(model, prompt, method).vision_tokens_per_layer
                averages.append(sum(counts) / len(counts))
        assert abs(sum(averages) / len(averages) - budget) <= 1, (budget, averages)
