"""MustDrop stage 1: the local spatial merge, the CLS-attention key set, and `encode_image`."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.models.clip.modeling_clip import eager_attention_forward

from llava.drop.methods import as_method
from llava.drop.methods.mustdrop import (
    DropConfig,
    merge_windows_per_image,
    merged_patch_groups,
    top_key_indices,
    window_similarity,
)
from llava.drop.vision import cls_attention_to_patches
from llava.mm_utils import load_image, process_images
from llava.model.tiny import write_tiny_checkpoint

DEMO_IMAGES = Path(__file__).resolve().parent.parent / "playground" / "data" / "eval" / "demo" / "images"
DEMO_IMAGE = DEMO_IMAGES / "175e99412607ad5f.png"
GRID = 24
WINDOW = 3
WINDOWS_PER_SIDE = GRID // WINDOW
NUM_PATCHES = GRID * GRID
TOKENS_PER_WINDOW = WINDOW * WINDOW
DIM = 16
THRESHOLD = 0.8
KEY_RATE = 0.08
FULL_KEY_COUNT = 47  # ceil(0.08 * 576)
IMAGE_SIDE = 336
GREY = (128, 128, 128)
ATOL = 1e-5
# Hand-built windows: identical tokens (score 1), a little noise (just below 1), more noise (lower).
IDENTICAL_WINDOW, SLIGHT_NOISE_WINDOW, MORE_NOISE_WINDOW = 5, 40, 17
SLIGHT_NOISE, MORE_NOISE = 0.01, 0.1


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    """(tokenizer, model, image_processor, context_len) of a fresh tiny checkpoint, fp32 on CPU."""
    from llava.model.builder import load_pretrained_model

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llava-tiny")
    return load_pretrained_model(str(path), device="cpu", torch_dtype="fp32")


@pytest.fixture(scope="module")
def model(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def demo_pixels(loaded) -> torch.Tensor:
    return process_images([load_image(DEMO_IMAGE)], loaded[2])


def encode(model, pixel_values: torch.Tensor, drop: DropConfig | None = None):
    """The vision stage of the method `drop` stands for (None or a disabled config: the unpruned model)."""
    return as_method(drop).encode_image(model, pixel_values)


def _window_of(patch: int) -> int:
    """Row-major window number of a row-major patch index, the slow obvious way."""
    row, col = divmod(patch, GRID)
    return (row // WINDOW) * WINDOWS_PER_SIDE + col // WINDOW


def _patches_of(window: int) -> list[int]:
    return [p for p in range(NUM_PATCHES) if _window_of(p) == window]


def _random_hidden(seed: int = 0) -> torch.Tensor:
    """[1, 577, DIM] Gaussian tokens: random directions, so no window is anywhere near 0.8."""
    return torch.randn(1, 1 + NUM_PATCHES, DIM, generator=torch.Generator().manual_seed(seed))


def _fill_window(hidden: torch.Tensor, window: int, noise: float, seed: int) -> None:
    """Give one window 9 copies of one vector, each plus `noise`-scaled Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(DIM, generator=gen)
    for patch in _patches_of(window):
        hidden[0, 1 + patch] = base + noise * torch.randn(DIM, generator=gen)


def _hand_built_hidden() -> torch.Tensor:
    hidden = _random_hidden()
    _fill_window(hidden, IDENTICAL_WINDOW, 0.0, seed=1)
    _fill_window(hidden, SLIGHT_NOISE_WINDOW, SLIGHT_NOISE, seed=2)
    _fill_window(hidden, MORE_NOISE_WINDOW, MORE_NOISE, seed=3)
    return hidden


def merged_and_count(hidden: torch.Tensor, threshold: float, window: int) -> tuple[torch.Tensor, int]:
    """One image's merged sequence and r, the count of windows it merged."""
    merged, tops = merge_windows_per_image(hidden, threshold, window)
    return merged, tops.shape[1]


def test_window_similarity_matches_pairwise_loop() -> None:
    patches = _random_hidden()[0, 1:]
    scores = window_similarity(patches, GRID, WINDOW)
    for window in range(WINDOWS_PER_SIDE**2):
        tokens = patches[_patches_of(window)]
        pairs = [F.cosine_similarity(tokens[i], tokens[j], dim=0)
                 for i, j in itertools.permutations(range(TOKENS_PER_WINDOW), 2)]
        assert scores[window].item() == pytest.approx(torch.stack(pairs).mean().item(), abs=ATOL)


def test_similar_windows_merge_in_score_order() -> None:
    hidden = _hand_built_hidden()
    scores = window_similarity(hidden[0, 1:], GRID, WINDOW)
    merged_order = [IDENTICAL_WINDOW, SLIGHT_NOISE_WINDOW, MORE_NOISE_WINDOW]
    assert scores[merged_order[0]] > scores[merged_order[1]] > scores[merged_order[2]] >= THRESHOLD
    assert (scores >= THRESHOLD).sum() == len(merged_order), "setup: only the hand-built windows are similar"

    out, r = merged_and_count(hidden, THRESHOLD, WINDOW)

    assert r == len(merged_order)
    assert out.shape == (1, 1 + NUM_PATCHES - (TOKENS_PER_WINDOW - 1) * r, DIM)
    kept = [p for p in range(NUM_PATCHES) if _window_of(p) not in merged_order]
    expected = [hidden[0, 0]]
    expected += [hidden[0, [1 + p for p in _patches_of(w)]].mean(dim=0) for w in merged_order]
    expected += [hidden[0, 1 + p] for p in kept]
    torch.testing.assert_close(out[0], torch.stack(expected), rtol=0, atol=ATOL)
    torch.testing.assert_close(out[0, 1], hidden[0, 1 + _patches_of(IDENTICAL_WINDOW)[0]], rtol=0, atol=ATOL)


def test_threshold_is_inclusive() -> None:
    hidden = _random_hidden()
    _fill_window(hidden, MORE_NOISE_WINDOW, MORE_NOISE, seed=3)
    score = window_similarity(hidden[0, 1:], GRID, WINDOW)[MORE_NOISE_WINDOW]
    just_above = torch.nextafter(score, torch.tensor(math.inf))  # next float32: scores are float32
    assert merged_and_count(hidden, score.item(), WINDOW)[1] == 1
    assert merged_and_count(hidden, just_above.item(), WINDOW)[1] == 0


def test_no_similar_window_leaves_input_untouched() -> None:
    hidden = _random_hidden()
    out, r = merged_and_count(hidden, THRESHOLD, WINDOW)
    assert r == 0
    assert torch.equal(out, hidden)


def test_merge_rejects_grids_it_cannot_cut() -> None:
    with pytest.raises(ValueError, match="cannot be cut"):
        merged_and_count(_random_hidden(), THRESHOLD, window=5)
    with pytest.raises(ValueError, match="square grid"):
        merged_and_count(_random_hidden()[:, :-1], THRESHOLD, WINDOW)


def test_cls_attention_matches_eager_attention(model, demo_pixels: torch.Tensor) -> None:
    tower = model.model.vision_tower
    last = tower.encoder.layers[-1]
    hidden = tower(pixel_values=demo_pixels, output_hidden_states=True).hidden_states[-2]
    attention = last.self_attn
    normed = last.layer_norm1(hidden)
    heads = (1, hidden.shape[1], attention.num_heads, attention.head_dim)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    q, k, v = (proj(normed).view(heads).transpose(1, 2) for proj in projections)
    _, weights = eager_attention_forward(attention, q, k, v, None, scaling=attention.scale)

    row = cls_attention_to_patches(last, hidden)

    assert row.shape == (NUM_PATCHES,)
    torch.testing.assert_close(row, weights[0, :, 0, 1:].mean(dim=0), rtol=0, atol=ATOL)


def test_top_key_indices_picks_known_maxima() -> None:
    row = torch.full((NUM_PATCHES,), 1e-4)
    maxima = torch.randperm(NUM_PATCHES, generator=torch.Generator().manual_seed(0))[:FULL_KEY_COUNT]
    row[maxima] = torch.linspace(0.5, 0.9, FULL_KEY_COUNT)
    assert torch.equal(top_key_indices(row, KEY_RATE), maxima.sort().values)


def test_top_key_indices_count_and_ties() -> None:
    assert top_key_indices(torch.rand(NUM_PATCHES), KEY_RATE).numel() == FULL_KEY_COUNT
    merged_length = NUM_PATCHES - (TOKENS_PER_WINDOW - 1) * 27  # 360 tokens: 28.8 rounds up
    assert top_key_indices(torch.rand(merged_length), KEY_RATE).numel() == 29
    assert torch.equal(top_key_indices(torch.ones(merged_length), KEY_RATE), torch.arange(29))


def test_disabled_matches_transformers_exactly(model, demo_pixels: torch.Tensor) -> None:
    reference = model.model.get_image_features(pixel_values=demo_pixels, vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
    for drop in (None, DropConfig.disabled()):
        out = encode(model, demo_pixels, drop)
        assert torch.equal(out.features, reference)
        assert out.key_indices is None
        assert out.stats == {"vision_tokens_in": NUM_PATCHES, "vision_tokens": NUM_PATCHES}


def test_key_set_without_merge_keeps_features(model, demo_pixels: torch.Tensor) -> None:
    plain = encode(model, demo_pixels)
    out = encode(model, demo_pixels, DropConfig(vision_merge=False))
    assert torch.equal(out.features, plain.features)
    keys = out.key_indices
    assert keys.dtype == torch.long and keys.numel() == FULL_KEY_COUNT
    assert torch.all(keys[1:] > keys[:-1]) and 0 <= keys[0] and keys[-1] < NUM_PATCHES
    assert out.stats["merged_windows"] == 0 and out.stats["key_tokens"] == FULL_KEY_COUNT


@pytest.mark.parametrize("feature_layer", [-3, -1])
def test_key_set_comes_from_last_layer_whatever_layer_is_selected(model, demo_pixels: torch.Tensor,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  feature_layer: int) -> None:
    drop = DropConfig(vision_merge=False)
    default_keys = encode(model, demo_pixels, drop).key_indices
    monkeypatch.setattr(model.config, "vision_feature_layer", feature_layer)
    reference = model.model.get_image_features(pixel_values=demo_pixels, vision_feature_layer=feature_layer,
                                               vision_feature_select_strategy="default").pooler_output[0]
    out = encode(model, demo_pixels, drop)
    assert torch.equal(out.features, reference)
    assert torch.equal(out.key_indices, default_keys)


def test_merge_on_demo_image(model, demo_pixels: torch.Tensor) -> None:
    out = encode(model, demo_pixels, DropConfig())
    r = out.stats["merged_windows"]
    assert 0 < r < WINDOWS_PER_SIDE**2
    kept = NUM_PATCHES - (TOKENS_PER_WINDOW - 1) * r
    assert out.features.shape == (kept, model.config.text_config.hidden_size)
    assert out.stats["vision_tokens_in"] == NUM_PATCHES and out.stats["vision_tokens"] == kept
    assert out.stats["key_tokens"] == out.key_indices.numel() == math.ceil(KEY_RATE * kept)
    assert torch.all(out.key_indices[1:] > out.key_indices[:-1]) and out.key_indices[-1] < kept
    assert out.selection_seconds > 0 and "merge_seconds" not in out.stats  # timed, and not a statistic of its own


def test_constant_image_merges_every_window(loaded) -> None:
    """All patches share one colour, so only position embeddings differ: every window scores ~0.99."""
    model, processor = loaded[1], loaded[2]
    pixels = process_images([Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), GREY)], processor)
    out = encode(model, pixels, DropConfig())
    windows = WINDOWS_PER_SIDE**2
    assert out.stats["merged_windows"] == windows
    assert out.features.shape[0] == windows
    assert out.key_indices.numel() == math.ceil(KEY_RATE * windows) == 6


def test_full_strategy_keeps_cls_and_shifts_keys(model, demo_pixels: torch.Tensor,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    default = encode(model, demo_pixels, DropConfig())
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    full = encode(model, demo_pixels, DropConfig())
    assert full.features.shape[0] == default.features.shape[0] + 1
    assert torch.equal(full.features[1:], default.features)
    assert torch.equal(full.key_indices, default.key_indices + 1)
    assert full.stats["vision_tokens_in"] == NUM_PATCHES + 1


def test_batch_of_two_is_rejected(model, demo_pixels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        encode(model, demo_pixels.repeat(2, 1, 1, 1), DropConfig())


def _assert_partition(groups: list[list[int]]) -> None:
    """Every patch is behind exactly one vision token."""
    assert sorted(patch for group in groups for patch in group) == list(range(NUM_PATCHES))


def test_merged_patch_groups_follow_the_merged_sequence() -> None:
    hidden = _hand_built_hidden()
    merged, tops = merge_windows_per_image(hidden, THRESHOLD, WINDOW)
    top = tops[0]
    assert top.tolist() == [IDENTICAL_WINDOW, SLIGHT_NOISE_WINDOW, MORE_NOISE_WINDOW]
    groups = merged_patch_groups(top.tolist(), NUM_PATCHES, WINDOW)
    assert len(groups) == merged.shape[1] - 1
    assert groups[:3] == [_patches_of(window) for window in top.tolist()]
    _assert_partition(groups)
    for token, group in enumerate(groups):  # each token is the mean of the patches it stands for
        torch.testing.assert_close(merged[0, 1 + token], hidden[0, [1 + p for p in group]].mean(dim=0),
                                   rtol=0, atol=ATOL)


def test_no_merge_gives_identity_groups() -> None:
    assert merged_patch_groups([], NUM_PATCHES, WINDOW) == [[patch] for patch in range(NUM_PATCHES)]


def test_encode_image_reports_patch_groups(model, demo_pixels: torch.Tensor) -> None:
    out = encode(model, demo_pixels, DropConfig())
    r = out.stats["merged_windows"]
    assert len(out.patch_groups) == out.features.shape[0]
    assert all(len(group) == TOKENS_PER_WINDOW for group in out.patch_groups[:r])
    assert all(len(group) == 1 for group in out.patch_groups[r:])
    _assert_partition(out.patch_groups)
    assert encode(model, demo_pixels).patch_groups is None
    unmerged = encode(model, demo_pixels, DropConfig(vision_merge=False)).patch_groups
    assert unmerged == [[patch] for patch in range(NUM_PATCHES)]


def test_full_strategy_gives_cls_no_patches(model, demo_pixels: torch.Tensor,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    default = encode(model, demo_pixels, DropConfig()).patch_groups
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    assert encode(model, demo_pixels, DropConfig()).patch_groups == [[]] + default
