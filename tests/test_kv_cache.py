"""The KV cache's reserved buffers: decoding writes each layer's tokens in place, at that layer's own length,
and gives exactly what appending would."""

from __future__ import annotations

import pytest
import torch

from llava.drop.cache import LayerKVCache
from llava.drop.generate import DecodePositions


def filled(lengths: list[int]) -> LayerKVCache:
    """A cache whose layer l holds lengths[l] tokens of distinct values ([1, 2 heads, length, 4])."""
    cache = LayerKVCache(len(lengths))
    for layer, length in enumerate(lengths):
        keys = torch.arange(length * 8, dtype=torch.float32).view(1, 2, length, 4) + 1000 * layer
        cache.update(keys, -keys, layer)
    return cache


def test_reserved_writes_equal_appending_and_never_move_the_buffer():
    appended, reserved = filled([7, 5, 3]), filled([7, 5, 3])
    reserved.reserve(4)
    addresses = [buffer[0].data_ptr() for buffer in reserved.buffers]
    for step in range(4):
        for layer in range(3):
            new = torch.full((1, 2, 1, 4), float(step + 10 * layer))
            expected = appended.update(new, new * 2, layer)
            got = reserved.update(new, new * 2, layer)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert reserved.lengths() == [11, 9, 7]
    assert [buffer[0].data_ptr() for buffer in reserved.buffers] == addresses
    assert reserved.nbytes() == appended.nbytes() == (11 + 9 + 7) * 2 * 4 * 4 * 2  # tokens x heads x dim x fp32 x (k, v)


def test_writing_past_the_reserved_room_is_an_error():
    cache = filled([2])
    cache.reserve(1)
    cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)
    with pytest.raises(RuntimeError, match="reserved for 3 tokens, cannot take 4"):
        cache.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4), 0)


def test_keep_after_reserve_lets_the_room_go_and_appends_again():
    cache = filled([4])
    cache.reserve(2)
    cache.keep(0, torch.tensor([0, 2]))
    assert cache.buffers[0] is None and cache.length(0) == 2
    cache.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), 0)
    assert cache.length(0) == 3


def test_decode_positions_share_one_rope_row_per_distinct_position_and_advance_together():
    positions = DecodePositions([40, 40, 31, 31, 25], torch.device("cpu"))
    assert positions.row_of_layer == [2, 2, 1, 1, 0]
    assert positions.current().tolist() == [25, 31, 40]
    positions.step += 3
    assert positions.current().tolist() == [28, 34, 43]
