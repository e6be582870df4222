"""The batch KV cache: prefill rows of different lengths, the one gather that keeps each prompt's own tokens,
and decoding's in-place writes, which give exactly what appending each prompt's tokens alone would."""

from __future__ import annotations

import pytest
import torch

from llava.drop.cache import KVCache


def labelled(length: int, layer: int, rows: int = 1) -> torch.Tensor:
    """[rows, 2 heads, length, 4] with distinct values: slot s of row n holds 100 n + s (+ 1000 per layer)."""
    slots = torch.arange(length, dtype=torch.float32).view(1, 1, length, 1)
    row = torch.arange(rows, dtype=torch.float32).view(rows, 1, 1, 1) * 100
    return (slots + row + 1000 * layer).expand(rows, 2, length, 4).clone()


def test_rows_keep_their_own_lengths_and_tokens():
    cache = KVCache(2)
    cache.update(labelled(6, 0, rows=2), -labelled(6, 0, rows=2), 0)
    cache.set_lengths(0, [6, 4])  # row 1 is padding after 4 tokens
    cache.update(labelled(5, 1, rows=2), -labelled(5, 1, rows=2), 1)
    assert cache.row_lengths(0) == [6, 5] and cache.row_lengths(1) == [4, 5]
    cache.keep(0, [torch.tensor([0, 2, 5]), torch.tensor([1, 3])])
    assert cache.keys[0][0, 0, :, 0].tolist() == [0, 2, 5]
    assert cache.keys[0][1, 0, :2, 0].tolist() == [101, 103]
    assert cache.values[0][1, 1, :2, 3].tolist() == [-101, -103]  # values follow keys
    assert cache.row_lengths(1) == [2, 5]
    per_token = 2 * 4 * 4 * 2  # heads x dim x fp32 x (keys, values)
    assert cache.nbytes(0) == (3 + 5) * per_token and cache.nbytes(1) == (2 + 5) * per_token


def test_decoding_writes_each_prompt_at_its_own_length_and_never_moves_the_buffer():
    cache = KVCache(1)
    cache.update(labelled(5, 0, rows=2), -labelled(5, 0, rows=2), 0)
    cache.set_lengths(0, [5, 3])
    cache.reserve(2)
    address = cache.keys[0].data_ptr()
    for step in range(2):
        new = torch.full((2, 2, 1, 4), 50.0 + step)
        cache.update(new, -new, 0)
    assert cache.keys[0].data_ptr() == address
    assert cache.keys[0][0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 50, 51]
    assert cache.keys[0][1, 0, :5, 0].tolist() == [100, 101, 102, 50, 51]  # written over the padding
    assert cache.step_lengths[0].tolist() == [7, 5]


def test_step_masks_let_each_prompt_see_its_tokens_and_the_slot_it_fills():
    cache = KVCache(2)
    for layer in range(2):
        cache.update(labelled(4, layer, rows=2), labelled(4, layer, rows=2), layer)
        cache.set_lengths(layer, [4, 2])
    cache.reserve(1)
    masks = cache.step_masks(torch.float32)
    assert masks[0] is masks[1]  # layers with the same lengths share one mask
    allowed = (masks[0][:, 0, 0] == 0).tolist()
    assert allowed == [[True] * 5, [True, True, True, False, False]]


def test_keeping_tokens_after_reserving_is_an_error():
    cache = KVCache(1)
    cache.update(labelled(2, 0), labelled(2, 0), 0)
    cache.reserve(1)
    with pytest.raises(RuntimeError, match="reserved for decoding"):
        cache.keep(0, [torch.tensor([0])])
