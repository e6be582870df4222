"""`--budget N` reaches N layer-averaged vision tokens (within one, on average) for every method that takes
a budget; pooling reaches the nearest square grid and a method that picks its own count refuses one."""

from __future__ import annotations

import pytest
import torch

from llava.drop.prefill import build_prompt, prefill_prompt
from llava.drop.methods import METHODS, create_method
from llava.drop.methods.pool import nearest_side
from llava.drop.methods.registry import discover_methods
from llava.model.geometry import geometry_of_model
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from tests.conftest import vicuna_prompt

BUDGETS = (192, 128, 64)
discover_methods()
DROPPING_METHODS = sorted(name for name in METHODS if name != "none")
BUDGETED_METHODS = [name for name in DROPPING_METHODS if not METHODS[name].own_count]


def expected_average(name: str, budget: int) -> int:
    """What a budget should reach: itself, or for pooling the nearest square grid (128 -> 11 x 11)."""
    return nearest_side(budget) ** 2 if name == "pool" else budget


@pytest.fixture(scope="module")
def demo_pixels(loaded_original, demo_images):
    _, _, image_processor, _ = loaded_original
    return [process_images([load_image(path)], image_processor) for path in demo_images]


@pytest.mark.parametrize("name", BUDGETED_METHODS)
def test_every_method_reaches_every_budget_on_the_demo_set(loaded_original, demo_pixels, name):
    tokenizer, model, _, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt("What is the word?"), tokenizer, return_tensors="pt")
    for budget in BUDGETS:
        method = create_method(name, {"budget": str(budget)})
        averages = []
        with torch.no_grad():
            for pixel_values in demo_pixels:
                vision = method.encode_image(model, pixel_values)
                if not method.prefill_layers(geometry_of_model(model)):  # the decoder keeps every token it gets
                    averages.append(vision.features.shape[0])
                    continue
                prompt = build_prompt(model, input_ids, vision)
                counts = prefill_prompt(model, prompt, method).vision_tokens_per_layer
                averages.append(sum(counts) / len(counts))
        assert abs(sum(averages) / len(averages) - expected_average(name, budget)) <= 1, (name, budget, averages)


def test_a_method_that_picks_its_own_count_refuses_a_budget():
    own = [name for name in DROPPING_METHODS if METHODS[name].own_count]
    assert own == ["prumerge_plus"]
    with pytest.raises(ValueError, match="picks its own"):
        create_method("prumerge_plus", {"budget": "64"})


def test_all_ten_methods_are_registered_with_their_family():
    assert DROPPING_METHODS == ["fastv", "mustdrop", "pdrop", "pool", "prumerge", "prumerge_plus", "random",
                                "sparsevlm", "tome", "visionzip"]
    families = {name: METHODS[name].family for name in DROPPING_METHODS}
    assert families == {"fastv": "prefill", "mustdrop": "multi-stage", "pdrop": "prefill", "pool": "baseline",
                        "prumerge": "encoder", "prumerge_plus": "encoder", "random": "baseline",
                        "sparsevlm": "prefill", "tome": "encoder", "visionzip": "encoder"}
    assert METHODS["none"].family == "unpruned"


WHOLE_COUNT_METHODS = {"pool", "prumerge", "random", "tome", "visionzip"}  # a per-image token count


@pytest.mark.parametrize("name", BUDGETED_METHODS)
@pytest.mark.parametrize("budget", ["0", "-2"])
def test_every_method_refuses_a_budget_below_one_token_in_the_same_words(name, budget):
    rule = "a whole number of tokens >= 1" if name in WHOLE_COUNT_METHODS else "a positive number of tokens"
    with pytest.raises(ValueError, match=f"^budget must be {rule}, got {budget}$"):
        create_method(name, {"budget": budget})


def test_the_whole_count_methods_are_the_vision_stage_ones():
    """The split above follows the families: encoder and baseline methods count tokens per image."""
    assert WHOLE_COUNT_METHODS == {name for name in BUDGETED_METHODS if METHODS[name].family in ("encoder", "baseline")}
