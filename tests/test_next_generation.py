"""LLaVA-NeXT unpruned: our prefill/decode loop equals transformers' LlavaNextForConditionalGeneration.generate()
token for token, in both checkpoint layouts, with each layout's own image preprocessing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from llava.drop.generate import SamplingConfig, generate
from llava.drop.method import DropMethod
from llava.drop.methods import METHODS
from llava.drop.methods.registry import discover_methods
from llava.eval.model_vqa_loader import main as answer_main
from llava.mm_utils import load_image
from llava.model.geometry import read_geometry
from llava.model.inputs import encode_question
from tests.conftest import cli_args, first_questions, hf_input_ids

NEW_TOKENS = 8
# demo images (width x height): tall 180x300 -> a column of 2 crops (LLaVA's tie-break: the first pinpoint
# [336, 672] is [width, height]), square 400x400 -> 2x2, wide 500x160 -> a row of 2
IMAGES = {"tall": "175e99412607ad5f.png", "square": "3fc86ee644365862.png", "wide": "4c6552be651e1ca5.png"}
CROPS = {"tall": 2, "square": 4, "wide": 2}
# 576 base tokens + the crop grid's rows left after unpad x (columns + 1 newline). Unpad cuts
# (rows - the image's height at grid scale) // 2 rows from each side: tall: a 24 x 48 grid, the image
# 300 * 24 / 180 = 40 rows high, 4 cut per side, 40 kept; square: 48 x 48, nothing padded; wide: a 48 x 24
# grid, int(160 * 48 / 500) = 15 rows high, (24 - 15) // 2 = 4 cut per side, 16 kept
VISION_TOKENS = {"tall": 576 + 40 * 25, "square": 576 + 48 * 49, "wide": 576 + 16 * 49}


@pytest.fixture(params=["original", "hf"])
def loaded_next(request):
    return request.getfixturevalue(f"loaded_next_{request.param}")


@pytest.mark.parametrize("shape", sorted(IMAGES))
def test_greedy_equals_transformers_generate(loaded_next, shape):
    tokenizer, model, image_processor, _ = loaded_next
    image = load_image(f"playground/data/eval/demo/images/{IMAGES[shape]}")
    inputs = encode_question("What is written here?", image, model, tokenizer, image_processor, "vicuna_v1")
    assert inputs.pixel_values.shape == (1, 1 + CROPS[shape], 3, 336, 336)
    assert inputs.image_sizes.tolist() == [[image.height, image.width]]
    ours = generate(model, inputs.input_ids, inputs.pixel_values, SamplingConfig(max_new_tokens=NEW_TOKENS),
                    {tokenizer.eos_token_id}, image_sizes=inputs.image_sizes)
    assert ours.stats["crops"] == CROPS[shape] and ours.stats["images"] == 1 + CROPS[shape]
    assert ours.stats["vision_tokens"] == VISION_TOKENS[shape]
    assert ours.token_ids == transformers_tokens(model, tokenizer, inputs, ours.stats["vision_tokens"])


def transformers_tokens(model, tokenizer, inputs, vision_tokens: int) -> list[int]:
    """transformers' greedy answer. An original-layout vocabulary has no <image> token (LLaVA splices at
    id -200), so there the model's own features are spliced into its embeddings and generate() starts
    from those; the transformers layout runs generate() on ids, pixels and image sizes."""
    reference_ids = hf_input_ids(inputs.input_ids, model.config.image_token_id, vision_tokens)
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        if model.config.image_token_id < model.get_input_embeddings().num_embeddings:
            out = model.generate(input_ids=reference_ids, pixel_values=inputs.pixel_values,
                                 image_sizes=inputs.image_sizes, **settings)
            return out[0, reference_ids.shape[1]:].tolist()
        features = model.model.get_image_features(
            inputs.pixel_values, inputs.image_sizes, vision_feature_layer=model.config.vision_feature_layer,
            vision_feature_select_strategy=model.config.vision_feature_select_strategy).pooler_output[0]
        image_positions = reference_ids == model.config.image_token_id
        embeds = model.get_input_embeddings()(reference_ids.masked_fill(image_positions, 0))
        embeds[image_positions] = features
        return model.generate(inputs_embeds=embeds, **settings)[0].tolist()


def test_answering_cli_runs_next_and_records_its_crops(tiny_next_original, tmp_path):
    questions = first_questions(tmp_path, 2)
    answers = tmp_path / "answers.jsonl"
    answer_main(cli_args(tiny_next_original, questions, answers, max_new_tokens=2))
    records = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(records) == 2 and all(record["metadata"]["crops"] in (2, 4) for record in records)


class CropBlind(DropMethod):
    """A dropping method whose vision stage knows only LLaVA-1.5's one image (registered nowhere)."""

    name = "crop-blind"


def test_a_method_without_next_support_is_refused_on_next(tiny_next_original):
    """Every registered method runs on NeXT (tests/test_next_methods.py, tests/test_next_mustdrop.py); one
    without `supports_next` is refused from the config alone, before any weights load."""
    discover_methods()
    assert all(method.supports_next for name, method in METHODS.items() if name != DropMethod.name)
    geometry = read_geometry(str(tiny_next_original))
    with pytest.raises(ValueError, match="dropping with crop-blind does not run on LLaVA-NeXT checkpoints yet"):
        CropBlind().check_model(geometry)
    CropBlind().check_model(replace(geometry, max_crops=0, max_vision_tokens=geometry.vision_tokens))  # LLaVA-1.5
