"""One encoding path: `encode_question` gives the ids and pixels every caller feeds the model."""

from __future__ import annotations

import torch

from llava.constants import IMAGE_TOKEN_INDEX
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from llava.model.inputs import encode_question
from tests.conftest import vicuna_prompt

QUESTION = "What is the word?"


def test_question_with_image_is_encoded_as_llava_does(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    image = load_image(demo_images[0])

    inputs = encode_question(QUESTION, image, model, tokenizer, image_processor, "vicuna_v1")

    assert inputs.prompt == vicuna_prompt(QUESTION)
    assert inputs.stop_str == "</s>"
    assert torch.equal(inputs.input_ids, tokenizer_image_token(vicuna_prompt(QUESTION), tokenizer, return_tensors="pt"))
    torch.testing.assert_close(inputs.pixel_values, process_images([image], image_processor), rtol=0, atol=0)


def test_text_only_question_has_no_image_token_and_no_pixels(loaded_original):
    tokenizer, model, image_processor, _ = loaded_original

    inputs = encode_question(QUESTION, None, model, tokenizer, image_processor, "vicuna_v1")

    assert inputs.pixel_values is None
    assert inputs.prompt == vicuna_prompt(QUESTION, with_image=False)
    assert IMAGE_TOKEN_INDEX not in inputs.input_ids
