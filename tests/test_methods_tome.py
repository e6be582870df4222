"""ToMe: the schedule, bipartite soft matching and proportional attention on hand-made tensors, then the
method on the tiny LLaVA-1.5 and LLaVA-NeXT models (one image each)."""

from __future__ import annotations

import pytest
import torch

from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.tome import (
    DEFAULT_R,
    ToMe,
    ToMeOptions,
    bipartite_matches,
    bipartite_merge,
    capped_schedule,
    constant_schedule,
    first_overdrawn_layer,
    groups_of,
    merge_image,
    merging_layer,
    proportional_attention,
    released_order,
    smallest_reachable_count,
)
from llava.drop.vision import embed_patches, encode_image
from llava.mm_utils import load_image, process_images
from tests.conftest import NEXT_DEMO_IMAGES, answer, next_demo_inputs

PATCHES = 576
RUN_LAYERS = 23  # LLaVA-1.5 selects hidden_states[-2] of CLIP-L's 24 layers
SMALLEST_BUDGET = 24  # fewest patch tokens a constant schedule over 23 layers reaches (see the schedule test)

# Seven tokens, A = 0 (CLS), 2, 4, 6 and B = 1, 3, 5, with 2-d keys (cosine similarity):
# CLS matches B1 perfectly but is protected; A2 -> B1 and A4 -> B3 score 1/sqrt(1.01) each (an exact tie,
# ranked by position); A6 is as close to B3 as to B5 (cos 1/sqrt(2) both) and joins the earlier, B3.
KEYS = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [-1.0, 0.0], [-1.0, 1.0]])
TOKENS = torch.tensor([[0.0, 0.0], [1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0], [5.0, 50.0], [6.0, 60.0]])


def pixels(loaded, image_path) -> torch.Tensor:
    _, _, image_processor, _ = loaded
    return process_images([load_image(image_path)], image_processor)


# --- schedule -------------------------------------------------------------------------------------------

def test_budget_64_spreads_512_merges_as_a_constant_r_over_23_layers():
    schedule = constant_schedule(PATCHES - 64, RUN_LAYERS)
    assert schedule == [23] * 6 + [22] * 17
    for merges in (0, 1, 22, 23, 384, 448, 552):
        assert sum(constant_schedule(merges, RUN_LAYERS)) == merges
    assert constant_schedule(0, RUN_LAYERS) == [0] * RUN_LAYERS
    assert first_overdrawn_layer(schedule, PATCHES) is None


def test_r_per_layer_is_capped_at_every_a_token_but_cls():
    assert capped_schedule(DEFAULT_R, RUN_LAYERS, PATCHES) == [DEFAULT_R] * RUN_LAYERS
    # 577 tokens -> at most 288 merge -> 289 tokens -> 144 -> 145 tokens -> 72
    assert capped_schedule(300, 3, PATCHES) == [288, 144, 72]
    assert capped_schedule(0, 2, PATCHES) == [0, 0]


def test_smallest_reachable_count_by_hand():
    # 8 patches, 2 layers: keeping 2 asks [3, 3], but after 3 merges 6 tokens allow only 2; keeping 3 asks [3, 2].
    assert first_overdrawn_layer([3, 3], 8) == 1
    assert first_overdrawn_layer([3, 2], 8) is None
    assert smallest_reachable_count(8, 2) == 3
    assert smallest_reachable_count(8, 1) == 4  # one layer: 9 tokens, at most 4 merge
    assert smallest_reachable_count(PATCHES, RUN_LAYERS) == SMALLEST_BUDGET
    assert first_overdrawn_layer(constant_schedule(PATCHES - SMALLEST_BUDGET + 1, RUN_LAYERS), PATCHES) == 22


# --- bipartite soft matching -------------------------------------------------------------------------

def test_matches_protect_cls_rank_stably_and_tie_to_the_earlier_b_token():
    assert [t.tolist() for t in bipartite_matches(KEYS, 1)] == [[2], [1]]  # A2 and A4 tie: A2 first
    assert [t.tolist() for t in bipartite_matches(KEYS, 2)] == [[2, 4], [1, 3]]
    assert [t.tolist() for t in bipartite_matches(KEYS, 3)] == [[2, 4, 6], [1, 3, 3]]  # A6: B3 over B5


def test_merge_is_the_size_weighted_average():
    sizes = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 1.0])
    merged, new_sizes, destination, kept = bipartite_merge(TOKENS, sizes, KEYS, 3)
    expected = torch.stack([TOKENS[0], (TOKENS[1] + 2 * TOKENS[2]) / 3,
                            (TOKENS[3] + 3 * TOKENS[4] + TOKENS[6]) / 5, TOKENS[5]])
    torch.testing.assert_close(merged, expected)
    assert torch.equal(merged[0], TOKENS[0]) and torch.equal(merged[3], TOKENS[5])  # untouched: exact
    assert new_sizes.tolist() == [1.0, 3.0, 5.0, 1.0]
    assert destination.tolist() == [0, 1, 1, 2, 2, 3, 2]
    assert kept.tolist() == [0, 1, 3, 5]  # every A token but CLS merged: the B tokens follow CLS


def test_merged_tokens_run_on_in_the_released_order():
    """ToMe's `merge` returns the unmerged A tokens, then the B tokens (each ascending): that order makes the
    next layer's sets."""
    assert released_order(7, torch.tensor([2])).tolist() == [0, 4, 6, 1, 3, 5]
    assert released_order(8, torch.tensor([4, 2])).tolist() == [0, 6, 1, 3, 5, 7]
    merged, _, destination, kept = bipartite_merge(TOKENS, torch.ones(7), KEYS, 1)  # A2 -> B1
    assert kept.tolist() == [0, 4, 6, 1, 3, 5]
    expected = torch.stack([TOKENS[0], TOKENS[4], TOKENS[6], TOKENS[1:3].mean(0), TOKENS[3], TOKENS[5]])
    assert torch.equal(merged, expected)
    assert destination.tolist() == [0, 3, 3, 4, 1, 5, 2]


def test_unit_sizes_give_plain_means_and_the_input_dtype():
    merged, new_sizes, _, _ = bipartite_merge(TOKENS.to(torch.bfloat16), torch.ones(7), KEYS, 2)
    assert merged.dtype == torch.bfloat16 and new_sizes.dtype == torch.float32
    expected = torch.stack([TOKENS[0], TOKENS[6], TOKENS[1:3].mean(0), TOKENS[3:5].mean(0), TOKENS[5]])
    assert torch.equal(merged, expected.to(torch.bfloat16))  # A0, A6 unmerged, then B1, B3, B5
    assert new_sizes.tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]


def test_cls_never_merges_even_at_the_cap():
    merged, _, destination, _ = bipartite_merge(TOKENS, torch.ones(7), KEYS, 3)  # 3 = every A token but CLS
    assert torch.equal(merged[0], TOKENS[0]) and destination[0] == 0
    with pytest.raises(ValueError, match="cannot merge 4 of 7 tokens: at most 3"):
        bipartite_merge(TOKENS, torch.ones(7), KEYS, 4)


def test_patch_groups_follow_the_merges():
    owner = torch.arange(1, 7)  # patches 0..5 are tokens 1..6
    _, _, destination, _ = bipartite_merge(TOKENS, torch.ones(7), KEYS, 3)
    assert groups_of(destination[owner], 4) == [[0, 1], [2, 3, 5], [4]]
    assert groups_of(owner, 7) == [[0], [1], [2], [3], [4], [5]]


# --- proportional attention ---------------------------------------------------------------------------

def explicit_attention(attention, normed: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """softmax(QK^T * scale + log(size of key)) V, written out."""
    def split(x: torch.Tensor) -> torch.Tensor:  # [1, t, dim] -> [heads, t, head_dim]
        return x[0].view(x.shape[1], attention.num_heads, attention.head_dim).transpose(0, 1)

    queries, keys, values = (split(p(normed)) for p in (attention.q_proj, attention.k_proj, attention.v_proj))
    weights = (queries @ keys.transpose(1, 2) * attention.scale + sizes.log()).softmax(dim=-1)
    return attention.out_proj((weights @ values).transpose(0, 1).reshape(1, normed.shape[1], -1))


def test_proportional_attention_with_unit_sizes_is_the_layer(loaded_original):
    layer = loaded_original[1].model.vision_tower.encoder.layers[0]
    hidden = torch.randn(1, 9, layer.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = layer(hidden, None)
        assert torch.equal(merging_layer(layer, hidden, None, 0)[0], expected)
        torch.testing.assert_close(merging_layer(layer, hidden, torch.ones(9), 0)[0], expected)


def test_proportional_attention_adds_log_size_of_each_key(loaded_original):
    layer = loaded_original[1].model.vision_tower.encoder.layers[3]
    attention = layer.self_attn
    normed = torch.randn(1, 6, layer.embed_dim, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([1.0, 4.0, 1.0, 2.0, 7.0, 1.0])
    with torch.no_grad():
        output, metric = proportional_attention(attention, normed, sizes)
        torch.testing.assert_close(output, explicit_attention(attention, normed, sizes))
        keys = attention.k_proj(normed[0]).view(6, attention.num_heads, attention.head_dim).mean(dim=1)
        torch.testing.assert_close(metric, keys)


# --- options and registry -----------------------------------------------------------------------------

def test_created_by_name_with_string_options():
    method = create_method("tome", {"budget": "64"})
    assert isinstance(method, ToMe) and method.enabled and method.budget == 64 and method.family == "encoder"
    assert create_method("tome").options == ToMeOptions(r=DEFAULT_R, budget=None)
    assert create_method("tome", {"r": "4"}).options.r == 4


@pytest.mark.parametrize("options, message", [
    ({"r": "-1"}, "r .* must be >= 0, got -1"),
    ({"r": "many"}, "r='many'"),
    ({"budget": "0"}, "got 0"),
    ({"budget": "64.5"}, "got 64.5"),
])
def test_invalid_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        create_method("tome", options)


# --- the tiny models ----------------------------------------------------------------------------------

def test_budget_64_gives_64_tokens_covering_every_patch_once(loaded_original, demo_images):
    output = ToMe(ToMeOptions(budget=64)).encode_image(loaded_original[1], pixels(loaded_original, demo_images[0]))
    assert output.features.shape[0] == 64
    assert output.stats == {"vision_tokens_in": PATCHES, "vision_tokens": 64}
    assert len(output.patch_groups) == 64 and all(group == sorted(group) for group in output.patch_groups)
    assert sorted(patch for group in output.patch_groups for patch in group) == list(range(PATCHES))


def test_default_r_merges_8_per_layer(loaded_original, demo_images):
    output = ToMe().encode_image(loaded_original[1], pixels(loaded_original, demo_images[1]))
    assert output.stats["vision_tokens"] == PATCHES - RUN_LAYERS * DEFAULT_R


def test_tokens_leave_the_tower_in_the_original_order(loaded_original, demo_images):
    """Inside the tower the tokens run in ToMe's order; out of it each token stands at the original position of
    the token it grew from (the one its merges ended in), CLS first."""
    model, schedule = loaded_original[1], [100, 60, 30]
    layers = model.model.vision_tower.encoder.layers[: len(schedule)]
    with torch.no_grad():
        hidden = embed_patches(model.model.vision_tower, pixels(loaded_original, demo_images[0]))
        reduced = merge_image(layers, hidden, schedule)
        origins, sizes = torch.arange(1 + PATCHES), None
        for layer, r in zip(layers, schedule):
            hidden, sizes, _, kept = merging_layer(layer, hidden, sizes, r)
            origins = origins[kept]
    assert origins[0] == 0 and not torch.equal(origins, origins.sort().values)  # ToMe's order inside
    assert torch.equal(reduced.hidden, hidden[0, origins.argsort()])
    assert all(int(origin) - 1 in group for origin, group in zip(origins.sort().values[1:], reduced.patch_groups))


def test_merging_nothing_is_the_unpruned_model(loaded_original, demo_images):
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[2])
    unpruned = encode_image(model, pixel_values).features
    for options in (ToMeOptions(budget=PATCHES), ToMeOptions(r=0)):
        assert torch.equal(ToMe(options).encode_image(model, pixel_values).features, unpruned)
    everything = ToMe(ToMeOptions(budget=PATCHES))
    assert answer(loaded_original, demo_images[2], everything).token_ids == \
        answer(loaded_original, demo_images[2], DropMethod()).token_ids


def test_an_unreachable_budget_names_the_smallest_reachable_one(loaded_original, demo_images):
    method = ToMe(ToMeOptions(budget=SMALLEST_BUDGET - 1))
    with pytest.raises(ValueError, match=f"layer 22 .* the smallest reachable budget is {SMALLEST_BUDGET}$"):
        method.encode_image(loaded_original[1], pixels(loaded_original, demo_images[0]))


class RecordingToMe(ToMe):
    """ToMe keeping its last reductions, so that one pass shows each tower image's share."""

    def reduce(self, model, images, counts, selecting):
        self.reduced = super().reduce(model, images, counts, selecting)
        return self.reduced


def test_next_budget_is_shared_over_base_image_and_crops(loaded_next_original):
    inputs = next_demo_inputs(loaded_next_original, NEXT_DEMO_IMAGES["wide"])
    method = RecordingToMe(ToMeOptions(budget=160))
    output = method.encode_next(loaded_next_original[1], inputs.pixel_values, inputs.image_sizes)
    assert output.features.shape[0] == output.stats["vision_tokens"] == 160
    assert (output.stats["images"], output.stats["crops"]) == (3, 2)
    assert [image.hidden.shape[0] - 1 for image in method.reduced] == [54, 53, 53]  # CLS first
    assert [len(image.patch_groups) for image in method.reduced] == [54, 53, 53]
