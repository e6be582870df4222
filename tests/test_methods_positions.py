"""Where a token sits after a drop is each method's own fact, taken from its released code: FastV keeps the
kept tokens' original positions and decodes on from the full prompt length; PyramidDrop and SparseVLM give
the shorter sequence positions 0..len-1 and decode at each layer's cache length."""

from __future__ import annotations

import pytest
import torch

from llava.drop.methods.fastv import FastV, FastVOptions
from llava.drop.methods.pdrop import PDrop
from llava.drop.methods.prumerge import PruMerge
from llava.drop.methods.sparsevlm import SparseVLM
from llava.drop.methods.tome import ToMe
from llava.drop.methods.visionzip import VisionZip
from tests.conftest import answer

RELEASED_RULE = {FastV: False, PDrop: True, SparseVLM: True, VisionZip: True, ToMe: True, PruMerge: True}


@pytest.mark.parametrize("method", RELEASED_RULE, ids=lambda method: method.name)
def test_every_peer_states_its_position_rule(method):
    assert "compact_positions" in vars(method), f"{method.name} inherits its position rule instead of stating it"
    assert method.compact_positions is RELEASED_RULE[method]


class AllLayerPositions:
    """Every decoder layer's position ids at prefill and at the first decoding step."""

    def __init__(self, layers):
        self.prefill: dict[int, list[int]] = {}
        self.first_decode: dict[int, int] = {}
        self.handles = [layer.register_forward_pre_hook(self.seer(index), with_kwargs=True)
                        for index, layer in enumerate(layers)]

    def seer(self, index: int):
        def see(module, args, kwargs):
            positions = kwargs["position_ids"][0].tolist()
            if len(positions) > 1:
                self.prefill.setdefault(index, positions)
            else:
                self.first_decode.setdefault(index, positions[0])
        return see

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def positions_of(loaded, image_path, method) -> tuple[AllLayerPositions, dict]:
    recorder = AllLayerPositions(loaded[1].model.language_model.layers)
    try:
        stats = answer(loaded, image_path, method).stats
    finally:
        recorder.remove()
    return recorder, stats


def test_fastv_keeps_original_positions_and_decodes_from_the_prompt_length(loaded_original, demo_images):
    """Dropping after layer 1 (K = 2) keeping 64 of 576: layers 2.. see the kept tokens at their own positions
    (gaps where tokens went), and the first answer token fed back sits at the full prompt length in every
    layer, although layers 2.. hold far fewer keys."""
    method = FastV(FastVOptions(drop_after=(1,), kept_share=64 / 576))
    recorder, stats = positions_of(loaded_original, demo_images[0], method)
    length = stats["prompt_tokens"]
    assert recorder.prefill[0] == recorder.prefill[1] == list(range(length))
    kept = recorder.prefill[2]
    assert len(kept) == length - (576 - 64) and kept == sorted(kept) and kept[-1] == length - 1
    assert all(recorder.prefill[layer] == kept for layer in range(2, 32))
    assert set(recorder.first_decode.values()) == {length}
    assert stats["kv_cache_lengths"][2] == len(kept) < length


@pytest.mark.parametrize("method", [PDrop(), SparseVLM()], ids=lambda method: method.name)
def test_compacting_methods_decode_at_each_layers_cache_length(loaded_original, demo_images, method):
    recorder, stats = positions_of(loaded_original, demo_images[0], method)
    assert [recorder.first_decode[layer] for layer in range(32)] == stats["kv_cache_lengths"]
    for layer, positions in recorder.prefill.items():
        assert positions == list(range(len(positions))), layer
    assert len(set(stats["kv_cache_lengths"])) > 1  # it did drop


def test_fastvs_positions_change_its_answer_but_not_what_it_keeps(loaded_original, demo_images):
    """The same kept tokens at compacted positions give another continuation: positions are part of the
    method, not a detail."""
    released = FastV(FastVOptions(drop_after=(1,), kept_share=64 / 576))
    compacted = FastV(FastVOptions(drop_after=(1,), kept_share=64 / 576))
    compacted.compact_positions = True
    answers = [answer(loaded_original, image, method) for image in demo_images[:4] for method in (released, compacted)]
    assert any(ours.token_ids != theirs.token_ids for ours, theirs in zip(answers[::2], answers[1::2]))
    for ours, theirs in zip(answers[::2], answers[1::2]):
        assert ours.stats["vision_tokens_after_layer"] == theirs.stats["vision_tokens_after_layer"]
        torch.testing.assert_close(torch.tensor(ours.stats["kv_cache_lengths"]),
                                   torch.tensor(theirs.stats["kv_cache_lengths"]))
