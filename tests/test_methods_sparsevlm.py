"""SparseVLM: raters, scores, rank floor and recycling on hand-built attention; the engine end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llava.drop.blocks import layer_average, stage_lengths
from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.sparsevlm import (
    SparseVLM,
    SparseVLMOptions,
    budget_keep_counts,
    stage_counts,
    text_raters,
    vision_scores,
)
from llava.drop.probe import TokenLayout
from llava.model.geometry import ModelGeometry
from tests.conftest import answer

# 4 text rows x 6 vision tokens. Relevance (row means) = [0.5/6, 0.01, 0.1, 0.02], mean 0.0533:
# raters are rows 0 and 2; their mean scores are [0.075, 0.11, 0.16, 0.075, 0.02, 0.11] (rank 2).
ATTENTION = torch.tensor([
    [0.10, 0.02, 0.30, 0.05, 0.01, 0.02],
    [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
    [0.05, 0.20, 0.02, 0.10, 0.03, 0.20],
    [0.02, 0.02, 0.02, 0.02, 0.02, 0.02],
])
SCORES = torch.tensor([0.075, 0.11, 0.16, 0.075, 0.02, 0.11])
HIDDEN = torch.tensor([
    [1.0, 0.0, 0.0],  # 0: recycled, centre of cluster 0
    [5.0, 5.0, 5.0],  # 1: kept
    [7.0, 7.0, 7.0],  # 2: kept
    [3.0, 0.9, 0.0],  # 3: recycled, closest (cosine) to token 0
    [0.0, 0.0, 9.0],  # 4: dropped, lowest score, not recycled
    [0.0, 1.0, 0.0],  # 5: recycled, centre of cluster 1
])
SYSTEM_TOKENS = 2


def fake_context(layer_idx: int = 2, attention: torch.Tensor = ATTENTION, hidden: torch.Tensor = HIDDEN):
    """Just what SparseVLM reads from a LayerContext."""
    vision = attention.shape[1]
    layout = TokenLayout(SYSTEM_TOKENS, vision, SYSTEM_TOKENS + vision + attention.shape[0])
    return SimpleNamespace(layer_idx=layer_idx, layout=layout, prompt_vision_count=vision,
                           attention=lambda queries="text": attention, vision_hidden=hidden)


def sparsevlm(**options) -> SparseVLM:
    return SparseVLM(SparseVLMOptions(drop_after=(2,), **options))


def test_raters_are_rows_at_or_above_the_mean_relevance():
    assert text_raters(ATTENTION).tolist() == [0, 2]
    assert torch.allclose(vision_scores(ATTENTION), SCORES)


def test_equal_rows_are_all_raters():
    assert text_raters(torch.full((3, 7), 1 / 9)).tolist() == [0, 1, 2]


def test_kept_set_is_the_best_scored_in_order_with_ties_to_the_earlier_token():
    assert sparsevlm(keep=(3,), rank_scale=None).select_prompt(fake_context()).tolist() == [1, 2, 5]
    assert sparsevlm(keep=(2,), rank_scale=None).select_prompt(fake_context()).tolist() == [1, 2]  # 1 beats 5


@pytest.mark.parametrize(("rank_scale", "kept"), [
    (1.0, [1, 2]),  # drop floor(1 * (6 - 2)) = 4: keep max(1, 2) = 2
    (0.5, [0, 1, 2, 5]),  # drop floor(0.5 * 4) = 2: keep 4
    (None, [2]),  # the schedule alone
])
def test_rank_of_the_rater_attention_bounds_the_drop_count(rank_scale, kept):
    assert sparsevlm(keep=(1,), rank_scale=rank_scale).select_prompt(fake_context()).tolist() == kept


def test_recycled_tokens_are_cluster_means_of_the_best_dropped():
    method = sparsevlm(keep=(2,), rank_scale=None, recycled_share=0.75, cluster_size=2)
    context = fake_context()
    kept = method.select_prompt(context)
    # dropped 0, 3, 4, 5; ceil(0.75 * 4) = 3 recycled: 5, 0, 3 (4 scores lowest); ceil(3 / 2) = 2 centres,
    # the best-scored 5 and 0 (0 beats 3 on the tie); 3 joins 0, whose direction it shares.
    merged = method.recycle(context, kept)
    expected = torch.stack([(HIDDEN[0] + HIDDEN[3]) / 2, HIDDEN[5]])
    assert torch.allclose(merged, expected)


def test_one_cluster_averages_every_recycled_token():
    method = sparsevlm(keep=(2,), rank_scale=None, recycled_share=0.75)
    context = fake_context()
    merged = method.recycle(context, method.select_prompt(context))
    assert torch.allclose(merged, ((HIDDEN[0] + HIDDEN[3] + HIDDEN[5]) / 3)[None])


@pytest.mark.parametrize("options", [{"keep": (6,)}, {"keep": (2,), "recycled_share": 0.0}])
def test_nothing_is_recycled_when_nothing_is_dropped_or_the_recycled_share_is_zero(options):
    method = sparsevlm(rank_scale=None, **options)
    context = fake_context()
    assert method.recycle(context, method.select_prompt(context)) is None


def test_stage_counts_add_one_merged_token_per_cluster():
    # 576 -> keep 66, recycle ceil(0.3 * 510) = 153 in 16 clusters -> 82 -> 30 + 2 -> 17 + 1
    assert stage_counts(576, [66, 30, 17], SparseVLMOptions()) == [576, 82, 32, 18]


@pytest.mark.parametrize("budget", [192, 128, 64, 100.5])
def test_budget_plan_hits_the_layer_average(budget):
    options = SparseVLMOptions(budget=budget)
    keeps = budget_keep_counts(576, 32, options)
    average = layer_average(stage_counts(576, list(keeps), options), stage_lengths(options.drop_after, 32))
    assert abs(average - budget) <= 0.5


def test_budget_above_the_vision_count_keeps_everything():
    options = SparseVLMOptions(budget=600)
    assert stage_counts(576, list(budget_keep_counts(576, 32, options)), options) == [576] * 4


@pytest.mark.parametrize("options", [
    {"drop_after": ()},
    {"drop_after": (6, 2), "keep": (1, 1)},
    {"drop_after": (2, 2), "keep": (1, 1)},
    {"drop_after": (-1,), "keep": (1,)},
    {"keep": (66, 30)},
    {"keep": (66, -1, 17)},
    {"recycled_share": 1.5},
    {"recycled_share": -0.1},
    {"cluster_size": 0},
    {"rank_scale": 0.0},
    {"budget": -1.0},
    {"keep": (0, 0, 0), "budget": 64.0},
])
def test_invalid_options_are_refused(options):
    with pytest.raises(ValueError):
        SparseVLMOptions(**options)


def test_registered_with_command_line_options():
    method = create_method("sparsevlm", {"keep": "300 200 110", "rank_scale": "none", "budget": "none"})
    assert method.options == SparseVLMOptions(keep=(300, 200, 110), rank_scale=None)
    assert method.prefill_layers(ModelGeometry(32, 576, 576, 2048)) == (2, 6, 15)


def test_keeping_everything_equals_the_unpruned_model(loaded_original, demo_images):
    everything = SparseVLM(SparseVLMOptions(keep=(576, 576, 576)))
    for image_path in demo_images[:2]:
        sparse = answer(loaded_original, image_path, everything)
        assert sparse.token_ids == answer(loaded_original, image_path, DropMethod()).token_ids
        assert sparse.stats["avg_vision_tokens"] == 576


def test_recycled_tokens_join_the_sequence_and_decoding_runs(loaded_original, demo_images):
    result = answer(loaded_original, demo_images[0], SparseVLM(SparseVLMOptions(rank_scale=None)))
    assert result.stats["vision_tokens_after_layer"] == {"2": 82, "6": 32, "15": 18}
    lengths = result.stats["kv_cache_lengths"]
    text_and_system = result.stats["prompt_tokens"] - 576
    assert [lengths[2], lengths[3], lengths[7], lengths[16]] == [text_and_system + n for n in (576, 82, 32, 18)]
    assert len(result.token_ids) == 10 or result.token_ids[-1] == loaded_original[0].eos_token_id
    assert result.stats["new_tokens"] == len(result.token_ids)


def test_budget_mode_hits_the_budget_over_the_demo_images(loaded_original, demo_images):
    budget = 128.0
    method = SparseVLM(SparseVLMOptions(budget=budget))
    averages = [answer(loaded_original, path, method).stats["avg_vision_tokens"] for path in demo_images]
    assert abs(sum(averages) / len(averages) - budget) <= 1.0
