"""`--budget N` reaches N layer-averaged vision tokens (within one, on average) for every method."""

from __future__ import annotations

import pytest
import torch

from llava.drop.cache import LayerKVCache
from llava.drop.generate import build_prompt, prefill
from llava.drop.methods import METHODS, create_method
from llava.drop.methods.registry import discover_methods
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from tests.conftest import vicuna_prompt

BUDGETS = (192, 128, 64)
discover_methods()
DROPPING_METHODS = sorted(name for name in METHODS if name != "none")


@pytest.fixture(scope="module")
def demo_pixels(loaded_original, demo_images):
    _, _, image_processor, _ = loaded_original
    return [process_images([load_image(path)], image_processor) for path in demo_images]


@pytest.mark.parametrize("name", DROPPING_METHODS)
def test_every_method_reaches_every_budget_on_the_demo_set(loaded_original, demo_pixels, name):
    tokenizer, model, _, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt("What is the word?"), tokenizer, return_tensors="pt")
    for budget in BUDGETS:
        method = create_method(name, {"budget": str(budget)})
        averages = []
        with torch.no_grad():
            for pixel_values in demo_pixels:
                prompt = build_prompt(model, input_ids, method.encode_image(model, pixel_values))
                counts = prefill(model, prompt, LayerKVCache(32), method).vision_tokens_per_layer
                averages.append(sum(counts) / len(counts))
        assert abs(sum(averages) / len(averages) - budget) <= 1, (name, budget, averages)


def test_all_five_methods_are_registered():
    assert DROPPING_METHODS == ["fastv", "mustdrop", "pdrop", "sparsevlm", "visionzip"]
