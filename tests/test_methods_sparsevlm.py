"""SparseVLM as released: raters from the input embeddings, scores, counts, DPC-KNN recycling and its seeded noise on
hand-built inputs; the engine end to end. (The golden fixtures compare it with the released code itself:
tests/test_golden_released.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llava.drop.blocks import layer_average, stage_lengths
from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.sparsevlm import (
    RELEASED_SCHEDULES,
    SparseVLM,
    SparseVLMOptions,
    budget_keep_counts,
    cluster_count,
    density_noise,
    dpc_knn,
    merge_clusters,
    recycled_count,
    stage_counts,
    text_raters,
)
from llava.drop.probe import TokenLayout
from llava.model.geometry import ModelGeometry
from tests.conftest import answer

# 4 text rows x 6 vision tokens. The raters are rows 0 and 2 (EMBEDDINGS), whose mean scores are
# [0.075, 0.11, 0.16, 0.075, 0.02, 0.11] (rank 2).
ATTENTION = torch.tensor([
    [0.10, 0.02, 0.30, 0.05, 0.01, 0.02],
    [0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
    [0.05, 0.20, 0.02, 0.10, 0.03, 0.20],
    [0.02, 0.02, 0.02, 0.02, 0.02, 0.02],
])
# Every vision embedding is [1, 0]; text rows 0 and 2 have dot product 3 with it, rows 1 and 3 none: relevance
# e^3 / (2 e^3 + 2) = 0.476 for rows 0 and 2, 0.024 for rows 1 and 3, mean 0.25.
EMBEDDINGS = (torch.tensor([[1.0, 0.0]] * 6), torch.tensor([[3.0, 0.0], [0.0, 0.0], [3.0, 0.0], [0.0, 0.0]]))
HIDDEN = torch.tensor([
    [1.0, 0.0, 0.0],  # 0: dropped
    [5.0, 5.0, 5.0],  # 1: kept
    [7.0, 7.0, 7.0],  # 2: kept
    [3.0, 0.9, 0.0],  # 3: dropped
    [0.0, 0.0, 9.0],  # 4: dropped, lowest score
    [0.0, 1.0, 0.0],  # 5: dropped
])
SYSTEM_TOKENS = 2


def fake_context(layer_idx: int = 2, attention: torch.Tensor = ATTENTION, hidden: torch.Tensor = HIDDEN):
    """Just what SparseVLM reads from a PromptContext."""
    vision = attention.shape[1]
    layout = TokenLayout(SYSTEM_TOKENS, vision, SYSTEM_TOKENS + vision + attention.shape[0])
    return SimpleNamespace(layer_idx=layer_idx, layout=layout, prompt_vision_count=vision,
                           attention=lambda queries="text": attention, vision_hidden=hidden,
                           layer_output=hidden, prompt_embeddings=lambda: EMBEDDINGS,
                           geometry=ModelGeometry(32, vision, vision, 2048), memo=lambda key, make: make())


def sparsevlm(**options) -> SparseVLM:
    return SparseVLM(SparseVLMOptions(drop_after=(2,), **options))


def test_raters_are_the_text_tokens_above_the_mean_relevance_to_the_image_embeddings():
    assert text_raters(*EMBEDDINGS).tolist() == [0, 2]


def test_without_a_rater_above_the_mean_every_text_token_rates():
    assert text_raters(torch.ones(3, 2), torch.ones(4, 2)).tolist() == [0, 1, 2, 3]


def test_kept_set_is_the_best_scored_in_order_with_ties_to_the_earlier_token():
    assert sparsevlm(keep=(3,)).select_prompt(fake_context()).tolist() == [1, 2, 5]
    assert sparsevlm(keep=(2,)).select_prompt(fake_context()).tolist() == [1, 2]  # 1 beats 5


def test_a_schedule_at_or_above_the_vision_count_keeps_everything_and_recycles_nothing():
    method = sparsevlm(keep=(6,))
    context = fake_context()
    kept = method.select_prompt(context)
    assert kept.tolist() == list(range(6))
    assert method.recycle(context, kept) is None


@pytest.mark.parametrize(("rank_scale", "kept"), [
    (1.0, [1, 2]),  # drop floor(1 * (6 - 2)) = 4: keep max(1, 2) = 2
    (0.5, [0, 1, 2, 5]),  # drop floor(0.5 * 4) = 2: keep 4
    (None, [2]),  # the schedule alone, as released
])
def test_rank_of_the_rater_attention_bounds_the_drop_count(rank_scale, kept):
    assert sparsevlm(keep=(1,), rank_scale=rank_scale).select_prompt(fake_context()).tolist() == kept


@pytest.mark.parametrize(("dropped", "ratio", "recycled"), [(510, 0.3, 154), (52, 0.3, 16), (10, 0.3, 4), (1, 0.3, 1),
                                                            (4, 1.0, 4), (5, 0.0, 0), (0, 0.3, 0)])
def test_recycled_count_is_the_released_int_plus_one_within_the_dropped(dropped, ratio, recycled):
    assert recycled_count(dropped, ratio) == recycled


@pytest.mark.parametrize(("recycled", "size", "clusters"), [(154, 10, 16), (16, 10, 2), (10, 10, 2), (5, 10, 1),
                                                            (3, 1, 3)])
def test_cluster_count_is_the_released_int_plus_one_at_most_one_per_token(recycled, size, clusters):
    assert cluster_count(recycled, size) == clusters


def test_dpc_knn_centres_each_of_two_far_groups_and_merges_each_as_released():
    """Within each tight group the densest token has the largest distance to a denser one (across the gap, or the
    largest distance of all): the two centres, one per group; a cluster is sum(members) / (count + 1e-6)."""
    tokens = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [9.0, 9.0], [9.1, 9.0], [9.2, 9.0], [9.3, 9.0]])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    centres, assignment = dpc_knn(tokens, 2, torch.rand(7, generator=torch.Generator().manual_seed(0)))
    assert sorted(groups[centres].tolist()) == [0, 1]
    assert torch.equal(assignment, (groups != groups[centres[0]]).long())  # each token joins its group's centre
    merged = merge_clusters(tokens, assignment, 2)
    for cluster in range(2):
        members = tokens[assignment == cluster]
        assert torch.allclose(merged[cluster], members.sum(dim=0) / (members.shape[0] + 1e-6), rtol=1e-6, atol=0)


def released_cluster_and_merge(x: torch.Tensor, cluster_num: int, noise: torch.Tensor) -> torch.Tensor:
    """`cluster_and_merge` of github.com/Gumpest/SparseVLMs (26a5f48, `llava/model/language_model/utils.py`) for
    one prompt, transcribed with its `torch.rand` draw given as `noise` and `index_points` inlined."""
    B, N, C = x.shape
    distance = (x[:, :, None] - x[:, None]).norm(dim=-1, p=2)
    dist_matrix = distance / (C ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=cluster_num, dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    density = density + noise[None] * 1e-6
    mask = density[:, None, :] > density[:, :, None]
    mask = mask.type(x.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
    score = dist * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    dist_matrix = dist_matrix[torch.zeros_like(index_down), index_down]
    idx_cluster = dist_matrix.argmin(dim=1)
    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    token_weight = x.new_ones(B, N, 1)
    idx = idx_cluster + torch.arange(B)[:, None] * cluster_num
    all_weight = token_weight.new_zeros(B * cluster_num, 1)
    all_weight.index_add_(dim=0, index=idx.reshape(B * N), source=token_weight.reshape(B * N, 1))
    all_weight = all_weight + 1e-6
    norm_weight = token_weight / all_weight[idx]
    x_merged = x.new_zeros(B * cluster_num, C)
    x_merged.index_add_(dim=0, index=idx.reshape(B * N), source=(x * norm_weight).reshape(B * N, C))
    return x_merged.reshape(B, cluster_num, C)[0]


@pytest.mark.parametrize(("count", "width", "clusters"), [(154, 64, 16), (33, 64, 4), (5, 64, 1), (61, 256, 7)])
def test_dpc_knn_merges_equal_the_released_function(count, width, clusters):
    generator = torch.Generator().manual_seed(count)
    tokens = torch.randn(count, width, generator=generator) * 3
    tokens[1] = tokens[0]  # a duplicate: a density tie that only the noise breaks
    noise = torch.rand(count, generator=generator)
    _, assignment = dpc_knn(tokens, clusters, noise)
    assert torch.equal(merge_clusters(tokens, assignment, clusters),
                       released_cluster_and_merge(tokens[None], clusters, noise))


def test_noise_draws_replay_one_seeded_stream_in_the_released_order():
    """Drop s draws after the [1, recycled] blocks of the drops before it, as the released code's torch.rand does
    from a generator seeded before the question."""
    options = SparseVLMOptions()
    torch.manual_seed(5)
    released = [torch.rand(1, count)[0] for count in (154, 16, 5)]  # the 64 schedule's recycled counts on 576
    for stage, draws in enumerate(released):
        assert torch.equal(density_noise(5, 576, options.keep, stage, draws.numel(), options), draws)


def test_recycled_tokens_are_dpc_knn_merges_of_the_best_dropped():
    method = sparsevlm(keep=(2,), recycled_share=0.5, cluster_size=2)
    context = fake_context()
    kept = method.select_prompt(context)
    # dropped 0, 3, 4, 5 (scores 0.075, 0.075, 0.02, 0.11): int(0.5 * 4) + 1 = 3 recycled, best first: 5, 0, 3;
    # int(3 / 2) + 1 = 2 clusters
    merged = method.recycle(context, kept)
    recycled = HIDDEN[[5, 0, 3]]
    centres, assignment = dpc_knn(recycled, 2, density_noise(0, 6, (2,), 0, 3, method.options))
    assert torch.equal(merged, merge_clusters(recycled, assignment, 2))
    assert merged.shape == (2, 3)


@pytest.mark.parametrize("options", [{"keep": (6,)}, {"keep": (2,), "recycled_share": 0.0}])
def test_nothing_is_recycled_when_nothing_is_dropped_or_the_recycled_share_is_zero(options):
    method = sparsevlm(**options)
    context = fake_context()
    assert method.recycle(context, method.select_prompt(context)) is None


@pytest.mark.parametrize(("retained", "counts"), [(192, [576, 309, 204, 113]), (128, [576, 312, 117, 39]),
                                                  (96, [576, 249, 55, 27]), (64, [576, 82, 32, 18])])
def test_stage_counts_of_the_released_schedules(retained, counts):
    """The vision tokens after each drop, merged tokens included, as the released runs count them."""
    assert stage_counts(576, list(RELEASED_SCHEDULES[retained]), SparseVLMOptions()) == counts


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
    method = create_method("sparsevlm", {"keep": "300 200 110", "rank_scale": "1", "seed": "3", "budget": "none"})
    assert method.options == SparseVLMOptions(keep=(300, 200, 110), rank_scale=1.0, seed=3)
    assert method.prefill_layers(ModelGeometry(32, 576, 576, 2048)) == (2, 6, 15)
    assert SparseVLMOptions().keep == RELEASED_SCHEDULES[64] and SparseVLMOptions().rank_scale is None


def test_keeping_everything_equals_the_unpruned_model(loaded_original, demo_images):
    everything = SparseVLM(SparseVLMOptions(keep=(576, 576, 576)))
    for image_path in demo_images[:2]:
        sparse = answer(loaded_original, image_path, everything)
        assert sparse.token_ids == answer(loaded_original, image_path, DropMethod()).token_ids
        assert sparse.stats["avg_vision_tokens"] == 576


def test_recycled_tokens_join_the_sequence_and_decoding_runs(loaded_original, demo_images):
    result = answer(loaded_original, demo_images[0], SparseVLM())
    assert result.stats["vision_tokens_after_layer"] == {"2": 82, "6": 32, "15": 18}
    lengths = result.stats["kv_cache_lengths"]
    text_and_system = result.stats["prompt_tokens"] - 576
    assert [lengths[2], lengths[3], lengths[7], lengths[16]] == [text_and_system + n for n in (576, 82, 32, 18)]
    assert len(result.token_ids) == 10 or result.token_ids[-1] == loaded_original[0].eos_token_id
    assert result.stats["new_tokens"] == len(result.token_ids)


def test_a_run_repeats_its_noise_and_answer(loaded_original, demo_images):
    first = answer(loaded_original, demo_images[0], SparseVLM())
    assert answer(loaded_original, demo_images[0], SparseVLM()).token_ids == first.token_ids


def test_budget_mode_hits_the_budget_over_the_demo_images(loaded_original, demo_images):
    budget = 128.0
    method = SparseVLM(SparseVLMOptions(budget=budget))
    averages = [answer(loaded_original, path, method).stats["avg_vision_tokens"] for path in demo_images]
    assert abs(sum(averages) / len(averages) - budget) <= 1.0


def test_selection_and_recycling_read_one_attention_probe_per_dropping_layer(loaded_original, monkeypatch):
    """The kept set and the recycled tokens come from the same scores: the probe runs once per prompt at each of
    the three drops, not once for the selection and again for the recycling."""
    import llava.drop.method as method_module
    from tests.conftest import DEMO_IMAGE_FOLDER

    probes = []
    real_probe = method_module.vision_attention
    monkeypatch.setattr(method_module, "vision_attention", lambda *a, **k: probes.append(a[1]) or real_probe(*a, **k))
    method = create_method("sparsevlm")
    answer(loaded_original, next(DEMO_IMAGE_FOLDER.glob("*.png")), method)
    assert probes == list(method.options.drop_after)
