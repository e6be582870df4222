"""Stage 3 (decode): each layer's KV cache holds exactly what the output-aware policy keeps (docs/algorithm.md)."""

from __future__ import annotations

import torch

from llava.drop.cache import KVCache
from llava.drop.methods.mustdrop import DropConfig, apply_output_aware_cache, compose_keeps
from tests.conftest import answer

NUM_LAYERS = 8


def labelled_cache(lengths: list[int]) -> KVCache:
    """A one-prompt cache whose key at sequence slot s of any layer holds the value s, so we can read what is kept."""
    cache = KVCache(len(lengths))
    for layer, length in enumerate(lengths):
        labels = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 4)
        cache.update(labels.clone(), -labels.clone(), layer)
    return cache


def kept_labels(cache: KVCache, layer: int) -> list[int]:
    return cache.keys[layer][0, 0, :, 0].int().tolist()


def test_compose_keeps_maps_back_to_the_first_sequence():
    first = torch.tensor([0, 2, 3, 5, 6, 9])  # 10 tokens -> 6
    second = torch.tensor([0, 2, 5])  # of those 6 -> 3
    assert compose_keeps([first, second]).tolist() == [0, 3, 9]
    assert compose_keeps([second]).tolist() == [0, 2, 5]


def test_each_layer_keeps_the_tokens_that_survived_all_drops():
    # drops at layers 2 and 5 of an 8-layer model: 10 tokens -> 6 -> 3
    drop_2 = torch.tensor([0, 2, 3, 5, 6, 9])
    drop_5 = torch.tensor([0, 2, 5])
    cache = labelled_cache([10, 10, 10, 6, 6, 6, 3, 3])  # what prefill leaves in each layer
    apply_output_aware_cache(cache, [(2, [drop_2]), (5, [drop_5])])
    assert kept_labels(cache, 0) == list(range(10))  # before the first drop: untouched
    assert kept_labels(cache, 1) == list(range(10))
    assert kept_labels(cache, 2) == [0, 3, 9]  # saw all 10; final set in its coordinates
    assert kept_labels(cache, 3) == [0, 2, 5]  # saw the 6 left after layer 2
    assert kept_labels(cache, 5) == [0, 2, 5]  # the last dropping layer itself is trimmed
    assert kept_labels(cache, 6) == [0, 1, 2]  # after the last drop: already final
    assert cache.values[2][0, 0, :, 0].int().tolist() == [0, -3, -9]  # values follow keys
    assert cache.row_lengths(0) == [10, 10, 3, 3, 3, 3, 3, 3]


def test_each_prompt_of_a_batch_keeps_its_own_final_set():
    # two prompts, drops at layer 1 of a 3-layer model: prompt 0 keeps 3 of 5, prompt 1 (3 tokens, padded) 1 of 3
    cache = KVCache(3)
    for layer, length in enumerate([5, 5, 3]):
        labels = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1).expand(2, 2, length, 4).clone()
        labels[1] += 100
        cache.update(labels, -labels, layer)
    for layer in range(2):
        cache.set_lengths(layer, [5, 3])
    cache.set_lengths(2, [3, 1])
    apply_output_aware_cache(cache, [(1, [torch.tensor([0, 3, 4]), torch.tensor([2])])])
    assert kept_labels(cache, 0) == [0, 1, 2, 3, 4]  # before the drop: untouched
    assert kept_labels(cache, 1) == [0, 3, 4]
    assert cache.keys[1][1, 0, :1, 0].tolist() == [102]
    assert cache.row_lengths(0) == [5, 3, 3] and cache.row_lengths(1) == [3, 1, 1]


def test_no_drops_leaves_the_cache_alone():
    cache = labelled_cache([4] * NUM_LAYERS)
    apply_output_aware_cache(cache, [])
    assert cache.row_lengths(0) == [4] * NUM_LAYERS


def test_decode_caches_on_the_model(loaded_original, demo_images):
    drop = DropConfig(global_thr=0.011, individual_thr=0.01)
    result = answer(loaded_original, demo_images[0], drop)
    lengths = result.stats["kv_cache_lengths"]
    prompt_len = result.stats["prompt_tokens"]
    final_vision = result.stats["vision_tokens_after_layer"]["14"]
    final_len = prompt_len - result.stats["vision_tokens"] + final_vision
    assert lengths[:2] == [prompt_len, prompt_len]
    assert lengths[2:] == [final_len] * 30
    assert final_len < prompt_len


def test_without_cache_policy_layers_keep_what_they_saw(loaded_original, demo_images):
    drop = DropConfig(global_thr=0.011, individual_thr=0.01, decode_cache_policy=False)
    result = answer(loaded_original, demo_images[0], drop)
    lengths = result.stats["kv_cache_lengths"]
    assert lengths[2] == result.stats["prompt_tokens"]  # layer 2 saw everything and keeps it
    assert lengths[3] < lengths[2]
