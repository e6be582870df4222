"""Turn questions (text + optional image) into answers with LLaVA's prompt and image rules, one at a time
or several at once.

Shared by every benchmark CLI so that prompts, preprocessing and decoding are the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from llava.conversation import get_conv_template
from llava.drop.generate import GenerationOutput, GenerationRequest, SamplingConfig, generate_batch
from llava.drop.methods import DropConfig, DropMethod, as_method
from llava.model.inputs import ModelInputs, encode_question, templated_prompt

STOP_CHECK_TOKENS = 16  # stop strings are a few tokens long: decode only the tail at each step


@dataclass
class Answer:
    text: str
    prompt: str  # the full templated prompt, as the model saw it
    stats: dict


class Answerer:
    """Holds a loaded model and answers questions one at a time (as LLaVA evaluates) or in batches."""

    def __init__(
        self, tokenizer, model, image_processor, conv_mode: str, sampling: SamplingConfig,
        drop: DropConfig | DropMethod | None = None, compile_backend: str | None = None,
        stop_strings: tuple[str, ...] = (), cuda_graph: bool = False,
    ):
        get_conv_template(conv_mode)  # fail now on an unknown mode, not at the first question
        self.tokenizer = tokenizer
        self.model = model
        self.image_processor = image_processor
        self.conv_mode = conv_mode
        self.sampling = sampling
        self.drop = drop
        self.compile_backend = compile_backend  # torch.compile the decode step with this backend
        self.cuda_graph = cuda_graph  # replay the decode step as a CUDA graph
        # Strings that end an answer wherever they appear, cut off with what follows (lmms-eval's `until`);
        # the template's own stop string ends it only at the end, as LLaVA's stopping criterion does.
        self.stop_strings = tuple(stop for stop in stop_strings if stop)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}

    def build_prompt(self, question: str, with_image: bool) -> tuple[str, str]:
        """The templated prompt and the template's stop string."""
        return templated_prompt(question, self.conv_mode, with_image, self.model.config)

    def answer(self, question: str, image: Image.Image | None) -> Answer:
        return self.answer_batch([(question, image)])[0]

    def answer_batch(self, questions: list[tuple[str, Image.Image | None]]) -> list[Answer]:
        """Several questions at once (`generate_batch`): under greedy decoding the same answers as `answer`."""
        prepared = [self.request(question, image) for question, image in questions]
        outputs = generate_batch(self.model, [request for _, request in prepared], self.sampling, self.eos_token_ids,
                                 as_method(self.drop), self.compile_backend, self.cuda_graph)
        return [self.finished(inputs, output) for (inputs, _), output in zip(prepared, outputs)]

    def answer_inputs(self, inputs: ModelInputs, on_token: Callable[[int], None] | None = None) -> Answer:
        """An already encoded prompt (a whole chat so far, say); `on_token` hears each new token as it is decoded."""
        output = generate_batch(self.model, [self.request_for(inputs, on_token)], self.sampling, self.eos_token_ids,
                                as_method(self.drop), self.compile_backend, self.cuda_graph)[0]
        return self.finished(inputs, output)

    def request(self, question: str, image: Image.Image | None) -> tuple[ModelInputs, GenerationRequest]:
        """The question's model inputs, and a generation request that stops at the template's stop string."""
        inputs = encode_question(question, image, self.model, self.tokenizer, self.image_processor, self.conv_mode)
        return inputs, self.request_for(inputs)

    def request_for(self, inputs: ModelInputs, on_token: Callable[[int], None] | None = None) -> GenerationRequest:
        """A generation request for encoded inputs that stops at their template's stop string."""
        stop_str = inputs.stop_str

        def stopped_by_string(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-STOP_CHECK_TOKENS:], skip_special_tokens=True)
            return (bool(stop_str) and tail.rstrip().endswith(stop_str)) or any(stop in tail for stop in self.stop_strings)

        return GenerationRequest(inputs.input_ids, inputs.pixel_values, inputs.image_sizes, stopped_by_string, on_token)

    def finished(self, inputs: ModelInputs, output: GenerationOutput) -> Answer:
        """The answer's text: decoded, cut at the first of `stop_strings`, the template's stop string cut off."""
        text = self.tokenizer.decode(output.token_ids, skip_special_tokens=True)
        for stop in self.stop_strings:
            text = text.split(stop, 1)[0]
        text = text.strip()
        if inputs.stop_str and text.endswith(inputs.stop_str):
            text = text[: -len(inputs.stop_str)].strip()
        return Answer(text=text, prompt=inputs.prompt, stats=output.stats)
