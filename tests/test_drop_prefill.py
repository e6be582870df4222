"""Stage 2 (prefill): the scored attention block, the dual filter, the key set, and the wiring."""

from __future__ import annotations

import pytest
import torch

from llava.drop.cache import KVCache
from llava.drop.prefill import build_prompt, kept_slots, prefill_prompt, remap_key_mask, repack, rotary, run_layer
from llava.drop.methods import as_method
from llava.drop.methods.mustdrop import DropConfig, dual_attention_keep
from llava.drop.probe import TokenLayout, vision_attention
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from tests.conftest import answer, vicuna_prompt

SYSTEM, VISION, TEXT = 5, 40, 9


def eager_attention_probs(model, layer_idx: int, layer_input: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Full causal attention probabilities [heads, seq, seq] of one layer, from transformers' eager path."""
    language_model = model.model.language_model
    layer = language_model.layers[layer_idx]
    seq = layer_input.shape[1]
    mask = torch.full((seq, seq), torch.finfo(layer_input.dtype).min).triu(1)[None, None]
    previous = model.config._attn_implementation, language_model.config._attn_implementation
    model.config._attn_implementation = language_model.config._attn_implementation = "eager"
    try:
        _, probs = layer.self_attn(
            hidden_states=layer.input_layernorm(layer_input), attention_mask=mask,
            position_embeddings=language_model.rotary_emb(layer_input, positions[None]),
        )
    finally:
        model.config._attn_implementation, language_model.config._attn_implementation = previous
    return probs[0]


@pytest.mark.parametrize("layer_idx", [2, 6, 14])
@pytest.mark.parametrize("shifted_positions", [False, True])
def test_block_attention_equals_eager_rows(loaded_original, layer_idx, shifted_positions):
    """GQA (4 query heads, 2 kv heads) and RoPE, with contiguous and non-contiguous positions."""
    _, model, _, _ = loaded_original
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads
    generator = torch.Generator().manual_seed(layer_idx)
    seq = SYSTEM + VISION + TEXT
    layer_input = torch.randn(1, seq, model.config.text_config.hidden_size, generator=generator)
    positions = torch.arange(seq) * (3 if shifted_positions else 1)
    cache = KVCache(32)
    with torch.no_grad():
        run_layer(model, layer_idx, layer_input, positions[None], None, cache, rotary(model, layer_input, positions[None]))
        text_rows = torch.arange(SYSTEM + VISION, seq)[None]
        vision_slots = torch.arange(SYSTEM, SYSTEM + VISION)[None]
        block = vision_attention(model, layer_idx, layer_input, cache.keys[layer_idx], positions[None], text_rows,
                                 vision_slots)[0]
        reference = eager_attention_probs(model, layer_idx, layer_input, positions)
    expected = reference[:, SYSTEM + VISION :, SYSTEM : SYSTEM + VISION].mean(dim=0)
    assert block.shape == (TEXT, VISION)
    torch.testing.assert_close(block, expected, rtol=1e-5, atol=1e-6)


def kept_positions(mask: torch.Tensor) -> list[int]:
    return mask[0].nonzero().flatten().tolist()


def test_dual_filter_drops_exactly_the_tokens_both_conditions_name():
    # 2 text rows x 5 vision tokens.  g = column sums, m = column maxima.
    attention = torch.tensor([[
        [0.50, 0.02, 0.01, 0.20, 0.03],
        [0.10, 0.02, 0.30, 0.01, 0.04],
    ]])
    valid = torch.ones(1, 5, dtype=torch.bool)
    key_4 = torch.tensor([[False, False, False, False, True]])
    # g = [0.60, 0.04, 0.31, 0.21, 0.07], total 1.23; global_thr 0.1 -> bound 0.123: g below it for 1, 4
    # m = [0.50, 0.02, 0.30, 0.20, 0.04]; individual_thr 0.035 -> m below it for 1 only
    assert kept_positions(dual_attention_keep(attention, 0.1, 0.035, None, valid)) == [0, 2, 3, 4]
    # raising individual_thr to 0.05 makes token 4 satisfy both conditions too
    assert kept_positions(dual_attention_keep(attention, 0.1, 0.05, None, valid)) == [0, 2, 3]
    # a key token is never dropped
    assert kept_positions(dual_attention_keep(attention, 0.1, 0.05, key_4, valid)) == [0, 2, 3, 4]
    # individual_thr 0 (the --sparse default) drops nothing whatever global_thr is
    assert kept_positions(dual_attention_keep(attention, 1.0, 0.0, None, valid)) == [0, 1, 2, 3, 4]
    # global_thr 0 drops nothing whatever individual_thr is
    assert kept_positions(dual_attention_keep(attention, 0.0, 1.0, None, valid)) == [0, 1, 2, 3, 4]


def test_dual_filter_scores_each_prompt_of_a_batch_by_its_own_total():
    # prompt 0 as above; prompt 1 has 3 vision tokens (padding zero), total 0.4, bound 0.04: token 2 (0.03)
    attention = torch.tensor([
        [[0.50, 0.02, 0.01, 0.20, 0.03], [0.10, 0.02, 0.30, 0.01, 0.04]],
        [[0.20, 0.15, 0.03, 0.00, 0.00], [0.00, 0.00, 0.00, 0.00, 0.00]],  # one text row, then padding
    ])
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    mask = dual_attention_keep(attention, 0.1, 0.05, None, valid)
    assert mask.tolist() == [[True, False, True, True, False], [True, True, False, False, False]]


def test_key_tokens_follow_the_kept_tokens():
    vision_keep = torch.tensor([[True, False, True, True, False, False, False, True, False, True]])
    key_mask = torch.zeros(1, 10, dtype=torch.bool)
    key_mask[0, [3, 9]] = True
    remapped = remap_key_mask(key_mask, vision_keep, [5], 5)  # kept 0, 2, 3, 7, 9: keys at 2 and 4
    assert kept_positions(remapped) == [2, 4]
    assert remap_key_mask(None, vision_keep, [5], 5) is None


def test_kept_slots_keep_system_and_text():
    layouts = [TokenLayout(vision_start=2, vision_count=4, seq_len=9), TokenLayout(vision_start=1, vision_count=2, seq_len=5)]
    vision_keep = torch.tensor([[False, True, False, True], [True, False, False, False]])
    slots = kept_slots(layouts, vision_keep, 9)
    assert slots[0].nonzero().flatten().tolist() == [0, 1, 3, 5, 6, 7, 8]
    assert slots[1].nonzero().flatten().tolist() == [0, 1, 3, 4]  # slots 5.. are padding


@pytest.mark.parametrize("compact", [True, False])
def test_repack_keeps_each_prompt_s_tokens_and_places_recycled_ones_after_its_vision_tokens(compact):
    # prompt 0: [s v v v t t], keeps vision 0 and 2 and recycles one token; prompt 1: [s v v t], keeps vision 1
    hidden = torch.arange(6.0)[None, :, None].repeat(2, 1, 1)  # each token's value is its slot
    positions = (torch.arange(6) * 10)[None].repeat(2, 1)
    layouts = [TokenLayout(vision_start=1, vision_count=3, seq_len=6), TokenLayout(vision_start=1, vision_count=2, seq_len=4)]
    vision_keep = torch.tensor([[True, False, True], [False, True, False]])
    step = repack(hidden, positions, layouts, vision_keep, [torch.tensor([[100.0]]), None], None, compact)
    assert step.lengths == [6, 3] and step.vision_counts == [3, 1]
    assert [keep.tolist() for keep in step.sequence_keeps] == [[0, 1, 3, 4, 5], [0, 2, 3]]
    assert step.hidden[0, :, 0].tolist() == [0, 1, 3, 100, 4, 5]
    assert step.hidden[1, :3, 0].tolist() == [0, 2, 3]
    if compact:
        assert step.positions[0].tolist() == [0, 1, 2, 3, 4, 5] and step.positions[1, :3].tolist() == [0, 1, 2]
    else:  # original positions; the recycled token shares the position of the vision token before it
        assert step.positions[0].tolist() == [0, 10, 30, 30, 40, 50] and step.positions[1, :3].tolist() == [0, 20, 30]


def test_original_positions_after_a_real_drop_change_the_answer_s_logits(loaded_original, demo_images):
    """The compact_positions=False path with tokens really dropped: the first drop (before any position
    changed) keeps the same tokens; from there the rotations differ, and so do the scores and logits."""
    settings = {"global_thr": 0.011, "individual_thr": 0.01}
    _, compact = mustdrop_prefill(loaded_original, demo_images[0], DropConfig(**settings))
    _, original = mustdrop_prefill(loaded_original, demo_images[0], DropConfig(**settings, compact_positions=False))
    assert torch.equal(compact.drops[0][1], original.drops[0][1])
    assert compact.vision_tokens_after_layer[compact.drops[0][0]] < 576
    assert not torch.equal(compact.logits, original.logits)


def mustdrop_prefill(loaded, image_path, drop: DropConfig):
    tokenizer, model, image_processor, _ = loaded
    input_ids = tokenizer_image_token(vicuna_prompt("What is the word?"), tokenizer, return_tensors="pt")
    method = as_method(drop)
    with torch.no_grad():
        vision = method.encode_image(model, process_images([load_image(image_path)], image_processor))
        prompt = build_prompt(model, input_ids, vision)
        return prompt, prefill_prompt(model, prompt, method)


def test_key_set_survives_every_drop(loaded_original, demo_images):
    drop = DropConfig(global_thr=0.011, individual_thr=0.01)
    prompt, result = mustdrop_prefill(loaded_original, demo_images[0], drop)
    assert [layer for layer, _ in result.drops] == list(drop.drop_after)
    system_len = prompt.vision_start
    surviving = torch.arange(prompt.embeds.shape[1])  # original positions of the current sequence
    for _, keep in result.drops:
        surviving = surviving[keep]
    surviving_vision = set((surviving[(surviving >= system_len) & (surviving < system_len + prompt.vision_count)] - system_len).tolist())
    assert set(prompt.key_indices.tolist()) <= surviving_vision
    assert len(surviving_vision) < prompt.vision_count  # these thresholds do drop on the demo model


def test_vision_counts_per_layer(loaded_original, demo_images):
    drop = DropConfig(global_thr=0.011, individual_thr=0.01)
    prompt, result = mustdrop_prefill(loaded_original, demo_images[0], drop)
    counts = result.vision_tokens_per_layer
    assert len(counts) == 32 and counts[0] == prompt.vision_count
    for layer in range(32):  # a drop at layer L shows from layer L + 1 on
        previous_drops = [count for drop_layer, count in result.vision_tokens_after_layer.items() if drop_layer < layer]
        assert counts[layer] == (previous_drops[-1] if previous_drops else prompt.vision_count)


def test_dropping_nothing_equals_the_unpruned_model(loaded_original, demo_images):
    nothing = DropConfig(vision_merge=False, global_thr=0.0, individual_thr=0.0)
    for image_path in demo_images[:3]:
        unpruned = answer(loaded_original, image_path, DropConfig.disabled())
        mustdrop = answer(loaded_original, image_path, nothing)
        assert mustdrop.token_ids == unpruned.token_ids
        assert mustdrop.stats["avg_vision_tokens"] == 576
        assert mustdrop.stats["prefill_flops_ratio"] == pytest.approx(1.0)


def test_published_settings_fall_as_thresholds_rise(loaded_original, demo_images):
    settings = [(0.001, 0.001), (0.0012, 0.001), (0.011, 0.01)]  # 192, 128, 64 "tokens" on LLaVA-1.5-7B
    averages = []
    for global_thr, individual_thr in settings:
        stats = [answer(loaded_original, path, DropConfig(global_thr=global_thr, individual_thr=individual_thr)).stats
                 for path in demo_images[:3]]
        averages.append(sum(s["avg_vision_tokens"] for s in stats) / len(stats))
    assert averages[0] >= averages[1] > averages[2]
    assert averages[0] < 576


def test_drop_layer_beyond_the_model_is_refused(loaded_original, demo_images):
    with pytest.raises(ValueError, match=r"dropping after layer 40 \(0-based\) is impossible in a model with 32 decoder layers"):
        answer(loaded_original, demo_images[0], DropConfig(drop_after=(2, 40)))


@pytest.mark.parametrize("kwargs,message", [
    ({"global_thr": 1.2}, "global_thr must be between 0 and 1, got 1.2"),
    ({"individual_thr": -0.5}, "individual_thr must be between 0 and 1"),
    ({"key_share": 2.0}, "key_share must be between 0 and 1, got 2.0"),
    ({"merge_threshold": 1.5}, "merge_threshold"),
    ({"merge_window": 0}, "merge_window"),
    ({"drop_after": (6, 2)}, r"drop_after must be .*got \(6, 2\)"),
])
def test_drop_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DropConfig(**kwargs)
