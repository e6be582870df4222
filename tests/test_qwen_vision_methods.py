"""The vision-stage ports to Qwen2.5-VL / Qwen2-VL: random, pool and VisionZip (LightCompress's rule) keep their
counts, give every token a position of its own (random: its unpruned one; pool: its window's middle token;
VisionZip: its own, a contextual token its target's), leave the text after the image where it was, and batch as
they run alone. The methods without a Qwen port are still refused, with the reason."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F

from llava.drop.blocks import fraction_budget
from llava.drop.generate import GenerationRequest, SamplingConfig, encode_visions, generate_batch
from llava.drop.methods import create_method
from llava.drop.methods.pool import Pool, PoolOptions, nearest_grid, nearest_side, pool_grid, window_middles
from llava.drop.methods.random import image_seed, random_subset
from llava.drop.methods.visionzip import encode_qwen_capturing, qwen_token_scores
from llava.drop.prefill import build_prompt
from llava.model.geometry import read_geometry
from llava.model.qwen import merged_grid
from tests.conftest import NEXT_DEMO_IMAGES, qwen_demo_inputs

SHAPES = list(NEXT_DEMO_IMAGES)  # tall, square, wide
GRIDS = {"tall": (11, 6), "square": (14, 14), "wide": (6, 18)}  # the tiny checkpoints' token rows x columns
KEEPS = [0.333, 0.222, 0.111]
# The pooled grid each image reaches at each keep fraction: the aspect-keeping grid nearest round(F * V) tokens
# (`nearest_grid`), not the budget itself. tall 66 tokens -> 22 / 15 / 7; square 196 -> 65 / 44 / 22; wide 108 ->
# 36 / 24 / 12. (7 is as near 6 as 8: a tie goes to the smaller grid.)
POOLED = {
    0.333: {"tall": (6, 3), "square": (8, 8), "wide": (3, 10)},
    0.222: {"tall": (5, 3), "square": (7, 7), "wide": (3, 8)},
    0.111: {"tall": (3, 2), "square": (5, 5), "wide": (2, 6)},
}
PORTED = {"random": {}, "pool": {}, "visionzip": {}}
QUESTION = "What is written here?"


def demo_inputs(loaded, shape: str):
    return qwen_demo_inputs(loaded, shape, QUESTION)


def all_inputs(loaded):
    return [demo_inputs(loaded, shape) for shape in SHAPES]


def visions(model, method, inputs):
    """Every prompt's vision output, all three through the method together."""
    return encode_visions(model, method, [one.pixel_values for one in inputs], [one.image_sizes for one in inputs])


def kept_rows(unpruned: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Which unpruned tokens the kept features are (each kept row equals one unpruned row exactly)."""
    matches = (kept[:, None] == unpruned[None]).all(dim=-1)
    assert bool((matches.sum(dim=1) == 1).all())
    return matches.float().argmax(dim=1)


# --- by hand -------------------------------------------------------------------------------------------

def test_the_pooled_grid_keeps_the_images_aspect():
    for keep, grids in POOLED.items():
        for shape, pooled in grids.items():
            rows, columns = GRIDS[shape]
            assert nearest_grid(rows, columns, fraction_budget(keep, rows * columns)) == pooled
    assert nearest_grid(6, 18, 1000) == (6, 18)  # a budget above the image's tokens: its own grid
    assert nearest_grid(18, 6, 24) == (8, 3)  # the same grid turned on its side
    assert nearest_grid(1, 5, 3) == (1, 3)
    for tokens in (1, 3, 64, 128, 144, 192, 576):  # a square grid: the nearest square, as on LLaVA
        assert nearest_grid(24, 24, tokens) == (nearest_side(tokens),) * 2


def test_pooled_tokens_sit_at_their_windows_middle_token():
    assert window_middles(4, 2) == [0, 2]  # windows 0-1 and 2-3
    assert window_middles(3, 2) == [0, 1]  # overlapping windows 0-1 and 1-2
    assert window_middles(11, 6) == [0, 2, 4, 6, 8, 9]  # windows 0-1, 1-3, 3-5, 5-7, 7-9, 9-10
    assert window_middles(5, 5) == [0, 1, 2, 3, 4]
    for grid in range(1, 30):  # distinct and rising, so pooled tokens never share a position
        for side in range(1, grid + 1):
            middles = window_middles(grid, side)
            assert all(low < high for low, high in zip(middles, middles[1:])) and 0 <= middles[0] and middles[-1] < grid
    tokens = torch.arange(8.0)[:, None]  # a 2 x 4 grid, row-major
    torch.testing.assert_close(pool_grid(tokens, 2, 4, (1, 2)), torch.tensor([[2.5], [4.5]]))
    assert pool_grid(tokens, 2, 4, (2, 4)) is tokens


# --- random and pool on the tiny checkpoints ------------------------------------------------------------

def test_random_keeps_a_seeded_subset_at_its_own_positions(loaded_any_qwen):
    _, model, _, _ = loaded_any_qwen
    inputs = all_inputs(loaded_any_qwen)
    unpruned = visions(model, create_method("none"), inputs)
    pruned = visions(model, create_method("random", {"budget": "20", "seed": "3"}), inputs)
    for one, full, kept in zip(inputs, unpruned, pruned):
        assert kept.features.shape[0] == kept.stats["vision_tokens"] == 20
        rows = kept_rows(full.features, kept.features)
        tokens = full.features.shape[0]
        assert rows.tolist() == random_subset(tokens, 20, image_seed(one.pixel_values, 3)).tolist()  # in order
        assert torch.equal(kept.positions, full.positions[:, rows])
        assert kept.position_span == full.position_span
        columns = merged_grid(model, one.image_sizes)[2]
        assert kept.patch_groups == [[int(row) * columns + int(column)] for _, row, column in kept.positions.T]


def test_pool_averages_each_window_and_places_it_at_the_middle_token(loaded_any_qwen):
    _, model, _, _ = loaded_any_qwen
    inputs = all_inputs(loaded_any_qwen)
    unpruned = visions(model, create_method("none"), inputs)
    pooled = visions(model, create_method("pool", {"keep_fraction": "0.222"}), inputs)
    for shape, full, out in zip(SHAPES, unpruned, pooled):
        rows, columns = GRIDS[shape]
        pooled_rows, pooled_columns = POOLED[0.222][shape]
        assert out.features.shape[0] == out.stats["vision_tokens"] == pooled_rows * pooled_columns
        means = torch.stack([full.features[cells].mean(dim=0) for cells in out.patch_groups])
        torch.testing.assert_close(out.features, means, rtol=1e-5, atol=1e-6)
        middles = [row * columns + column for row in window_middles(rows, pooled_rows)
                   for column in window_middles(columns, pooled_columns)]
        assert torch.equal(out.positions, full.positions[:, middles])
        assert all(middle in cells for middle, cells in zip(middles, out.patch_groups))
        assert out.position_span == full.position_span == max(rows, columns)


@pytest.mark.parametrize("name", PORTED)
@pytest.mark.parametrize("keep", KEEPS)
def test_each_image_keeps_its_share(loaded_qwen, name, keep):
    """Random and VisionZip keep exactly round(F * V) of each image's V tokens; pool reaches the aspect-keeping grid
    nearest that count (POOLED)."""
    _, model, _, _ = loaded_qwen
    outputs = visions(model, create_method(name, {"keep_fraction": str(keep)}), all_inputs(loaded_qwen))
    for shape, output in zip(SHAPES, outputs):
        rows, columns = GRIDS[shape]
        assert output.stats["vision_tokens_in"] == rows * columns
        expected = math.prod(POOLED[keep][shape]) if name == "pool" else fraction_budget(keep, rows * columns)
        assert output.features.shape[0] == output.positions.shape[1] == output.stats["vision_tokens"] == expected
        assert output.stats["keep_fraction"] == keep


@pytest.mark.parametrize("name", PORTED)
def test_a_budget_counts_tokens_per_image_and_a_small_image_keeps_all(loaded_qwen, name):
    _, model, _, _ = loaded_qwen
    inputs = all_inputs(loaded_qwen)
    outputs = visions(model, create_method(name, {"budget": "100"}), inputs)
    unpruned = visions(model, create_method("none"), inputs)
    counts = [output.features.shape[0] for output in outputs]
    assert counts[0] == 66 and torch.equal(outputs[0].features, unpruned[0].features)  # tall: 66 tokens, all kept
    assert torch.equal(outputs[0].positions, unpruned[0].positions)
    assert counts[1:] == ([100, 100] if name != "pool" else [100, 102])  # pool: 10 x 10, and 6 x 17 (nearest)


@pytest.mark.parametrize("name", PORTED)
def test_the_text_after_the_image_keeps_its_positions(loaded_qwen, name):
    _, model, _, _ = loaded_qwen
    inputs = all_inputs(loaded_qwen)
    unpruned = visions(model, create_method("none"), inputs)
    pruned = visions(model, create_method(name, {"keep_fraction": "0.111"}), inputs)
    for one, full, kept in zip(inputs, unpruned, pruned):
        before, after = build_prompt(model, one.input_ids, full), build_prompt(model, one.input_ids, kept)
        assert after.vision_count < before.vision_count
        assert after.next_position == before.next_position
        text = before.length - before.vision_start - before.vision_count  # the text after the image
        assert torch.equal(after.positions[:, -text:], before.positions[:, -text:])
        assert torch.equal(after.positions[:, : after.vision_start], before.positions[:, : before.vision_start])
        assert torch.equal(after.positions[:, after.vision_start : after.vision_start + after.vision_count],
                           kept.positions + before.vision_start)


@pytest.mark.parametrize("name", PORTED)
def test_a_batch_answers_as_each_prompt_alone(loaded_any_qwen, name):
    """Three images of different sizes in one batch: each prompt's tokens, positions and answer as alone."""
    _, model, _, _ = loaded_any_qwen
    inputs = all_inputs(loaded_any_qwen)
    method = create_method(name, {"keep_fraction": "0.222"})
    together = visions(model, method, inputs)
    for one, batched in zip(inputs, together):
        alone = visions(model, method, [one])[0]
        assert torch.equal(batched.positions, alone.positions)
        torch.testing.assert_close(batched.features, alone.features, rtol=1e-5, atol=1e-6)
    requests = [GenerationRequest(one.input_ids, one.pixel_values, one.image_sizes) for one in inputs]
    sampling, eos = SamplingConfig(max_new_tokens=4), set(model.generation_config.eos_token_id)
    answers = generate_batch(model, requests, sampling, eos, drop=method)
    for request, answer in zip(requests, answers):
        alone = generate_batch(model, [request], sampling, eos, drop=method)[0]
        assert answer.token_ids == alone.token_ids
        assert answer.stats["vision_tokens"] == alone.stats["vision_tokens"] < answer.stats["vision_tokens_in"]


# --- VisionZip: LightCompress's Qwen2.5-VL rule --------------------------------------------------------

def lightcompress_reference(model, one, dominant: int, contextual: int):
    """LightCompress's VisionZip for Qwen2.5-VL, as its hooks compute it: the last vision block's full attention
    matrix (block-diagonal by the segments the tower gives it), head mean, summed over queries, mean over each
    2 x 2 merge unit; keys the mean over units and heads; both put in the merger's output order (found here by
    matching the merger's windowed output rows to the tower's final output); then `prune_qwenv25vl_hook` on the
    decoder tokens. Returns scores, keys, and the kept tokens' features and positions."""
    visual = model.model.visual
    attention = visual.blocks[-1].attn
    seen = {}

    def capture(module, args, kwargs):
        seen.update(hidden=args[0], segments=kwargs["cu_seqlens"], rotary=kwargs["position_embeddings"])

    handle = attention.register_forward_pre_hook(capture, with_kwargs=True)
    with torch.no_grad():
        out = visual(one.pixel_values, grid_thw=one.image_sizes)
        handle.remove()
        patches = seen["hidden"].shape[0]
        query, key, _ = attention.qkv(seen["hidden"]).reshape(patches, 3, attention.num_heads, -1).permute(
            1, 0, 2, 3).unbind(0)
        query, key = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision(query, key, *seen["rotary"])
        mask = torch.full((patches, patches), torch.finfo(query.dtype).min)
        bounds = seen["segments"].tolist()
        for low, high in zip(bounds, bounds[1:]):
            mask[low:high, low:high] = 0
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # [heads, patches, head_dim]
        weights = (query @ key.transpose(1, 2) / math.sqrt(query.shape[-1]) + mask).softmax(dim=-1)
        scores = weights.mean(dim=0).sum(dim=0).view(-1, 4).mean(dim=-1)
        keys = key.view(key.shape[0], -1, 4, key.shape[-1]).mean(dim=2)
        back = torch.cdist(out.pooler_output, visual.merger(out.last_hidden_state)).argmin(dim=1)
        scores, keys = scores[back], keys[:, back].mean(dim=0)
        features = out.pooler_output
        # prune_qwenv25vl_hook
        top = scores.topk(dominant).indices
        chosen = torch.zeros_like(scores, dtype=torch.bool)
        chosen[top] = True
        metric = keys[~chosen] / keys[~chosen].norm(dim=-1, keepdim=True)
        step = max(1, metric.shape[0] // contextual)
        targets = torch.arange(0, metric.shape[0], step)[:contextual]
        others = ~torch.isin(torch.arange(metric.shape[0]), targets)
        assign = F.one_hot((metric[others] @ metric[targets].T).argmax(dim=1), contextual).float()
        counts = assign.sum(dim=0).clamp(min=1)[:, None]
        filtered = features[~chosen]
        merged = filtered[targets] + assign.T @ filtered[others] / counts
        rest = (~chosen).nonzero()[:, 0]
        chosen[rest[targets]] = True
        features = features.clone()
        features[rest[targets]] = merged
    return scores, keys, features[chosen], chosen


def test_visionzip_follows_lightcompress(loaded_any_qwen):
    """Scores, keys, kept tokens and their positions equal LightCompress's Qwen2.5-VL rule computed its own way,
    on each image of a batch of three (on Qwen2-VL: the same rule, no windows)."""
    _, model, _, _ = loaded_any_qwen
    inputs = all_inputs(loaded_any_qwen)
    pixels, grids = [one.pixel_values for one in inputs], [one.image_sizes for one in inputs]
    unpruned, block = encode_qwen_capturing(model, pixels, grids)
    zipped = visions(model, create_method("visionzip", {"dominant": "12", "contextual": "4"}), inputs)
    start = 0
    for one, full, output in zip(inputs, unpruned, zipped):
        scores, keys = qwen_token_scores(model, block, start, one.image_sizes)
        start += int(one.image_sizes.prod())
        expected_scores, expected_keys, features, chosen = lightcompress_reference(model, one, 12, 4)
        torch.testing.assert_close(scores, expected_scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(keys, expected_keys, rtol=1e-4, atol=1e-5)
        assert output.stats["dominant"] == 12 and output.stats["contextual"] == 4
        assert torch.equal(output.positions, full.positions[:, chosen])  # in order, each at its own position
        torch.testing.assert_close(output.features, features, rtol=1e-5, atol=1e-5)
        assert sum(len(group) for group in output.patch_groups) == full.features.shape[0]  # every token, once
        assert sorted(cell for group in output.patch_groups for cell in group) == list(range(full.features.shape[0]))


def test_visionzip_dominant_tokens_are_the_best_scored(loaded_qwen):
    _, model, _, _ = loaded_qwen
    one = demo_inputs(loaded_qwen, "wide")
    unpruned, block = encode_qwen_capturing(model, [one.pixel_values], [one.image_sizes])
    scores, _ = qwen_token_scores(model, block, 0, one.image_sizes)
    output = visions(model, create_method("visionzip", {"dominant": "20", "contextual": "0"}), [one])[0]
    assert torch.equal(kept_rows(unpruned[0].features, output.features), scores.topk(20).indices.sort().values)


# --- what still does not run on Qwen -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tome", "prumerge", "prumerge_plus"])
def test_methods_without_a_port_are_refused_with_the_reason(tiny_qwen, name):
    with pytest.raises(ValueError, match="CLS token.*does not run on Qwen.*random, pool and visionzip") as refused:
        create_method(name).check_model(read_geometry(str(tiny_qwen)))
    assert "\n" not in str(refused.value) and name in str(refused.value)


def test_ports_pass_their_checks_and_refuse_what_no_image_has(tiny_qwen):
    geometry = read_geometry(str(tiny_qwen))  # an image brings 256 tokens at most
    for name in PORTED:
        method = create_method(name)
        assert method.runs_on_qwen
        method.check_model(geometry)
        create_method(name, {"keep_fraction": "0.111"}).check_model(geometry)
    with pytest.raises(ValueError, match="MustDrop's vision stage.*--no_merge"):
        create_method("mustdrop").check_model(geometry)
    with pytest.raises(ValueError, match="side 17 asks for 289 tokens, more than the 256"):
        Pool(PoolOptions(side=17)).check_model(geometry)
    with pytest.raises(ValueError, match="budget 300 exceeds the 256 vision tokens"):
        create_method("random", {"budget": "300"}).check_model(geometry)
    with pytest.raises(ValueError, match="dominant \\+ contextual = 250 \\+ 10 exceeds the 256"):
        create_method("visionzip", {"dominant": "250"}).check_model(geometry)
