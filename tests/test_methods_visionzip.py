"""VisionZip as its authors released it: dominant/contextual selection on hand-made tensors, then the method on
the tiny model (CLS is one of the dominant tokens; a contextual token is its target plus the mean of the
tokens that joined it)."""

from __future__ import annotations

import pytest
import torch

from llava.drop.methods import DropMethod, create_method
from llava.drop.methods.visionzip import (
    VisionZip,
    VisionZipOptions,
    contextual_merge,
    dominant_indices,
    target_positions,
)
from llava.drop.vision import cls_attention_to_patches, encode_image
from llava.mm_utils import load_image, process_images
from tests.conftest import answer

PATCHES = 576
TOKENS = 1 + PATCHES  # CLS and the patches
SELECT_LAYER_INPUT = 22  # hidden_states index entering CLIP layer 22, whose output LLaVA-1.5 selects
PAPER_SPLITS = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def pixels(loaded, image_path) -> torch.Tensor:
    _, _, image_processor, _ = loaded
    return process_images([load_image(image_path)], image_processor)


def test_dominant_indices_are_the_most_attended_in_original_order():
    cls_row = torch.tensor([0.10, 0.50, 0.20, 0.50, 0.05, 0.30])
    assert dominant_indices(cls_row, 3).tolist() == [1, 3, 5]
    assert dominant_indices(cls_row, 1).tolist() == [1]  # a tie goes to the earlier patch
    assert dominant_indices(cls_row, 0).tolist() == []
    assert dominant_indices(cls_row, 6).tolist() == list(range(6))


def test_targets_are_spaced_uniformly_from_the_first_token():
    assert target_positions(512, 10).tolist() == [51 * i for i in range(10)]
    assert target_positions(6, 2).tolist() == [0, 3]
    assert target_positions(4, 4).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="5 contextual targets among 4"):
        target_positions(4, 5)


def test_a_contextual_token_is_its_target_plus_the_mean_of_the_tokens_that_joined_it():
    tokens = torch.tensor([[0.0, 6.0], [1.0, 5.0], [2.0, 4.0], [3.0, 3.0], [4.0, 2.0], [5.0, 1.0]])
    # Targets are tokens 0 and 3. Token 1's key has the larger dot product with target 0 but the larger
    # cosine with target 3, so it must join target 3; tokens 2 and 4 point at target 0, token 5 at 3.
    keys = torch.tensor([[10.0, 0.0], [1.0, 2.0], [3.0, 0.5], [0.0, 1.0], [1.0, 0.2], [-0.1, 1.0]])
    merged = contextual_merge(tokens, keys, 2)
    # [0, 6] + ([2, 4] + [4, 2]) / 2 = [3, 9];  [3, 3] + ([1, 5] + [5, 1]) / 2 = [6, 6]
    torch.testing.assert_close(merged, torch.tensor([[3.0, 9.0], [6.0, 6.0]]))


def test_a_target_always_leads_its_own_group():
    tokens = torch.arange(8.0).view(4, 2)
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, 0.0], [0.0, 1.0]])  # targets 0 and 2 share a key
    merged = contextual_merge(tokens, keys, 2)
    # Tokens 1 and 3 tie between the two targets and join the earlier one: [0, 1] + ([2, 3] + [6, 7]) / 2.
    # Target 2, as similar to target 0 as to itself, joins no one, and with nobody joining it stays [4, 5].
    torch.testing.assert_close(merged, torch.tensor([[4.0, 6.0], [4.0, 5.0]]))


def test_contextual_merge_edge_counts_and_dtype():
    tokens = torch.randn(5, 3, dtype=torch.float64)
    keys = torch.randn(5, 4)
    assert contextual_merge(tokens, keys, 0).shape == (0, 3)
    everyone_alone = contextual_merge(tokens, keys, 5)
    assert everyone_alone.dtype == torch.float64
    torch.testing.assert_close(everyone_alone, tokens)


def test_budget_is_split_like_the_paper_and_adds_up_exactly():
    for budget, split in PAPER_SPLITS.items():
        assert VisionZipOptions(budget=budget).counts() == split
        assert VisionZipOptions(dominant=1, contextual=1, budget=float(budget)).counts() == split  # budget wins
    for budget in range(1, PATCHES + 1):
        dominant, contextual = VisionZipOptions(budget=budget).counts()
        assert dominant + contextual == budget and dominant >= 1 and contextual >= 0
    assert VisionZipOptions().counts() == PAPER_SPLITS[64]
    assert VisionZipOptions(budget=1).counts() == (1, 0)  # CLS alone


@pytest.mark.parametrize("options, message", [
    ({"dominant": -1}, "dominant must be >= 1 \\(it counts the CLS token\\), got -1"),
    ({"dominant": 0, "contextual": 20}, "dominant must be >= 1 \\(it counts the CLS token\\), got 0"),
    ({"contextual": -2}, "contextual must be >= 0, got -2"),
    ({"budget": 0}, "got 0"),
    ({"budget": 64.5}, "got 64.5"),
])
def test_invalid_options_name_the_value(options, message):
    with pytest.raises(ValueError, match=message):
        VisionZipOptions(**options)


def test_created_by_name_with_string_options():
    method = create_method("visionzip", {"dominant": "108", "contextual": "20"})
    assert isinstance(method, VisionZip) and method.enabled
    assert method.options.counts() == (108, 20)
    assert create_method("visionzip").options == VisionZipOptions()
    with pytest.raises(ValueError, match="dominant='many'"):
        create_method("visionzip", {"dominant": "many"})


@pytest.mark.parametrize("dominant, contextual", [(54, 10), (100, 0), (1, 20)])
def test_token_count_is_dominant_plus_contextual(loaded_original, demo_images, dominant, contextual):
    output = VisionZip(VisionZipOptions(dominant, contextual)).encode_image(loaded_original[1],
                                                                            pixels(loaded_original, demo_images[0]))
    assert output.features.shape[0] == dominant + contextual
    assert output.key_indices is None
    assert output.stats == {"vision_tokens_in": PATCHES, "vision_tokens": dominant + contextual,
                            "dominant": dominant, "contextual": contextual}


def projected_cls(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The CLS token of the select layer's output, projected: what the released code puts first."""
    tower = model.model.vision_tower
    with torch.no_grad():
        select = tower(pixel_values, output_hidden_states=True).hidden_states[SELECT_LAYER_INPUT + 1]
        return model.model.multi_modal_projector(select[:, :1])[0]


def test_dominant_tokens_are_cls_then_the_select_layers_most_cls_attended_patches(loaded_original, demo_images):
    """54 dominant tokens are CLS and 53 patches, as the released `visionzip(model, dominant=54)` passes 53
    to the tower."""
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[1])
    tower = model.model.vision_tower
    with torch.no_grad():
        states = tower(pixel_values, output_hidden_states=True).hidden_states
        cls_row = cls_attention_to_patches(tower.encoder.layers[SELECT_LAYER_INPUT], states[SELECT_LAYER_INPUT])
    patches = encode_image(model, pixel_values).features[dominant_indices(cls_row, 53)]
    output = VisionZip(VisionZipOptions(54, 10)).encode_image(model, pixel_values)
    torch.testing.assert_close(output.features[:54], torch.cat([projected_cls(model, pixel_values), patches]))


def test_keeping_every_patch_between_both_kinds_reorders_the_unpruned_features(loaded_original, demo_images):
    """With dominant + contextual = 577 every contextual group is a lone target: nothing is added."""
    model = loaded_original[1]
    pixel_values = pixels(loaded_original, demo_images[2])
    unpruned = encode_image(model, pixel_values).features
    features = VisionZip(VisionZipOptions(TOKENS - 10, 10)).encode_image(model, pixel_values).features[1:]
    matches = torch.cdist(features, unpruned).argmin(dim=1)
    torch.testing.assert_close(features, unpruned[matches])
    assert sorted(matches.tolist()) == list(range(PATCHES))
    assert matches[:-10].diff().gt(0).all() and matches[-10:].diff().gt(0).all()


def test_keeping_everything_is_llavas_full_select_strategy(loaded_original, demo_images, monkeypatch):
    """CLS and every patch, nothing merged: the unpruned features with CLS in front, i.e. the model whose
    select strategy keeps CLS ("full"), answer for answer."""
    everything = VisionZip(VisionZipOptions(dominant=TOKENS, contextual=0))
    model = loaded_original[1]
    for image_path in demo_images[:3]:
        pixel_values = pixels(loaded_original, image_path)
        features = everything.encode_image(model, pixel_values).features
        torch.testing.assert_close(features[1:], encode_image(model, pixel_values).features, rtol=0, atol=1e-6)
        torch.testing.assert_close(features[:1], projected_cls(model, pixel_values))
    monkeypatch.setattr(model.config, "vision_feature_select_strategy", "full")
    for image_path in demo_images[:3]:
        assert answer(loaded_original, image_path, everything).token_ids == \
            answer(loaded_original, image_path, DropMethod()).token_ids


@pytest.mark.parametrize("budget", sorted(PAPER_SPLITS))
def test_budget_reaches_the_target_on_every_demo_image(loaded_original, demo_images, budget):
    method = VisionZip(VisionZipOptions(budget=budget))
    for image_path in demo_images:
        stats = answer(loaded_original, image_path, method).stats
        assert stats["vision_tokens"] == budget
        assert abs(stats["avg_vision_tokens"] - budget) <= 1


def test_asking_for_more_tokens_than_the_image_has_names_the_counts(loaded_original, demo_images):
    method = VisionZip(VisionZipOptions(dominant=570, contextual=10))
    with pytest.raises(ValueError, match="570 \\+ 10 exceeds the image's 577 tokens \\(CLS and 576 patches\\)"):
        method.encode_image(loaded_original[1], pixels(loaded_original, demo_images[0]))


def test_patch_groups_cover_every_patch_once(loaded_original, demo_images):
    _, model, image_processor, _ = loaded_original
    pixel_values = process_images([load_image(demo_images[0])], image_processor)
    vision = VisionZip(VisionZipOptions(dominant=54, contextual=10)).encode_image(model, pixel_values)
    assert len(vision.patch_groups) == vision.features.shape[0] == 64
    assert vision.patch_groups[0] == []  # CLS stands for no patch
    assert all(len(group) == 1 for group in vision.patch_groups[1:54])
    covered = sorted(patch for group in vision.patch_groups for patch in group)
    assert covered == list(range(576))
