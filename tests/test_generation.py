"""Our layer-by-layer prefill/decode loop reproduces transformers' generate() token for token."""

from __future__ import annotations

import pytest
import torch

from llava.drop.generate import SamplingConfig, generate
from llava.drop.prefill import build_prompt, prefill_prompt
from llava.drop.vision import encode_image
from llava.mm_utils import load_image, process_images, tokenizer_image_token
from tests.conftest import hf_input_ids, vicuna_prompt

NEW_TOKENS = 12
QUESTIONS = ["What is the word?", "Describe the colour of the background.", "How many letters are there?"]


@pytest.mark.parametrize("image_index,question", list(enumerate(QUESTIONS)))
def test_greedy_equals_transformers_generate(loaded_hf, demo_images, image_index, question):
    tokenizer, model, image_processor, _ = loaded_hf
    input_ids = tokenizer_image_token(vicuna_prompt(question), tokenizer, return_tensors="pt")
    pixel_values = process_images([load_image(demo_images[image_index])], image_processor)
    ours = generate(model, input_ids, pixel_values, SamplingConfig(max_new_tokens=NEW_TOKENS), {tokenizer.eos_token_id})
    reference_ids = hf_input_ids(input_ids, model.config.image_token_id, ours.stats["vision_tokens"])
    with torch.no_grad():
        reference = model.generate(
            input_ids=reference_ids, pixel_values=pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    assert ours.token_ids == reference[0, reference_ids.shape[1] :].tolist()
    assert len(ours.token_ids) == NEW_TOKENS or ours.token_ids[-1] == tokenizer.eos_token_id


def test_text_only_prompt_equals_transformers_generate(loaded_hf):
    tokenizer, model, _, _ = loaded_hf
    input_ids = tokenizer_image_token(vicuna_prompt("Say something.", with_image=False), tokenizer, return_tensors="pt")
    ours = generate(model, input_ids, None, SamplingConfig(max_new_tokens=NEW_TOKENS), {tokenizer.eos_token_id})
    with torch.no_grad():
        reference = model.generate(input_ids=input_ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    assert ours.token_ids == reference[0, input_ids.shape[1] :].tolist()


def test_vision_features_equal_transformers(loaded_original, demo_images):
    _, model, image_processor, _ = loaded_original
    pixel_values = process_images([load_image(demo_images[2])], image_processor)
    with torch.no_grad():
        reference = model.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output[0]
    torch.testing.assert_close(encode_image(model, pixel_values).features, reference, rtol=0, atol=0)


def test_eager_attention_gives_the_same_prefill(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt(QUESTIONS[0]), tokenizer, return_tensors="pt")
    vision = encode_image(model, process_images([load_image(demo_images[0])], image_processor))
    logits = {}
    for implementation in ("sdpa", "eager"):
        model.config._attn_implementation = implementation
        model.model.language_model.config._attn_implementation = implementation
        with torch.no_grad():
            logits[implementation] = prefill_prompt(model, build_prompt(model, input_ids, vision)).logits
    model.config._attn_implementation = model.model.language_model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)


def test_sampling_is_reproducible_with_a_seed_and_respects_max_new_tokens(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    input_ids = tokenizer_image_token(vicuna_prompt(QUESTIONS[1]), tokenizer, return_tensors="pt")
    pixel_values = process_images([load_image(demo_images[1])], image_processor)
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.9, top_p=0.7, seed=3)
    first = generate(model, input_ids, pixel_values, sampling, {tokenizer.eos_token_id})
    second = generate(model, input_ids, pixel_values, sampling, {tokenizer.eos_token_id})
    assert first.token_ids == second.token_ids
    assert len(first.token_ids) <= 5


def test_prompt_and_image_must_agree(loaded_original, demo_images):
    tokenizer, model, image_processor, _ = loaded_original
    with_placeholder = tokenizer_image_token(vicuna_prompt("Q?"), tokenizer, return_tensors="pt")
    without = tokenizer_image_token(vicuna_prompt("Q?", with_image=False), tokenizer, return_tensors="pt")
    pixel_values = process_images([load_image(demo_images[0])], image_processor)
    with pytest.raises(ValueError, match="no image was given"):
        generate(model, with_placeholder, None, SamplingConfig(max_new_tokens=2), {2})
    with pytest.raises(ValueError, match="no <image> placeholder"):
        generate(model, without, pixel_values, SamplingConfig(max_new_tokens=2), {2})


@pytest.mark.parametrize("kwargs,message", [
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
])
def test_sampling_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_prompt_wraps_the_image_in_start_end_tokens_when_the_checkpoint_asks():
    from types import SimpleNamespace

    from llava.eval.answering.answerer import Answerer

    model = SimpleNamespace(config=SimpleNamespace(mm_use_im_start_end=True),
                            generation_config=SimpleNamespace(eos_token_id=2))
    answerer = Answerer(SimpleNamespace(eos_token_id=2), model, None, "vicuna_v1", SamplingConfig())
    prompt, stop = answerer.build_prompt("What is it?", with_image=True)
    assert prompt.endswith("USER: <im_start><image><im_end>\nWhat is it? ASSISTANT:")
    assert stop == "</s>"
    model.config.mm_use_im_start_end = False
    assert "USER: <image>\nWhat is it?" in answerer.build_prompt("What is it?", with_image=True)[0]
