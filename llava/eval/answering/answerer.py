"""Turn one question (text + optional image) into an answer with LLaVA-1.5's prompt and image rules.

Shared by every benchmark CLI so that prompts, preprocessing and decoding are the same everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from llava.conversation import get_conv_template
from llava.drop.generate import SamplingConfig, generate
from llava.drop.methods import DropConfig, DropMethod, as_method
from llava.model.inputs import encode_question, templated_prompt

STOP_CHECK_TOKENS = 16  # stop strings are a few tokens long: decode only the tail at each step


@dataclass
class Answer:
    text: str
    prompt: str  # the full templated prompt, as the model saw it
    stats: dict


class Answerer:
    """Holds a loaded model and answers questions one at a time (batch size 1, as LLaVA evaluates)."""

    def __init__(
        self, tokenizer, model, image_processor, conv_mode: str, sampling: SamplingConfig,
        drop: DropConfig | DropMethod | None = None,
    ):
        get_conv_template(conv_mode)  # fail now on an unknown mode, not at the first question
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.sampling = sampling
        self.drop = drop
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def build_prompt(self, question: str, with_image: bool) -> tuple[str, str]:
        """The templated prompt and the template's stop string."""
        return templated_prompt(question, self.conv_mode, with_image, self.model.config)

    def answer(self, question: str, image: Image.Image | None) -> Answer:
        inputs = encode_question(question, image, self.model, self.tokenizer, self.image_processor, self.conv_mode)
        stop_str = inputs.stop_str

        def stopped_by_string(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-STOP_CHECK_TOKENS:], skip_special_tokens=True)
            return bool(stop_str) and tail.rstrip().endswith(stop_str)

        output = generate(self.model, inputs.input_ids, inputs.pixel_values, self.sampling, self.eos_token_ids,
                          stopped_by_string, as_method(self.drop), image_sizes=inputs.image_sizes)
        text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True).strip()
        if stop_str and text.endswith(stop_str):
            text = text[: -len(stop_str)].strip()
        return Answer(text=text, prompt=inputs.prompt, stats=output.stats)
