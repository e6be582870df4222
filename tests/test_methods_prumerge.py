"""PruMerge / PruMerge+: the IQR count, the uniform samples and the merge on hand-made tensors, then both
methods on the tiny LLaVA-1.5 model (counts checked against the tower's own hidden states) and once on
LLaVA-NeXT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llava.drop.method import ENCODER
from llava.drop.methods import create_method
from llava.drop.methods.prumerge import (
    NEIGHBOURS,
    PruMerge,
    PruMergeOptions,
    PruMergePlus,
    PruMergePlusOptions,
    merge_groups,
    merge_tokens,
    outlier_count,
    sample_stride,
    similar_neighbours,
    uniform_samples,
)
from llava.drop.timing import Stopwatch
from llava.drop.vision import encode_image
from llava.mm_utils import load_image, process_images
from tests.conftest import NEXT_DEMO_IMAGES, next_demo_inputs

PATCHES = 576
SELECT = -2  # LLaVA's vision_feature_layer: hidden_states[-2], the output of layer 22 of 24
SCORING_LAYER = 23  # the layer after it, whose query / key the released code hooks
IMAGE = 2  # a demo image with a moderate outlier count on the tiny tower


# --- hand-made tensors -------------------------------------------------------------------------------

def test_outlier_count_by_hand_and_by_numpy():
    scores = torch.tensor([3.0, 1.0, 50.0, 2.0, 4.0, 5.0, 100.0, 6.0, 7.0, 8.0])
    # sorted: 1 2 3 4 5 6 7 8 50 100; Q1 at rank 2.25 -> 3.25, Q3 at rank 6.75 -> 7.75, IQR 4.5,
    # fence 7.75 + 1.5 * 4.5 = 14.5: 50 and 100 lie above it.
    q1, q3 = np.percentile(scores.numpy(), 25), np.percentile(scores.numpy(), 75)
    assert (q1, q3) == (3.25, 7.75)
    assert outlier_count(scores) == 2 == int((scores.numpy() > q3 + 1.5 * (q3 - q1)).sum())
    # Q1 1.25, Q3 3.75, fence exactly 7.5: a score on the fence is not an outlier (strictly above).
    assert outlier_count(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 7.5])) == 0
    assert outlier_count(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 7.5 + 2**-10])) == 1
    assert outlier_count(torch.full((8,), 0.125)) == 0


@pytest.mark.parametrize("outliers, stride", [(32, 6), (3, 64), (64, 3), (108, 1), (0, PATCHES), (200, 1)])
def test_sample_stride_is_a_third_of_one_over_the_ratio(outliers, stride):
    # 32 of 576: step 18, stride 6; 3: step 192, stride 64; 64: step 9, stride 3; 108: step 5, stride 1;
    # none: past the grid; 200: step 2, int(2 / 3) = 0, clamped to 1.
    assert sample_stride(outliers, PATCHES) == stride


def test_uniform_samples_skip_kept_patches_and_the_last_one():
    kept = torch.tensor([6, 7, 570])
    samples = uniform_samples(kept, PATCHES, 32)
    assert samples.tolist() == [p for p in range(0, 575, 6) if p not in (6, 570)]
    assert uniform_samples(torch.tensor([4]), 12, 1).tolist() == [0, 8]  # step 12, stride 4: 0, 4, 8
    assert uniform_samples(torch.tensor([40]), PATCHES, 3).tolist() == list(range(0, 575, 64))
    assert uniform_samples(torch.tensor([], dtype=torch.long), PATCHES, 0).tolist() == [0]  # no outliers
    every = uniform_samples(torch.arange(200), PATCHES, 200)  # zero stride clamped to 1
    assert every.tolist() == list(range(200, 575))  # 575 = N - 1 is never sampled


# Five patches in 2-d. Patch 2's key has the largest dot product with patch 0's key but a smaller cosine
# than patch 1's; patch 4's most similar keys are kept patch 0 and pruned patch 1.
FEATURES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
KEYS = torch.tensor([[1.0, 0.0], [1.0, 0.1], [10.0, 5.0], [-1.0, 0.0], [0.8, -0.6]])
CLS_ATTN = torch.tensor([0.5, 0.125, 0.25, 0.0625, 0.0625])


def test_merge_adds_the_unnormalised_attention_weighted_neighbours():
    kept = torch.tensor([0, 4])
    neighbours = similar_neighbours(KEYS, kept, 2)
    assert neighbours.tolist() == [[1, 2], [0, 1]]
    tokens = merge_tokens(FEATURES, CLS_ATTN, kept, neighbours)
    expected = torch.tensor([
        [1.0 + 0.25 * 2.0, 0.125],  # X0 + 0.125 X1 + 0.25 X2 (weights sum to 0.375, not divided out)
        [1.0 + 0.5, 1.0 + 0.125],  # X4 + 0.5 X0 (patch 0's original features) + 0.125 X1
        [0.25 * 2.0, 0.125 + 0.0625 * 2.0],  # extra: 0.125 X1 + 0.25 X2 + 0.0625 X3, the pruned patches
    ])
    torch.testing.assert_close(tokens, expected, rtol=0, atol=1e-7)
    assert merge_groups(kept, neighbours, 5) == [[0, 1, 2], [0, 1, 4], [1, 2, 3]]


def test_neighbours_are_capped_at_the_other_patches_and_ties_follow_the_released_order():
    kept = torch.tensor([0])
    neighbours = similar_neighbours(KEYS[:3], kept, NEIGHBOURS)
    assert neighbours.tolist() == [[1, 2]]
    tokens = merge_tokens(FEATURES[:3], CLS_ATTN[:3], kept, neighbours)
    torch.testing.assert_close(tokens, torch.tensor([[1.5, 0.125], [0.5, 0.125]]), rtol=0, atol=1e-7)
    # All keys equal: candidates are the other kept patches (kept order), then the pruned ones ascending.
    assert similar_neighbours(torch.ones(4, 3), torch.tensor([3, 1]), 2).tolist() == [[1, 0], [3, 0]]


def test_no_neighbours_keeps_features_and_no_kept_patch_leaves_only_the_extra_token():
    kept = torch.tensor([2, 0])
    tokens = merge_tokens(FEATURES, CLS_ATTN, kept, similar_neighbours(KEYS, kept, 0))
    assert torch.equal(tokens[:2], FEATURES[[2, 0]])
    torch.testing.assert_close(tokens[2], CLS_ATTN[[1, 3, 4]] @ FEATURES[[1, 3, 4]])
    nothing = torch.tensor([], dtype=torch.long)
    alone = merge_tokens(FEATURES, CLS_ATTN, nothing, similar_neighbours(KEYS, nothing, 2))
    torch.testing.assert_close(alone, (CLS_ATTN @ FEATURES)[None])


# --- options and the registry ------------------------------------------------------------------------

def test_created_by_name_and_budget_rules():
    method = create_method("prumerge", {"budget": "64"})
    assert isinstance(method, PruMerge) and method.family == ENCODER and method.supports_next
    assert method.options == PruMergeOptions(budget=64.0)
    plus = create_method("prumerge_plus", {"neighbours": "8"})
    assert isinstance(plus, PruMergePlus) and plus.options == PruMergePlusOptions(neighbours=8)
    with pytest.raises(ValueError, match="prumerge_plus picks its own token count per image .* run it without "
                                         "--budget, or use prumerge with a budget"):
        create_method("prumerge_plus", {"budget": "64"})


@pytest.mark.parametrize("options, message", [
    ({"budget": 0}, "got 0"), ({"budget": 64.5}, "got 64.5"), ({"neighbours": -1}, "neighbours must be >= 0, got -1"),
])
def test_invalid_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        PruMergeOptions(**options)


# --- the tiny LLaVA-1.5 model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tower_view(loaded_original, demo_images):
    """(pixel values, select-layer states [577, dim], CLS attention [576]) of one demo image, computed
    as the released code does: the full tower, then the scoring layer's full-width query and keys."""
    _, model, image_processor, _ = loaded_original
    pixel_values = process_images([load_image(demo_images[IMAGE])], image_processor)
    tower = model.model.vision_tower
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[SELECT][0]
        layer = tower.encoder.layers[SCORING_LAYER]
        normed = layer.layer_norm1(hidden)
        query, keys = layer.self_attn.q_proj(normed), layer.self_attn.k_proj(normed)
        attention = torch.softmax(query @ keys.T * hidden.shape[-1] ** -0.5, dim=-1)
    return pixel_values, hidden, attention[0, 1:]


def test_default_keeps_the_iqr_outliers_plus_one_token(loaded_original, tower_view):
    pixel_values, _, cls_attn = tower_view
    scores = cls_attn.numpy()
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    outliers = int((scores > q3 + 1.5 * (q3 - q1)).sum())
    assert 0 < outliers < 100
    output = PruMerge().encode_image(loaded_original[1], pixel_values)
    assert output.features.shape[0] == outliers + 1
    assert output.stats == {"vision_tokens_in": PATCHES, "vision_tokens": outliers + 1}
    assert all(len(group) == NEIGHBOURS + 1 for group in output.patch_groups[:-1])
    assert set(output.patch_groups[-1]) == set(range(PATCHES)) - set(cls_attn.topk(outliers).indices.tolist())


def test_plus_adds_the_uniform_samples(loaded_original, tower_view):
    pixel_values, _, cls_attn = tower_view
    model = loaded_original[1]
    scores = cls_attn.numpy()
    q1, q3 = np.percentile(scores, 25), np.percentile(scores, 75)
    outliers = int((scores > q3 + 1.5 * (q3 - q1)).sum())
    top = set(cls_attn.topk(outliers).indices.tolist())
    stride = int(int(1 / (outliers / PATCHES)) / 3)
    samples = [position for position in range(0, 575, stride) if position not in top]
    plus = PruMergePlus().encode_image(model, pixel_values)
    assert plus.features.shape[0] == outliers + len(samples) + 1
    assert plus.features.shape[0] > PruMerge().encode_image(model, pixel_values).features.shape[0]
    assert all(sample in group for sample, group in zip(samples, plus.patch_groups[outliers:-1], strict=True))
    assert plus.stats["vision_tokens_in"] == PATCHES


def test_budget_fixes_the_count(loaded_original, tower_view):
    pixel_values, hidden, cls_attn = tower_view
    model = loaded_original[1]
    output = create_method("prumerge", {"budget": "64"}).encode_image(model, pixel_values)
    assert output.features.shape[0] == 64 and output.stats["vision_tokens"] == 64
    assert len(output.patch_groups) == 64
    # Budget 1: no patch kept whole, only the attention-weighted sum of all of them.
    (one,) = create_method("prumerge", {"budget": "1"}).reduce(model, pixel_values, [1], Stopwatch(pixel_values.device))
    torch.testing.assert_close(one.hidden, torch.stack([hidden[0], cls_attn @ hidden[1:]]), rtol=1e-5, atol=1e-6)


def test_keeping_the_most_patches_leaves_them_unchanged(loaded_original, tower_view):
    """No setting keeps the unpruned features: the extra token is always added and merging is the method.
    With no neighbours and budget 576 the top 575 patches pass unchanged, best first, and the extra token
    is the last patch times its attention."""
    pixel_values, hidden, cls_attn = tower_view
    model = loaded_original[1]
    output = PruMerge(PruMergeOptions(budget=PATCHES, neighbours=0)).encode_image(model, pixel_values)
    order = [group[0] for group in output.patch_groups[:-1]]
    assert all(len(group) == 1 for group in output.patch_groups[:-1])
    (left,) = set(range(PATCHES)) - set(order)
    assert output.patch_groups[-1] == [left]
    assert torch.equal(output.features[:-1], encode_image(model, pixel_values).features[order])
    assert (cls_attn[order].diff() <= 1e-7).all() and cls_attn[left] <= cls_attn[order].min() + 1e-7
    with torch.no_grad():
        extra = model.model.multi_modal_projector(cls_attn[left] * hidden[1 + left])
    torch.testing.assert_close(output.features[-1], extra, rtol=1e-5, atol=1e-6)


def test_refuses_a_select_layer_with_no_layer_after_it(loaded_original, tower_view, monkeypatch):
    model = loaded_original[1]
    monkeypatch.setattr(model.config, "vision_feature_layer", -1)
    with pytest.raises(ValueError, match="tower layer after the select layer"):
        PruMerge().encode_image(model, tower_view[0])


# --- LLaVA-NeXT --------------------------------------------------------------------------------------

def test_next_budget_is_shared_over_the_base_image_and_crops(loaded_next_original):
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["wide"])
    output = create_method("prumerge", {"budget": "160"}).encode_next(loaded_next_original[1], inputs.pixel_values,
                                                                      inputs.image_sizes)
    assert output.features.shape[0] == output.stats["vision_tokens"] == 160
    assert output.stats["images"] == 3
