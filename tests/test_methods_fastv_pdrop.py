"""FastV and PyramidDrop: ranking on chosen attention rows, equivalence when keeping all, and budgets."""

from __future__ import annotations

import json

import pytest
import torch

from llava.drop.blocks import layer_average, stage_lengths
from llava.drop.prefill import build_prompt, prefill_prompt
from llava.drop.methods import DropMethod, create_method
from llava.drop.method import LAST_QUERY
from llava.drop.methods.fastv import FastV, FastVOptions, fastv_budget_keep
from llava.drop.methods import pdrop as pdrop_module
from llava.drop.methods.pdrop import PDrop, PDropOptions, budget_counts
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.geometry import ModelGeometry
from tests.conftest import DEMO_DIR
from tests.conftest import answer, vicuna_prompt

NUM_LAYERS = 32
FULL_VISION = 576
BUDGETS = (64, 128, 192)
GEOMETRY = ModelGeometry(decoder_layers=NUM_LAYERS, vision_tokens=FULL_VISION, patch_tokens=FULL_VISION,
                         context_length=2048)
EARLY_STAGES = (1, 5, 11)  # PDrop drops that can reach 64 tokens: the default (7, 15, 23) averages >= 144


class FixedAttention:
    """Stands in for a one-prompt LayerContext: the last token's attention row is whatever the test chose."""

    def __init__(self, row: list[float], layer_idx: int, prompt_vision_count: int | None = None):
        self.row = torch.tensor(row)
        self.layer_idx = layer_idx
        self.vision_counts = [len(row)]
        self.prompt_vision_counts = [len(row) if prompt_vision_count is None else prompt_vision_count]
        self.vision_valid = torch.ones(1, len(row), dtype=torch.bool)
        self.geometry = GEOMETRY
        self.queries: list[str] = []

    def attention(self, queries: str) -> torch.Tensor:
        self.queries.append(queries)
        return self.row[None, None]


@pytest.fixture
def fixed_next_layer(monkeypatch):
    """PyramidDrop ranks by the attention the NEXT layer would give (its released code); on a FixedAttention
    the chosen row stands for that."""
    monkeypatch.setattr(pdrop_module, "next_layer_scores", lambda context: context.attention(LAST_QUERY)[:, 0])


def kept(method, context: FixedAttention) -> torch.Tensor:
    """The vision positions the method keeps, from its [1, V] mask."""
    mask = method.select(context)
    assert mask.shape == (1, len(context.row))
    return mask[0].nonzero().flatten()


class TwoPrompts(FixedAttention):
    """Two prompts of different vision counts in one padded batch (the second padded with high scores that
    must never be chosen)."""

    def __init__(self, first: list[float], second: list[float], layer_idx: int):
        super().__init__(first, layer_idx)
        width = max(len(first), len(second))
        self.row = torch.tensor([first + [9.0] * (width - len(first)), second + [9.0] * (width - len(second))])
        self.vision_counts = self.prompt_vision_counts = [len(first), len(second)]
        self.vision_valid = torch.arange(width)[None] < torch.tensor(self.vision_counts)[:, None]

    def attention(self, queries: str) -> torch.Tensor:
        return self.row[:, None]


def test_a_batch_ranks_each_prompt_within_its_own_tokens():
    # kept share 0.5: 5 tokens keep 3, 3 tokens keep 2; the padding's 9.0 scores are never taken
    context = TwoPrompts([0.10, 0.40, 0.05, 0.30, 0.15], [0.2, 0.1, 0.3], layer_idx=1)
    mask = FastV(FastVOptions(drop_after=(1,), kept_share=0.5)).select(context)
    assert mask.tolist() == [[False, True, False, True, True], [True, False, True, False, False]]


def test_fastv_keeps_the_most_attended_tokens():
    # kept share 0.5 of 5 tokens keeps round-half-up(2.5) = 3: the scores 0.40, 0.30, 0.15
    context = FixedAttention([0.10, 0.40, 0.05, 0.30, 0.15], layer_idx=1)
    assert kept(FastV(FastVOptions(drop_after=(1,), kept_share=0.5)), context).tolist() == [1, 3, 4]
    assert context.queries == [LAST_QUERY]


def test_ties_go_to_the_earlier_position():
    # keep 3 (kept share 0.6 of 5): 0.3 first, then two of the three tied 0.2s, the earliest ones
    context = FixedAttention([0.2, 0.1, 0.2, 0.2, 0.3], layer_idx=1)
    assert kept(FastV(FastVOptions(kept_share=0.6)), context).tolist() == [0, 2, 4]


def test_pdrop_keeps_lambda_of_the_prompt_at_each_stage_end(fixed_next_layer):
    method = PDrop(PDropOptions(drop_after=(7, 15, 23), kept_share=0.5))
    assert method.prefill_layers(GEOMETRY) == (7, 15, 23)
    first = FixedAttention([0.05, 0.20, 0.10, 0.01, 0.30, 0.02, 0.25, 0.07], layer_idx=7)
    assert kept(method, first).tolist() == [1, 2, 4, 6]  # 8 -> 4
    second = FixedAttention([0.1, 0.4, 0.3, 0.2], layer_idx=15, prompt_vision_count=8)
    assert kept(method, second).tolist() == [1, 2]  # 8 * 0.25 = 2
    third = FixedAttention([0.3, 0.7], layer_idx=23, prompt_vision_count=8)
    assert kept(method, third).tolist() == [1]  # 8 * 0.125 = 1
    assert first.queries == second.queries == third.queries == [LAST_QUERY]


def test_keep_counts_round_halves_up(fixed_next_layer):
    assert kept(FastV(FastVOptions(kept_share=0.5)), FixedAttention([0.1] * 577, layer_idx=1)).numel() == 289
    assert kept(PDrop(PDropOptions(drop_after=(0,), kept_share=0.5)), FixedAttention([0.1] * 5, layer_idx=0)).numel() == 3


def test_budget_closed_forms():
    # FastV dropping after layer 1 (2 layers see all V): keep = (budget * L - 2 * V) / (L - 2), then the
    # integer average is within half a token
    for budget in BUDGETS:
        keep = fastv_budget_keep(budget, FULL_VISION, 1, NUM_LAYERS)
        assert abs((2 * FULL_VISION + 30 * keep) / NUM_LAYERS - budget) <= 0.5
    assert fastv_budget_keep(64, FULL_VISION, 1, NUM_LAYERS) == 30  # 896 / 30 = 29.87
    assert fastv_budget_keep(1000, FULL_VISION, 1, NUM_LAYERS) == FULL_VISION
    # PDrop: a non-increasing pyramid whose integer average is within a stage's share of a token
    for drop_after in (EARLY_STAGES, (2, 9, 19)):
        lengths = stage_lengths(drop_after, NUM_LAYERS)
        for budget in BUDGETS:
            counts = budget_counts(budget, FULL_VISION, drop_after, NUM_LAYERS)
            assert counts == sorted(counts, reverse=True) and counts[0] <= FULL_VISION
            assert abs(layer_average([FULL_VISION, *counts], lengths) - budget) <= max(lengths[1:]) / NUM_LAYERS / 2


def test_budget_follows_each_prompts_vision_count(fixed_next_layer):
    """V differs per image (e.g. after a vision-stage merge); one method instance serves many prompts."""
    fastv = FastV(FastVOptions(drop_after=(1,), budget=64))
    assert kept(fastv, FixedAttention([0.1] * 300, layer_idx=1)).numel() == 48  # (2048 - 600) / 30 = 48.3
    assert kept(fastv, FixedAttention([0.1] * 576, layer_idx=1)).numel() == 30
    pdrop = PDrop(PDropOptions(drop_after=EARLY_STAGES, budget=64))
    for vision_count in (576, 400):
        expected = budget_counts(64, vision_count, EARLY_STAGES, NUM_LAYERS)
        count_now = vision_count
        for layer_idx, count in zip(pdrop.prefill_layers(GEOMETRY), expected):
            count_now = kept(pdrop, FixedAttention([0.1] * count_now, layer_idx, vision_count)).numel()
            assert count_now == count
    assert expected != budget_counts(64, 576, EARLY_STAGES, NUM_LAYERS)  # the plan was redone for V = 400


def demo_prompts(loaded) -> list:
    """The 12 demo questions as multimodal prompts, encoded once and shared by every setting."""
    tokenizer, model, image_processor, _ = loaded
    questions = [json.loads(line) for line in (DEMO_DIR / "llava_textvqa_demo.jsonl").read_text().splitlines() if line]
    prompts = []
    with torch.no_grad():
        for question in questions:
            input_ids = tokenizer_image_token(vicuna_prompt(question["text"]), tokenizer, return_tensors="pt")
            pixel_values = process_images([load_image(DEMO_DIR / "images" / question["image"])], image_processor)
            prompts.append(build_prompt(model, input_ids, DropMethod().encode_image(model, pixel_values)))
    return prompts


def vision_per_layer(model, prompt, method) -> list[int]:
    with torch.no_grad():
        return prefill_prompt(model, prompt, method).vision_tokens_per_layer


@pytest.fixture(scope="module")
def prompts(loaded_original):
    return demo_prompts(loaded_original)


def test_layer_average_matches_the_closed_form(loaded_original, prompts):
    _, model, _, _ = loaded_original
    fastv = vision_per_layer(model, prompts[0], FastV(FastVOptions(drop_after=(1,), kept_share=0.5)))
    assert fastv == [FULL_VISION] * 2 + [288] * 30
    assert sum(fastv) / NUM_LAYERS == (2 * 576 + 30 * 288) / 32 == 306
    pdrop = vision_per_layer(model, prompts[0], PDrop(PDropOptions(kept_share=0.5)))
    assert pdrop == [576] * 8 + [288] * 8 + [144] * 8 + [72] * 8
    assert sum(pdrop) / NUM_LAYERS == 270


@pytest.mark.parametrize("method", [
    pytest.param(lambda budget: FastV(FastVOptions(budget=budget)), id="fastv"),
    pytest.param(lambda budget: PDrop(PDropOptions(drop_after=EARLY_STAGES, budget=budget)), id="pdrop"),
    pytest.param(lambda budget: PDrop(PDropOptions(budget=budget)), id="pdrop-default-stages"),
])
def test_budgets_reach_the_target_on_the_demo_set(loaded_original, prompts, method):
    _, model, _, _ = loaded_original
    for budget in BUDGETS:
        averages = [sum(counts) / NUM_LAYERS for counts in (vision_per_layer(model, p, method(budget)) for p in prompts)]
        assert abs(sum(averages) / len(averages) - budget) <= 1, (budget, averages)


def test_pdrop_default_stages_reach_192(loaded_original, prompts):
    _, model, _, _ = loaded_original
    averages = [sum(vision_per_layer(model, p, PDrop(PDropOptions(budget=192)))) / NUM_LAYERS for p in prompts]
    assert abs(sum(averages) / len(averages) - 192) <= 1


@pytest.mark.parametrize("method", [FastV(FastVOptions(kept_share=1.0)), PDrop(PDropOptions(kept_share=1.0))],
                         ids=["fastv", "pdrop"])
def test_keeping_everything_equals_the_unpruned_model(loaded_original, demo_images, method):
    for image_path in demo_images[:2]:
        unpruned = answer(loaded_original, image_path, DropMethod())
        kept_all = answer(loaded_original, image_path, method)
        assert kept_all.token_ids == unpruned.token_ids
        assert kept_all.stats["avg_vision_tokens"] == FULL_VISION


@pytest.mark.parametrize("make,message", [
    (lambda: FastVOptions(drop_after=(-1,)), r"drop_after must be .*>= 0.*got \(-1,\)"),
    (lambda: FastVOptions(drop_after=()), "drop_after must name at least one decoder layer"),
    (lambda: FastVOptions(drop_after=1), r"drop_after must be a tuple of decoder layers, e.g. \(1,\), got 1"),
    (lambda: FastVOptions(kept_share=1.5), "kept_share must be between 0 and 1, got 1.5"),
    (lambda: FastVOptions(budget=-3.0), "budget must be a positive number of tokens, got -3"),
    (lambda: PDropOptions(drop_after=(15, 7)), r"drop_after must be .*got \(15, 7\)"),
    (lambda: PDropOptions(drop_after=()), "drop_after must name at least one decoder layer"),
    (lambda: PDropOptions(drop_after=(-1, 7)), r"drop_after must be .*got \(-1, 7\)"),
    (lambda: PDropOptions(kept_share=-0.1), "kept_share must be between 0 and 1, got -0.1"),
    (lambda: PDropOptions(budget=-1.0), "budget must be a positive number of tokens, got -1"),
    (lambda: fastv_budget_keep(30, FULL_VISION, 1, NUM_LAYERS), "budget 30 is below 36.*layers 0..1 alone"),
    (lambda: fastv_budget_keep(64, FULL_VISION, NUM_LAYERS - 1, NUM_LAYERS), "drop_after=31 leaves no layer"),
    (lambda: budget_counts(64, FULL_VISION, (7, 15, 23), NUM_LAYERS),
     "budget 64 is below 144.*layers 0..7 alone.*drop first after an earlier layer than 7"),
])
def test_option_validation(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_created_from_strings():
    fastv = create_method("fastv", {"kept_share": "0.75"})
    assert isinstance(fastv, FastV) and fastv.options == FastVOptions(kept_share=0.75)
    pdrop = create_method("pdrop", {"drop_after": "1;5;11", "kept_share": "0.4"})
    assert isinstance(pdrop, PDrop) and pdrop.options == PDropOptions(drop_after=(1, 5, 11), kept_share=0.4)
    assert pdrop.prefill_layers(GEOMETRY) == (1, 5, 11)
    assert create_method("pdrop", {"budget": "64", "drop_after": "1;5;11"}).options.budget == 64.0  # what --budget passes
